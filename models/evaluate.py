"""Offline evaluation: Recall@k and MRR@k over every next click of every session.

Each click after the first is a target; the model reads the clicks before it (its `max_len`
newest, as a server would) and ranks the full catalogue. Ties count against the target
(pessimistic): rank = number of other items scoring at least as high, so a model that scores
everything alike gets ~0. Metrics are global means over targets. The "_excl" variant removes the
items already in the session from the ranking (a repeated click then counts as a miss).

The reference code scores all positions of a test session in one forward pass, where the
end-anchored position embedding reveals how many clicks are still to come; scoring each prefix on
its own, as here, is what the model server does and matches the SR-GNN evaluation protocol.
"""

from __future__ import annotations

import torch
from abrec.models.inference import pad_left
from torch import Tensor, nn
from tqdm import tqdm

KS = (5, 10, 20)


def prefixes(sessions: list[list[int]]) -> list[tuple[list[int], int]]:
    """Every (clicks so far, next click) pair of every session."""
    return [(s[:t], s[t]) for s in sessions for t in range(1, len(s))]


def ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """0-based pessimistic rank of each target [B] in scores [B, N+1]."""
    target_scores = scores.gather(1, targets[:, None])
    return (scores >= target_scores).sum(1) - 1


def evaluate(model: nn.Module, sessions: list[list[int]], *, ks: tuple[int, ...] = KS,
             batch_size: int = 256, progress: bool = False) -> dict[str, float]:
    """Recall@k, MRR@k and their seen-items-excluded variants, plus the number of targets."""
    pairs = prefixes(sessions)
    # Bucketing by prefix length keeps padding (wasted work) small.
    pairs.sort(key=lambda p: min(len(p[0]), model.max_len))
    device = next(model.parameters()).device
    hits = {k: torch.zeros((), dtype=torch.float64) for k in ks}
    rr = {k: torch.zeros((), dtype=torch.float64) for k in ks}
    hits_x = {k: torch.zeros((), dtype=torch.float64) for k in ks}
    rr_x = {k: torch.zeros((), dtype=torch.float64) for k in ks}
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, len(pairs), batch_size), disable=not progress, desc="evaluate",
                          mininterval=2):
            chunk = pairs[start : start + batch_size]
            items, mask = pad_left([p[0] for p in chunk], model.max_len, device)
            targets = torch.tensor([p[1] for p in chunk], device=device)
            scores = model(items, mask)[:, -1] @ model.output_weight().T
            scores[:, 0] = float("-inf")
            r = ranks(scores, targets).cpu()
            seen, _ = pad_left([p[0] for p in chunk], max(len(p[0]) for p in chunk), device)
            r_x = ranks(scores.scatter_(1, seen, float("-inf")), targets).cpu()
            for k in ks:
                for rank, h, m in ((r, hits, rr), (r_x, hits_x, rr_x)):
                    inside = rank < k
                    h[k] += inside.sum()
                    m[k] += torch.where(inside, 1.0 / (rank + 1).double(), 0.0).sum()
    model.train(was_training)
    n = max(len(pairs), 1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(hits[k]) / n
        out[f"mrr@{k}"] = float(rr[k]) / n
    for k in ks:
        out[f"recall@{k}_excl"] = float(hits_x[k]) / n
        out[f"mrr@{k}_excl"] = float(rr_x[k]) / n
    out["targets"] = len(pairs)
    return out


def popularity_baseline(popular: list[int], sessions: list[list[int]], ks: tuple[int, ...] = KS
                        ) -> dict[str, float]:
    """Recall/MRR of always recommending `popular` (best first): the floor a model must beat."""
    pairs = prefixes(sessions)
    position = {item: r for r, item in enumerate(popular)}
    n = max(len(pairs), 1)
    out: dict[str, float] = {}
    for k in ks:
        ranked = [position.get(t, len(popular)) for _, t in pairs]
        out[f"recall@{k}"] = sum(r < k for r in ranked) / n
        out[f"mrr@{k}"] = sum(1.0 / (r + 1) for r in ranked if r < k) / n
    return out
