"""What the pooling kernels share: the [pixels x channels] tile, NHWC addressing through
explicit strides (so channels_last is the coalesced fast path and NCHW still works), the
window geometry and the grid.

Every offset is int64: a pooled activation of 64x64x224x224 is fine in int32, but a batch
of 1024 such images is not, and the extra integer ops are free in a memory-bound kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .configs import PoolConfig
from .launch import FLOATING, Extent


@triton.jit
def pixel_tile(M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's rows (flattened N*H*W pixels, int64) and channels, with their masks."""
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    return m, c, m < M, c < C


@triton.jit
def split_pixel(m, H, W):
    """Flattened pixel index -> (n, h, w) on an [N, H, W] grid."""
    w = m % W
    t = m // W
    return t // H, t % H, w


@triton.jit
def channel_vector(ptr, c, c_ok):
    """A per-channel vector as fp32 (zero on masked channels)."""
    return tl.load(ptr + c, mask=c_ok, other=0.0).to(tl.float32)


@triton.jit
def normalize(x, mean, scale, shift, RELU: tl.constexpr):
    """(x - mean) * scale + shift on a [BLOCK_M, BLOCK_C] tile (a BatchNorm with its
    statistics folded in); ReLU keeps NaN, as torch."""
    z = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    if RELU:
        z = tl.where(z < 0.0, 0.0, z)
    return z


@triton.jit
def address(n, h, w, c, stride_n, stride_h, stride_w, stride_c):
    """[BLOCK_M, BLOCK_C] element offsets of pixels (n, h, w) and channels c."""
    return (n * stride_n + h * stride_h + w * stride_w)[:, None] + (c * stride_c)[None, :]


@dataclass(frozen=True)
class PoolGeometry:
    """A pooling window: kernel, stride, padding, dilation per axis, and the rounding mode."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return (_pooled_length(height, self.kernel[0], self.stride[0], self.padding[0],
                               self.dilation[0], self.ceil_mode),
                _pooled_length(width, self.kernel[1], self.stride[1], self.padding[1],
                               self.dilation[1], self.ceil_mode))

    def constexprs(self) -> dict[str, int]:
        return {"KH": self.kernel[0], "KW": self.kernel[1], "SH": self.stride[0],
                "SW": self.stride[1], "PH": self.padding[0], "PW": self.padding[1],
                "DH": self.dilation[0], "DW": self.dilation[1]}


def _pooled_length(size: int, kernel: int, stride: int, pad: int, dilation: int,
                   ceil_mode: bool) -> int:
    """torch's rule: in ceil mode the last window must start inside the input or left padding."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    length = span // stride + 1
    if ceil_mode and (length - 1) * stride >= size + pad:
        length -= 1
    return length


def nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(n, h, w, c) strides of a 4-D NCHW-shaped tensor, whatever its memory format."""
    sn, sc, sh, sw = t.stride()
    return sn, sh, sw, sc


def strided_args(prefix: str, t: torch.Tensor) -> dict[str, int]:
    sn, sh, sw, sc = nhwc_strides(t)
    return {f"{prefix}_sn": sn, f"{prefix}_sh": sh, f"{prefix}_sw": sw, f"{prefix}_sc": sc}


def strided_extent(prefix: str, shape: tuple[int, int, int, int],
                   dtypes: tuple[torch.dtype, ...] = FLOATING) -> Extent:
    """The [N, C, H, W] ``shape`` a kernel indexes through the strides ``strided_args(prefix,
    ...)`` passed it."""
    return Extent(tuple(shape), (f"{prefix}_sn", f"{prefix}_sc", f"{prefix}_sh", f"{prefix}_sw"),
                  dtypes)


def grid(pixels: int, channels: int, config: PoolConfig) -> tuple[int, int]:
    return triton.cdiv(pixels, config.block_m), triton.cdiv(channels, config.block_c)


def meta_tensor(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = True
                ) -> torch.Tensor:
    """A shape-and-stride-only tensor for building launches that are compiled, not run."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)
