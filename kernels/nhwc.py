"""What the memory-bound NHWC kernels share (pools, BatchNorm; the convolutions use the
strided addressing): the [pixels x channels] tile and its grid, NHWC addressing through
explicit strides (so channels_last is the coalesced fast path and NCHW still works), and the
on-the-fly BatchNorm (+ ReLU) a pool can apply to each tap.

Every offset is int64: a pooled activation of 64x64x224x224 is fine in int32, but a batch
of 1024 such images is not, and the extra integer ops are free in a memory-bound kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FLOATING, UNUSED, Extent, TileConfig, dense

# The (mean, scale, shift) fp32 [C] vectors of a BatchNorm a kernel applies on the fly.
Normalization = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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
def pixel_channel_tile(M, C, H, W, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's pixels as (n, h, w) on an [N, H, W] grid of M pixels, its channels,
    and the masks of both."""
    m, c, m_ok, c_ok = pixel_tile(M, C, BLOCK_M, BLOCK_C)
    n, h, w = split_pixel(m, H, W)
    return n, h, w, c, m_ok, c_ok


@triton.jit
def channel_vector(ptr, c, c_ok):
    """A per-channel vector as fp32 (zero on masked channels)."""
    return tl.load(ptr + c, mask=c_ok, other=0.0).to(tl.float32)


@triton.jit
def batch_norm_vectors(mean_ptr, scale_ptr, shift_ptr, c, c_ok):
    """The (mean, scale, shift) fp32 channel vectors of a BatchNorm applied on the fly."""
    return (channel_vector(mean_ptr, c, c_ok), channel_vector(scale_ptr, c, c_ok),
            channel_vector(shift_ptr, c, c_ok))


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


@triton.jit
def store_tile(ptr, value, n, h, w, c, stride_n, stride_h, stride_w, stride_c, m_ok, c_ok):
    """Write a [BLOCK_M, BLOCK_C] tile at pixels (n, h, w) and channels c, in ptr's dtype."""
    tl.store(ptr + address(n, h, w, c, stride_n, stride_h, stride_w, stride_c),
             value.to(ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


def grid(pixels: int, channels: int, tile: TileConfig) -> tuple[int, int]:
    """The programs of a [pixels x channels] pass: ``tile.block_m`` pixels by
    ``tile.block_n`` channels each."""
    return triton.cdiv(pixels, tile.block_m), triton.cdiv(channels, tile.block_n)


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


def normalization_operands(channels: int, normalization: Normalization | None,
                           placeholder: torch.Tensor
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Extent]]:
    """The mean_ptr, scale_ptr and shift_ptr arguments of a kernel that normalises its input
    (``batch_norm_vectors``) and their extents: dense fp32 [C] vectors, or ``placeholder``
    (never read) when ``normalization`` is None."""
    names = ("mean_ptr", "scale_ptr", "shift_ptr")
    if normalization is None:
        return dict.fromkeys(names, placeholder), dict.fromkeys(names, UNUSED)
    return (dict(zip(names, normalization)),
            dict.fromkeys(names, dense(channels, dtypes=(torch.float32,))))


def normalization_mark(normalization: Normalization | None, relu: bool) -> str:
    """What a launch's name says of the BatchNorm (+ ReLU) it applies on the fly."""
    if normalization is None:
        return ""
    return "+bn+relu" if relu else "+bn"
