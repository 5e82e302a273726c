"""Scoring sessions with a trained model: one forward pass for a whole batch of sessions.

Sessions are lists of internal ids. Each is truncated to the model's `max_len` most recent
clicks and left-padded to the batch's longest, so the newest click of every session sits in the
last column; the hidden state there scores every item as the next click.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def pad_left(sessions: list[list[int]], max_len: int, device: torch.device | str = "cpu"
             ) -> tuple[Tensor, Tensor]:
    """-> (items [B, L] long, mask [B, L] bool), L = longest truncated session (at least 1)."""
    cut = [list(s[-max_len:]) if max_len else [] for s in sessions]
    length = max(1, max(map(len, cut), default=1))
    # One tensor from padded Python lists: a slice assignment per row costs ~10x more for a batch.
    padded = [[0] * (length - len(s)) + s for s in cut]
    items = torch.tensor(padded, dtype=torch.long).view(len(cut), length).to(device)
    return items, items != 0


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# Past this many clicks in a batch, attention over all of them at once (T^2) costs more than padding.
RAGGED_ROWS = 256


def hidden_last(model: nn.Module, sessions: list[list[int]]) -> Tensor:
    """[B, d] hidden state after each session's newest click."""
    if (hasattr(model, "forward_ragged") and not model.training and _device(model).type == "cpu"
            and sum(min(len(s), model.max_len) or 1 for s in sessions) <= RAGGED_ROWS):
        return model.forward_ragged(sessions)  # the same, unpadded: cheaper for live batches on a CPU
    items, mask = pad_left(sessions, model.max_len, _device(model))
    if hasattr(model, "forward_last") and not model.training:  # the same, computing only what is read
        return model.forward_last(items, mask)
    return model(items, mask)[:, -1]


def score_batch(model: nn.Module, sessions: list[list[int]]) -> Tensor:
    """Scores [B, N+1] of every item as the next click after each session; column 0 is -inf.

    The model must be in eval mode (as `load_checkpoint` returns it). Empty sessions are allowed
    (they get the model's scores for a session of padding only; a server may prefer the
    checkpoint's `popular` list for them).
    """
    with torch.inference_mode():
        if not sessions:
            return torch.empty(0, model.num_items + 1)
        scores = hidden_last(model, sessions) @ model.output_weight().T
        scores[:, 0] = float("-inf")
        return scores


TOPK_CHUNK = 64


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(scores, k, dim=1) for a few of many columns, ~2-3x cheaper on a CPU.

    The k best columns of a row lie in the k chunks of TOPK_CHUNK columns with the highest maxima
    (a chunk left out has k chunks with a higher maximum, so k higher scores), so only those chunks
    are searched. Values equal torch.topk's; tied columns may come in another order.
    """
    b, n = scores.shape
    c = TOPK_CHUNK
    if scores.device.type != "cpu" or k * c * 4 > n:  # GPUs sort fast; short rows gain nothing
        return torch.topk(scores, k, dim=1)
    whole = n - n % c
    chunks = scores[:, :whole].view(b, -1, c)
    best = chunks.amax(2).topk(k, dim=1).indices  # [b, k]
    candidates = chunks.gather(1, best[:, :, None].expand(b, k, c)).reshape(b, k * c)
    values, pos = torch.cat([candidates, scores[:, whole:]], 1).topk(k, dim=1)  # the tail is always in
    columns = torch.where(pos < k * c, best.gather(1, (pos // c).clamp(max=k - 1)) * c + pos % c,
                          whole + pos - k * c)
    return values, columns


def top_within(scores: Tensor, k: int, margin: Tensor) -> Tensor:
    """[B, M] columns holding every column of each row whose score is at least the row's k-th best
    less `margin` [B] (and maybe a few more), M the largest such count; rows with fewer are padded
    (with column 0, or with lesser columns where the rows are too short to chunk).

    Chunked as `top_k`: a column that qualifies lies in a chunk whose maximum qualifies, and those
    are few, so only they are searched.
    """
    b, n = scores.shape
    c = TOPK_CHUNK
    whole = n - n % c
    if scores.device.type != "cpu" or k * c * 4 > n:
        kth = scores.topk(k, dim=1).values[:, -1:]
        return scores.topk(int((scores >= kth - margin[:, None]).sum(1).max()), dim=1).indices
    chunks = scores[:, :whole].view(b, -1, c)
    maxima = chunks.amax(2)  # [b, C]
    if whole < n:
        maxima = torch.cat([maxima, scores[:, whole:].amax(1, keepdim=True)], 1)
    # The k-th best chunk maximum is at most the k-th best score (the k best chunks hold k scores at
    # least that high), so this floor is at most the asked one: more columns, never fewer.
    ranked = maxima.topk(k, dim=1).values
    floor = ranked[:, -1:] - margin[:, None]
    # The chunks whose maximum reaches the floor are each row's top `wanted` chunks.
    wanted = int((maxima >= floor).sum(1).max())
    maxima = maxima[:, : whole // c]
    best = maxima.topk(min(wanted, maxima.shape[1]), dim=1).indices  # [b, wanted]
    wanted = best.shape[1]
    if whole == n:  # chunks is contiguous: one row per chunk, picked without copying the matrix
        flat = (best + torch.arange(b)[:, None] * maxima.shape[1]).view(-1)
        picked = chunks.reshape(-1, c).index_select(0, flat).view(b, wanted * c)
    else:
        picked = chunks.gather(1, best[:, :, None].expand(b, wanted, c)).reshape(b, wanted * c)
    candidates = torch.cat([picked, scores[:, whole:]], 1) if whole < n else picked
    keep = candidates >= floor
    counts = keep.sum(1)
    rows, pos = keep.nonzero(as_tuple=True)
    columns = torch.where(pos < wanted * c, best[rows, (pos // c).clamp(max=wanted - 1)] * c + pos % c,
                          whole + pos - wanted * c)
    slot = torch.arange(len(rows)) - (counts.cumsum(0) - counts)[rows]  # rank among its row's columns
    out = rows.new_zeros(b, max(k, int(counts.max())))
    out[rows, slot] = columns
    return out


def topk_batch(model: nn.Module, sessions: list[list[int]], k: int, exclude_seen: bool = False
               ) -> tuple[Tensor, Tensor]:
    """The k best next items per session -> (ids [B, k] long, scores [B, k]), best first.

    With exclude_seen, items already in the session are never recommended.
    """
    with torch.inference_mode():
        scores = score_batch(model, sessions)
        if exclude_seen and sessions:
            # Every click of the session, not only the max_len newest; padding hits column 0.
            seen, _ = pad_left(sessions, max(len(s) for s in sessions), scores.device)
            scores.scatter_(1, seen, float("-inf"))
        k = min(k, model.num_items)
        top = torch.topk(scores, k, dim=1)
        return top.indices, top.values
