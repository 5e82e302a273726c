"""SASRec (Kang & McAuley 2018) as in the TRON reference code; TRON is this network trained with
batch-shared + in-batch negatives, top-k selection and sampled softmax (see negatives.py, train.py).

Tied item embedding scaled by sqrt(d), learned positional embedding anchored at the END of the
session (the newest click always gets the last position vector, so left padding does not shift
anything), pre-LayerNorm transformer blocks with a causal mask, scores = dot products with the
item embedding.
"""

from __future__ import annotations

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

    def forward(self, items: Tensor, mask: Tensor) -> Tensor:
        """items [B, L] left-padded internal ids, mask [B, L] True at real clicks -> hidden [B, L, d].

        Position t's output sees clicks 0..t only; its dot product with item i's embedding is
        the score of i being clicked next.
        """
        length = items.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        x = self.item_emb(items) * math.sqrt(self.hidden) + self.pos_emb.weight[self.max_len - length:]
        x = self.drop(x)
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        # Padding keys are hidden; every query may attend to itself so that padded rows, whose
        # output is never used, do not turn into NaN.
        allowed = (causal & mask[:, None, :]) | torch.eye(length, dtype=torch.bool, device=items.device)
        allowed = allowed[:, None]
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def output_weight(self) -> Tensor:
        """[N+1, d]: row i is item i's output embedding (tied with the input embedding)."""
        return self.item_emb.weight

    def output_rows(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.item_emb.weight)
