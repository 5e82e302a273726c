"""Negative sampling and the scores of positives and negatives at every real position.

Samplers (all vectorised, drawing from a torch.Generator):
- uniform over items 1..N, per position [P, U], per session [B, U] or shared by the batch [U];
- in-batch: targets of the OTHER sessions of the batch, so popularity-weighted [B, K]
  (drawn with replacement; the reference draws without);
- top-k: of the union of all negatives, keep the k highest-scoring per position (TRON).

Batch-shared and in-batch negatives belong to one batch: under torchrun each process draws its
own from its own batch, as one GPU's batch does in the paper.

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


def _rows(model: nn.Module, *ids: Tensor) -> list[Tensor]:
    """Output embedding rows for several id tensors with ONE lookup: each lookup of a dense
    embedding costs a full-size gradient in the backward pass."""
    flat = model.output_rows(torch.cat([t.reshape(-1) for t in ids]))
    parts = torch.split(flat, [t.numel() for t in ids])
    return [w.view(*t.shape, -1) for t, w in zip(ids, parts, strict=True)]


def _blocks(model: nn.Module, hidden: Tensor, mask: Tensor, h: Tensor, negs: Negatives,
            positives: Tensor | None = None) -> tuple[Tensor | None, list[tuple[Tensor, Tensor]]]:
    """(positive scores [P] if `positives` given, [(ids, raw scores [P, n]) per kind of negative]);
    ids broadcast against [P, n]. Scores are computed in `hidden`'s dtype."""
    kinds = [t for t in (negs.shared, negs.per_session, negs.per_position) if t is not None]
    lookups = ([positives] if positives is not None else []) + kinds
    rows = iter([w.to(hidden.dtype) for w in _rows(model, *lookups)] if lookups else [])
    pos = (h * next(rows)).sum(-1) if positives is not None else None
    out = []
    if negs.shared is not None:
        out.append((negs.shared[None, :], h @ next(rows).T))
    if negs.per_session is not None:
        w = next(rows)  # [B, K, d]
        scores = torch.bmm(hidden, w.transpose(1, 2))[mask]
        index = torch.arange(len(mask), device=mask.device)[:, None].expand_as(mask)[mask]
        out.append((negs.per_session[index], scores))
    if negs.per_position is not None:
        w = next(rows)  # [P, U, d]
        out.append((negs.per_position, torch.bmm(w, h[:, :, None])[:, :, 0]))
    return pos, out


def _activate(scores: Tensor, activation: str) -> Tensor:
    return F.elu(scores, alpha=0.5) if activation == "elu" else scores


def _masked(ids: Tensor, scores: Tensor, positives: Tensor) -> Tensor:
    return scores.masked_fill((ids == positives[:, None]) | (ids == 0), float("-inf"))


def scores(model: nn.Module, hidden: Tensor, mask: Tensor, labels: Tensor, negs: Negatives, *,
           topk: int = 0, activation: str = "none", selection_bf16: bool = False) -> tuple[Tensor, Tensor]:
    """Scores at the real positions: (positives [P], negatives [P, M]), masked negatives = -inf.

    hidden [B, L, d] is the network output, mask/labels [B, L]. With topk, the union of all
    negatives is scored without gradient, the k best per position are kept and only those are
    scored again with gradient: the same gradient as scoring all, at a fraction of the cost.
    `selection_bf16` does that selection pass in bfloat16 (4x faster on CPUs with AVX512-BF16;
    near-ties among the hardest negatives may then be picked differently); the kept negatives
    are always scored in full precision.
    """
    h = hidden[mask]
    positives = labels[mask]
    if not topk:
        pos, blocks = _blocks(model, hidden, mask, h, negs, positives)
        neg = torch.cat([_masked(ids, _activate(s, activation), positives) for ids, s in blocks], 1)
        return _activate(pos, activation), neg
    with torch.no_grad():
        dtype = torch.bfloat16 if selection_bf16 else hidden.dtype
        _, blocks = _blocks(model, hidden.detach().to(dtype), mask, h.detach().to(dtype), negs)
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
    both = torch.bmm(model.output_rows(torch.cat([positives[:, None], chosen], 1)), h[:, :, None])[:, :, 0]
    both = _activate(both, activation)
    return both[:, 0], _masked(chosen, both[:, 1:], positives)
