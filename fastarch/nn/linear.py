"""Linear: torch.nn.Linear with ``forward`` on fastarch's GEMM."""
from __future__ import annotations

import torch
from torch import nn

from fastarch import functional


class Linear(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.linear(input, self.weight, self.bias)
