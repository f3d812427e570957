"""ReLU, forward and backward, on the flat storage of a dense tensor (contiguous or
channels_last: the element order does not matter to an elementwise op, only that input and
output share it). The forward may write in place (y_ptr == x_ptr). Offsets are int64.

NaN follows torch: relu(NaN) = NaN, and the backward (threshold_backward on the output)
passes the gradient wherever the output is not <= 0, NaN included.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastarch import backend

from . import configs
from .launch import Launch, flat
from .pool_tile import meta_tensor


@triton.jit
def _block(N, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < N


@triton.jit
def relu_forward_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offsets, mask = _block(N, BLOCK)
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(y_ptr + offsets, tl.where(x < 0, 0, x), mask=mask)


@triton.jit
def relu_backward_kernel(y_ptr, dy_ptr, dx_ptr, N, BLOCK: tl.constexpr):
    offsets, mask = _block(N, BLOCK)
    y = tl.load(y_ptr + offsets, mask=mask)
    dy = tl.load(dy_ptr + offsets, mask=mask)
    tl.store(dx_ptr + offsets, tl.where(y <= 0, 0, dy), mask=mask)


def _name(kernel: str, config: configs.ElementwiseConfig, x: torch.Tensor) -> str:
    return f"{kernel}[{config.name},{str(x.dtype).removeprefix('torch.')}]"


def forward_launch(x: torch.Tensor, y: torch.Tensor, config: configs.ElementwiseConfig
                   ) -> Launch:
    N = x.numel()
    return Launch(relu_forward_kernel, (triton.cdiv(N, config.block),),
                  args={"x_ptr": x, "y_ptr": y, "N": N},
                  extents={"x_ptr": flat(N), "y_ptr": flat(N)}, constexprs={"BLOCK": config.block},
                  num_warps=config.num_warps, name=_name("relu_forward", config, x))


def backward_launch(y: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                    config: configs.ElementwiseConfig) -> Launch:
    N = y.numel()
    return Launch(relu_backward_kernel, (triton.cdiv(N, config.block),),
                  args={"y_ptr": y, "dy_ptr": dy, "dx_ptr": dx, "N": N},
                  extents={"y_ptr": flat(N), "dy_ptr": flat(N), "dx_ptr": flat(N)},
                  constexprs={"BLOCK": config.block},
                  num_warps=config.num_warps, name=_name("relu_backward", config, y))


def dense_format(x: torch.Tensor) -> torch.memory_format | None:
    """The memory format whose flat order x is stored in, or None if it is neither."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def relu_forward(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """relu(x); x must be dense (``dense_format`` not None). In place writes into x."""
    y = x if inplace else backend.empty(x.shape, x.dtype, x.device, dense_format(x))
    forward_launch(x, y, configs.relu_config(x.numel(), backend.INTERPRETER))()
    return y


def relu_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dy where y > 0 (or NaN), else 0; y dense, dy in any layout (copied to y's if needed)."""
    fmt = dense_format(y)
    if not dy.is_contiguous(memory_format=fmt):
        dy = dy.contiguous(memory_format=fmt)
    dx = backend.empty(y.shape, dy.dtype, y.device, fmt)
    backward_launch(y, dy, dx, configs.relu_config(y.numel(), backend.INTERPRETER))()
    return dx


def sm90_launches() -> list[Launch]:
    launches = []
    for dtype in (torch.bfloat16, torch.float32):
        x = meta_tensor((64, 256, 56, 56), dtype)
        launches += [forward_launch(x, x, configs.RELU_CONFIG),
                     backward_launch(x, x, x, configs.RELU_CONFIG)]
    return launches
