"""GRU4Rec+ (Hidasi & Karatzoglou 2018) as in the TRON reference code: one GRU layer, item
embedding tied between input and output, with an extra output-bias column.

The embedding has width hidden+1: the first `hidden` columns are the input embedding and the
output vector; the last column is the item's output bias, met by a constant 1 appended to the
hidden state. Gradients of the embedding are sparse, so Adagrad only touches the rows a step used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GRU4Rec(nn.Module):
    arch = "gru4rec"

    def __init__(self, num_items: int, *, hidden: int = 100, layers: int = 1, dropout: float = 0.0,
                 max_len: int = 200) -> None:
        super().__init__()
        self.num_items = num_items
        self.hidden = hidden
        self.layers = layers
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden + 1, padding_idx=0, sparse=True)
        nn.init.xavier_uniform_(self.item_emb.weight, gain=1 / math.sqrt(6))
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.gru = nn.GRU(hidden, hidden, layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.zeros(self.layers, batch, self.hidden, device=device)

    def step(self, items: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One click per session: items [B], state [layers, B, d] -> (output [B, d+1], new state)."""
        x = self.item_emb(items)[:, : self.hidden]
        out, state = self.gru(x[:, None], state)
        return self._with_bias(out[:, 0]), state

    def forward(self, items: Tensor, mask: Tensor) -> Tensor:
        """items [B, L] left-padded, mask [B, L] -> hidden [B, L, d+1]. The state stays zero
        through the padding, so each session starts fresh at its first click."""
        state = self.initial_state(items.shape[0], items.device)
        x = self.item_emb(items)[..., : self.hidden]
        outs = []
        for t in range(items.shape[1]):
            out, new = self.gru(x[:, t : t + 1], state)
            keep = mask[:, t][None, :, None]
            state = torch.where(keep, new, state)
            outs.append(out[:, 0])
        return self._with_bias(torch.stack(outs, dim=1))

    @staticmethod
    def _with_bias(h: Tensor) -> Tensor:
        return torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)

    def output_weight(self) -> Tensor:
        """[N+1, d+1]: item vectors with the output bias as last column."""
        return self.item_emb.weight

    def output_rows(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.item_emb.weight, sparse=True)
