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

from .launch import Launch, TileConfig, flat


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


def _name(kernel: str, config: TileConfig, x: torch.Tensor) -> str:
    return f"{kernel}[{config.name},{str(x.dtype).removeprefix('torch.')}]"


def forward_launch(x: torch.Tensor, y: torch.Tensor, config: TileConfig) -> Launch:
    """y = relu(x) over dense x and y of one layout (y may be x): ``config.block_m``
    elements a program."""
    N = x.numel()
    return Launch(relu_forward_kernel, (triton.cdiv(N, config.block_m),),
                  args={"x_ptr": x, "y_ptr": y, "N": N},
                  extents={"x_ptr": flat(N), "y_ptr": flat(N)},
                  constexprs={"BLOCK": config.block_m},
                  num_warps=config.num_warps, name=_name("relu_forward", config, x))


def backward_launch(y: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                    config: TileConfig) -> Launch:
    """dx = dy where y > 0 (or NaN), else 0, over dense tensors of one layout."""
    N = y.numel()
    return Launch(relu_backward_kernel, (triton.cdiv(N, config.block_m),),
                  args={"y_ptr": y, "dy_ptr": dy, "dx_ptr": dx, "N": N},
                  extents={"y_ptr": flat(N), "dy_ptr": flat(N), "dx_ptr": flat(N)},
                  constexprs={"BLOCK": config.block_m},
                  num_warps=config.num_warps, name=_name("relu_backward", config, y))
