"""Losses over one positive and M negative scores per position: BCE, BPR-max, sampled softmax.

Inputs are for real (non-padding) positions only: pos [P], neg [P, M]. A negative score of -inf
marks a masked negative (an accidental hit, equal to the positive, or padding); each loss
ignores it. The reference code (otto-de/TRON) masks nothing, so its accidental hits push the
positive down against itself; with thousands of uniform negatives over 43k items that happens at
a rate of a few per cent of positions (more for popular in-batch items).

Each function returns the mean over positions, or per-position values with reduction="none".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")


def bce(pos: Tensor, neg: Tensor, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy: -log sigmoid(pos) - mean_j log(1 - sigmoid(neg_j))."""
    valid = torch.isfinite(neg)
    neg_term = torch.where(valid, F.softplus(neg), 0.0).sum(-1) / valid.sum(-1).clamp(min=1)
    return _reduce(F.softplus(-pos) + neg_term, reduction)


def bpr_max(pos: Tensor, neg: Tensor, penalty: float, reduction: str = "mean") -> Tensor:
    """BPR-max (Hidasi & Karatzoglou 2018): -log sum_j s_j sigmoid(pos - neg_j) + penalty *
    sum_j s_j neg_j^2, with s = softmax over the negatives. Computed in log space so that a hopeless
    position gives a large finite loss rather than log(0)."""
    valid = torch.isfinite(neg)
    # A position whose negatives are all masked contributes 0; zeros keep its softmax finite.
    neg = torch.where(valid.any(-1, keepdim=True), neg, 0.0)
    log_s = torch.log_softmax(neg, dim=-1)
    ranking = -torch.logsumexp(log_s + F.logsigmoid(pos[:, None] - neg), dim=-1)
    square = torch.where(valid, neg, 0.0) ** 2
    regulariser = penalty * (log_s.exp() * square).sum(-1)
    loss = torch.where(valid.any(-1), ranking + regulariser, 0.0)
    return _reduce(loss, reduction)


def sampled_softmax(pos: Tensor, neg: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the positive against itself plus the negatives (listwise)."""
    logits = torch.cat([pos[:, None], neg], dim=-1)
    return _reduce(torch.logsumexp(logits, dim=-1) - pos, reduction)


def compute(name: str, pos: Tensor, neg: Tensor, *, bpr_penalty: float = 0.0) -> Tensor:
    """The loss named in a config ("bce", "bpr-max", "ssm"), averaged over positions."""
    if name == "bce":
        return bce(pos, neg)
    if name == "bpr-max":
        return bpr_max(pos, neg, bpr_penalty)
    if name == "ssm":
        return sampled_softmax(pos, neg)
    raise ValueError(f"unknown loss {name!r}")
