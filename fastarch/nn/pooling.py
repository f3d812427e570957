"""Pooling modules: torch.nn's own classes with ``forward`` on fastarch's kernels."""
from __future__ import annotations

import torch
from torch import nn

from fastarch import functional


class MaxPool2d(nn.MaxPool2d):
    def forward(self, input: torch.Tensor):
        return functional.max_pool2d(input, self.kernel_size, self.stride, self.padding,
                                     self.dilation, ceil_mode=self.ceil_mode,
                                     return_indices=self.return_indices)


class AvgPool2d(nn.AvgPool2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.avg_pool2d(input, self.kernel_size, self.stride, self.padding,
                                     self.ceil_mode, self.count_include_pad,
                                     self.divisor_override)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.adaptive_avg_pool2d(input, self.output_size)
