"""Dropout on Philox: element i is kept when the uniform ``tl.rand(seed, i)`` is at least p,
and scaled by 1 / (1 - p). The seed is an int64 tensor the kernel reads (drawn on the
input's device for every call, so drawing it never waits for the GPU); the mask is never
stored: the backward regenerates it from the same seed. ``dropout_keep`` is the one mask,
shared with the linear GEMM's epilogue, which keys it on the output element's row-major
index; the standalone kernel keys it on the position in memory order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import UNUSED, Extent, Launch, TileConfig, dense, flat


@triton.jit
def dropout_keep(seed_ptr, flat_index, p):
    """The dropout mask of the elements at ``flat_index`` (int64): kept with probability 1 - p."""
    return tl.rand(tl.load(seed_ptr), flat_index) >= p


@triton.jit
def dropout_kernel(x_ptr, y_ptr, seed_ptr, numel, p, scale, BLOCK: tl.constexpr):
    """y = x * mask / (1 - p) over a dense buffer, the mask keyed on the element's position;
    the backward runs it again on dy with the same seed."""
    position = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = position < numel
    x = tl.load(x_ptr + position, mask=ok, other=0.0).to(tl.float32)
    y = tl.where(dropout_keep(seed_ptr, position, p), x * scale, 0.0)
    tl.store(y_ptr + position, y.to(y_ptr.dtype.element_ty), mask=ok)


def dropout_scale(p: float) -> float:
    """1 / (1 - p), and 0 for p = 1 (every element dropped)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def seed_extent(seed: torch.Tensor | None) -> Extent:
    """The one int64 a dropout kernel reads its seed from (``UNUSED`` without dropout)."""
    return UNUSED if seed is None else dense(1, dtypes=(torch.int64,))


def dropout_launch(x: torch.Tensor, y: torch.Tensor, seed: torch.Tensor, p: float,
                   config: TileConfig) -> Launch:
    """y = dropout(x) over the flat storage of dense x and y (one layout; y may be x):
    ``config.block_m`` elements a program."""
    return Launch(dropout_kernel, (triton.cdiv(x.numel(), config.block_m),),
                  args={"x_ptr": x, "y_ptr": y, "seed_ptr": seed, "numel": x.numel(),
                        "p": float(p), "scale": dropout_scale(p)},
                  extents={"x_ptr": flat(x.numel()), "y_ptr": flat(x.numel()),
                           "seed_ptr": seed_extent(seed)},
                  constexprs={"BLOCK": config.block_m}, num_warps=config.num_warps,
                  name=f"dropout[{config.name}]")
