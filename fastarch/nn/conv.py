"""Conv2d: torch.nn.Conv2d with ``forward`` on fastarch's implicit-GEMM kernels.

Constructor, parameters, state_dict and extra_repr are torch's. groups > 1 and padding_mode
other than 'zeros' run torch's own convolution (counted in ``backend.fallback_counts``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastarch import backend, functional


class Conv2d(nn.Conv2d):
    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.padding_mode != "zeros":
            backend.count_fallback("conv2d")
            return super()._conv_forward(input, weight, bias)
        return functional.conv2d(input, weight, bias, self.stride, self.padding, self.dilation,
                                 self.groups)
