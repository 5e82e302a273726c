"""SASRec (Kang & McAuley 2018) as in the TRON reference code; TRON is this network trained with
batch-shared + in-batch negatives, top-k selection and sampled softmax (see negatives.py, train.py).

Tied item embedding scaled by sqrt(d), learned positional embedding anchored at the END of the
session (the newest click always gets the last position vector, so left padding does not shift
anything), pre-LayerNorm transformer blocks with a causal mask, scores = dot products with the
item embedding.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """Pre-LN transformer encoder layer, like nn.TransformerEncoderLayer(norm_first=True) with a
    feed-forward width equal to the model width, as in the reference."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.ff1 = nn.Linear(hidden, hidden)
        self.ff2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, length, d)))
        return x + self.drop(self.ff2(self.drop(F.relu(self.ff1(self.ln2(x))))))

    def forward_ragged(self, x: Tensor, bias: Tensor, last: Tensor | None) -> Tensor:
        """Inference on sessions laid end to end: x [T, d], bias [T, T] 0 where a row may attend
        (its own session's rows up to itself), -inf elsewhere; -> [T, d], or with `last` (row
        indices) those rows' outputs only."""
        d, dh = x.shape[1], x.shape[1] // self.heads
        q, k, v = self.qkv(self.ln1(x)).view(-1, 3, self.heads, dh).permute(1, 2, 0, 3)
        if last is not None:
            q, bias, x = q[:, last], bias[last], x[last]
        # Attention written out: for a few rows, SDPA's masked CPU path costs 2-3x as much.
        a = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=dh**-0.5).softmax(-1) @ v
        x = x + self.proj(a.transpose(0, 1).reshape(-1, d))
        return x + self.ff2(F.relu(self.ff1(self.ln2(x))))

    def forward_packed(self, x: Tensor, kept: Tensor, shape: tuple[int, int], allowed: Tensor,
                       last_only: bool) -> Tensor:
        """Inference on kept positions only: x [T, d] holds the positions `kept` (indices into the
        flattened [B, L] = `shape` batch, ending with the last column's B positions in row order);
        -> the same rows, or with `last_only` the last position's [B, d].

        Only attention mixes positions, so every other layer runs on the T kept rows instead of all
        B * L; queries of positions that are never read are not computed.
        """
        (b, length), d = shape, x.shape[1]
        qkv = x.new_zeros(b * length, 3 * d)  # padding keys stay zero; they are masked anyway
        qkv[kept] = self.qkv(self.ln1(x))
        q, k, v = qkv.view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, allowed = q[:, :, -1:], allowed[:, :, -1:]
            x = x[-b:]  # the last column is kept in every row, so the B last kept positions are it
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)
        x = x + self.proj(a.reshape(b, d) if last_only else a.reshape(b * length, d)[kept])
        return x + self.ff2(F.relu(self.ff1(self.ln2(x))))


class SASRec(nn.Module):
    arch = "sasrec"

    def __init__(self, num_items: int, *, hidden: int = 200, layers: int = 2, heads: int = 1,
                 max_len: int = 50, dropout: float = 0.2) -> None:
        super().__init__()
        self.num_items = num_items
        self.hidden = hidden
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        nn.init.xavier_uniform_(self.item_emb.weight)
        nn.init.xavier_uniform_(self.pos_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self._masks: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def _embed(self, items: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """-> (input embeddings [B, L, d], attention mask [B, 1, L, L] of the keys each query sees)."""
        length = items.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        x = self.item_emb(items) * math.sqrt(self.hidden) + self.pos_emb.weight[self.max_len - length:]
        causal, diagonal = self._causal(length, items.device)
        # Padding keys are hidden; every query may attend to itself so that padded rows, whose
        # output is never used, do not turn into NaN. (The diagonal lies inside the causal mask.)
        allowed = causal & (mask[:, None, :] | diagonal)
        return x, allowed[:, None]

    def _causal(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The [L, L] causal and diagonal masks, made once per length: serving asks for a few
        lengths over and over, and four tensor operations per call cost more than the lookup."""
        key = (length, device)
        masks = self._masks.get(key)
        if masks is None:
            with torch.inference_mode(False):  # plain tensors, usable in training and inference alike
                masks = (torch.ones(length, length, dtype=torch.bool, device=device).tril(),
                         torch.eye(length, dtype=torch.bool, device=device))
            self._masks[key] = masks
        return masks

    def forward(self, items: Tensor, mask: Tensor) -> Tensor:
        """items [B, L] left-padded internal ids, mask [B, L] True at real clicks -> hidden [B, L, d].

        Position t's output sees clicks 0..t only; its dot product with item i's embedding is
        the score of i being clicked next.
        """
        x, allowed = self._embed(items, mask)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def forward_last(self, items: Tensor, mask: Tensor) -> Tensor:
        """Inference only: forward(items, mask)[:, -1], the hidden state after the newest click [B, d].

        Sessions are short next to a batch's longest (Diginetica: ~3 clicks padded to ~9 in a
        batch of 16), so the position-wise layers run on real clicks only, and the last block
        computes the last position alone.
        """
        if self.training:
            raise RuntimeError("forward_last is for inference; call eval() first")
        keep = mask.clone()
        keep[:, -1] = True  # an empty session is read at its last position too, as in forward
        # Kept positions column-major, so that the last column's B positions come last.
        column_row = keep.T.nonzero()
        kept = column_row[:, 1] * items.shape[1] + column_row[:, 0]
        x, allowed = self._embed(items, mask)
        x = x.reshape(-1, self.hidden)[kept]
        for i, block in enumerate(self.blocks):
            x = block.forward_packed(x, kept, items.shape, allowed, last_only=i == len(self.blocks) - 1)
        return self.norm(x)

    def forward_ragged(self, sessions: list[list[int]]) -> Tensor:
        """Inference only: the hidden state after each session's newest click [B, d], as
        forward_last gives, from unpadded sessions of internal ids.

        The sessions' clicks lie end to end (T rows) and a block-diagonal causal mask keeps each to
        its own session: ~40 operator calls for any batch, where padding, packing and unpacking take
        ~150 (on a CPU, 18 % less time for a live batch of 1-4 sessions; benchmarks/compute.py).
        Attention over all T rows grows as T^2, so large batches take forward_last.
        """
        if self.training:
            raise RuntimeError("forward_ragged is for inference; call eval() first")
        # An empty session is read at the last position, over padding, as in forward.
        cut = [s[-self.max_len:] if s and self.max_len else [0] for s in sessions]
        ids = [i for s in cut for i in s]
        index = torch.tensor(
            [ids, [p for s in cut for p in range(self.max_len - len(s), self.max_len)],
             [b for b, s in enumerate(cut) for _ in s]], device=self.item_emb.weight.device)
        ends = torch.tensor(list(itertools.accumulate(map(len, cut))), device=index.device) - 1
        x = F.embedding(index[0], self.item_emb.weight) * math.sqrt(self.hidden) + F.embedding(
            index[1], self.pos_emb.weight)
        # Same session, and a key no later than its query (positions rise within a session).
        allowed = (index[2, :, None] == index[2]) & (index[1, :, None] >= index[1])
        bias = torch.where(allowed, 0.0, float("-inf"))
        for i, block in enumerate(self.blocks):
            x = block.forward_ragged(x, bias, ends if i == len(self.blocks) - 1 else None)
        return self.norm(x)

    def output_weight(self) -> Tensor:
        """[N+1, d]: row i is item i's output embedding (tied with the input embedding)."""
        return self.item_emb.weight

    def output_rows(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.item_emb.weight)
