"""Dropout: torch.nn.Dropout with ``forward`` on fastarch's Philox kernel (the identity in
eval mode)."""
from __future__ import annotations

import torch
from torch import nn

from fastarch import functional


class Dropout(nn.Dropout):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.dropout(input, self.p, self.training, self.inplace)
