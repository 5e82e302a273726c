"""Negative sampling and the scores of positives and negatives at every real position.

Samplers (all vectorised, drawing from a torch.Generator):
- uniform over items 1..N, per position [P, U], per session [B, U] or shared by the batch [U];
- in-batch: targets of the OTHER sessions of the batch, so popularity-weighted [B, K]
  (drawn with replacement; the reference draws without);
- top-k: of the union of all negatives, keep the k highest-scoring per position (TRON).

Under torchrun every process draws its own batch-shared and in-batch negatives from its own
batch, as one GPU's batch does in the paper.

Accidental hits (a negative equal to the position's positive) and padding ids get the score
-inf, which every loss in losses.py ignores. The reference code leaves them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Negatives:
    shared: Tensor | None = None  # [U] ids, every position of the batch
    per_session: Tensor | None = None  # [B, K] ids, every position of session b
    per_position: Tensor | None = None  # [P, U] ids, one real position each


def uniform(num_items: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randint(1, num_items + 1, shape, generator=generator)


def in_batch(targets: Tensor, counts: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k targets of other sessions for each session -> [B, k] ids (0 where the batch has no other
    session). `targets` [P] are the batch's real targets grouped by session, `counts` [B] how
    many belong to each session."""
    total = int(targets.numel())
    starts = torch.cumsum(counts, 0) - counts
    others = (total - counts)[:, None]
    # Draw an index among the positions of the other sessions, then skip over this session's block.
    r = (torch.rand(len(counts), k, generator=generator) * others).long()
    r = r + torch.where(r >= starts[:, None], counts[:, None], 0)
    ids = targets[r.clamp(max=max(total - 1, 0))] if total else torch.zeros_like(r)
    return torch.where(others > 0, ids, 0)


def reject_in_session(neg: Tensor, session_items: Tensor, num_items: int, generator: torch.Generator,
                      rounds: int = 10) -> Tensor:
    """Redraw negatives [P, U] that occur in their session's items [P, S] (a few rounds)."""
    for _ in range(rounds):
        hit = (neg[:, :, None] == session_items[:, None, :]).any(-1)
        if not hit.any():
            break
        neg = torch.where(hit, uniform(num_items, tuple(neg.shape), generator), neg)
    return neg


def sample(config: dict[str, Any], inputs: Tensor, labels: Tensor, mask: Tensor, num_items: int,
           generator: torch.Generator) -> Negatives:
    """Draw the negatives a config asks for, for a batch of inputs/labels/mask [B, L] (CPU)."""
    u, k, style = config["uniform_negatives"], config["in_batch_negatives"], config["sampling"]
    negs = Negatives()
    if u and style == "batch":
        negs.shared = uniform(num_items, (u,), generator)
    elif u and style == "session":
        negs.per_session = uniform(num_items, (len(labels), u), generator)
    elif u and style == "position":
        n = int(mask.sum())
        negs.per_position = uniform(num_items, (n, u), generator)
        if config.get("reject_session_items"):
            session_items = torch.cat([inputs, labels], dim=1)
            rows = torch.arange(len(labels))[:, None].expand_as(mask)[mask]
            negs.per_position = reject_in_session(negs.per_position, session_items[rows], num_items,
                                                  generator)
    if k:
        batch = in_batch(labels[mask], mask.sum(1), k, generator)
        negs.per_session = batch if negs.per_session is None else torch.cat([negs.per_session, batch], 1)
    return negs


def _blocks(model: nn.Module, hidden: Tensor, mask: Tensor, h: Tensor, negs: Negatives
            ) -> list[tuple[Tensor, Tensor]]:
    """(ids, raw scores [P, n]) per kind of negative; ids broadcast against [P, n]."""
    out = []
    if negs.shared is not None:
        out.append((negs.shared[None, :], h @ model.output_rows(negs.shared).T))
    if negs.per_session is not None:
        w = model.output_rows(negs.per_session)  # [B, K, d]
        scores = torch.bmm(hidden, w.transpose(1, 2))[mask]
        rows = torch.arange(len(mask), device=mask.device)[:, None].expand_as(mask)[mask]
        out.append((negs.per_session[rows], scores))
    if negs.per_position is not None:
        w = model.output_rows(negs.per_position)  # [P, U, d]
        out.append((negs.per_position, torch.bmm(w, h[:, :, None])[:, :, 0]))
    return out


def _activate(scores: Tensor, activation: str) -> Tensor:
    return F.elu(scores, alpha=0.5) if activation == "elu" else scores


def _masked(ids: Tensor, scores: Tensor, positives: Tensor) -> Tensor:
    return scores.masked_fill((ids == positives[:, None]) | (ids == 0), float("-inf"))


def scores(model: nn.Module, hidden: Tensor, mask: Tensor, labels: Tensor, negs: Negatives, *,
           topk: int = 0, activation: str = "none") -> tuple[Tensor, Tensor]:
    """Scores at the real positions: (positives [P], negatives [P, M]), masked negatives = -inf.

    hidden [B, L, d] is the network output, mask/labels [B, L]. With topk, the union of all
    negatives is scored without gradient, the k best per position are kept and only those are
    scored again with gradient: the same gradient as scoring all, at a fraction of the cost.
    """
    h = hidden[mask]
    positives = labels[mask]
    pos = _activate((h * model.output_rows(positives)).sum(-1), activation)
    if not topk:
        blocks = _blocks(model, hidden, mask, h, negs)
        neg = torch.cat([_masked(ids, _activate(s, activation), positives) for ids, s in blocks], 1)
        return pos, neg
    with torch.no_grad():
        blocks = _blocks(model, hidden.detach(), mask, h.detach(), negs)
        union = torch.cat([_masked(ids, s, positives) for ids, s in blocks], 1)
        best = torch.topk(union, min(topk, union.shape[1]), dim=1).indices
        chosen = torch.zeros_like(best)
        offset = 0
        for ids, s in blocks:
            n = s.shape[1]
            local = (best - offset).clamp(0, n - 1)
            inside = (best >= offset) & (best < offset + n)
            chosen = torch.where(inside, ids.expand(len(h), n).gather(1, local), chosen)
            offset += n
    neg = torch.bmm(model.output_rows(chosen), h[:, :, None])[:, :, 0]
    return pos, _masked(chosen, _activate(neg, activation), positives)
