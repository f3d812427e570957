"""What every pooling kernel shares (max, average, adaptive, and BatchNorm fused into a pool):
the window's geometry; the map between a window's taps and the input positions they read,
along one axis, both ways (a forward reads taps, a backward gathers from the windows that
read it); and the launch over the pixels of the pooled tensor or of the full one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .launch import Extent, Launch, TileConfig
from .nhwc import grid, layout_constexprs, strided_args, strided_extent


@triton.jit
def window_tap(o, k, STRIDE: tl.constexpr, PAD: tl.constexpr, DILATION: tl.constexpr, size):
    """The input position tap ``k`` of window ``o`` reads, and whether it is inside the input
    (not padding). Like ``covering_window``, a position that is not there is 0 (and masked),
    so the offsets of a tile stay inside the images its pixels are in (``window_layout``)."""
    i = o * STRIDE - PAD + k * DILATION
    ok = (i >= 0) & (i < size)
    return tl.where(ok, i, 0), ok


@triton.jit
def covering_window(i, k, STRIDE: tl.constexpr, PAD: tl.constexpr, DILATION: tl.constexpr,
                    out_size):
    """The window whose tap ``k`` reads input position ``i``, and whether there is one:
    ``window_tap`` inverted."""
    t = i + PAD - k * DILATION
    o = t // STRIDE
    ok = (t >= 0) & (t % STRIDE == 0) & (o < out_size)
    return tl.where(ok, o, 0), ok


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


def window_layout(config: TileConfig, full: torch.Tensor, pooled: torch.Tensor,
                  *others: torch.Tensor | None, gather: bool) -> dict[str, bool]:
    """The layout constexprs (``nhwc.layout_constexprs``) of a pooling kernel over ``full``
    [N, C, H, W], ``pooled`` [N, C, P, Q] and ``others`` (None: left out), its programs
    covering the pooled pixels, or the full ones for a backward ``gather``: a tile's int32
    offsets reach every image its pixels are in (window positions are clamped inside the
    image), at most (block_m - 1) // pixels per image + 2 images."""
    H, W = full.shape[2:]
    P, Q = pooled.shape[2:]
    images = (config.block_m - 1) // max(H * W if gather else P * Q, 1) + 2
    return layout_constexprs((full, pooled, *others), config, images * max(H * W, P * Q))


def window_launch(kernel: Any, name: str, config: TileConfig,
                  full: tuple[str, torch.Tensor], pooled: tuple[str, torch.Tensor], *,
                  gather: bool, layout: dict[str, bool], args: dict[str, Any],
                  extents: dict[str, Extent], constexprs: dict[str, Any],
                  mark: str = "") -> Launch:
    """A pooling kernel's launch: ``full`` the (name, tensor) of size [N, C, H, W] (x, or dx)
    and ``pooled`` of size [N, C, P, Q] (y, or dy), each passed with its NHWC strides as
    ``<name>_ptr``, and the sizes M (the pixels the programs cover: the pooled tensor's, or
    the full one's for a backward ``gather``), C, H, W, P, Q; besides ``args``, ``extents``
    and ``constexprs``, the ``layout`` constexprs (``window_layout``) and the tile's blocks.
    Named ``name[<tile><mark>]``."""
    (full_name, full_tensor), (pooled_name, pooled_tensor) = full, pooled
    N, C, H, W = full_tensor.shape
    P, Q = pooled_tensor.shape[2:]
    M = N * H * W if gather else N * P * Q
    dense = layout["DENSE_NHWC"]
    return Launch(
        kernel, grid(M, C, config),
        args={f"{full_name}_ptr": full_tensor, f"{pooled_name}_ptr": pooled_tensor, **args,
              "M": M, "C": C, "H": H, "W": W, "P": P, "Q": Q,
              **strided_args(full_name, full_tensor), **strided_args(pooled_name, pooled_tensor)},
        extents={f"{full_name}_ptr": strided_extent(full_name, (N, C, H, W), dense_nhwc=dense),
                 f"{pooled_name}_ptr": strided_extent(pooled_name, (N, C, P, Q),
                                                      dense_nhwc=dense),
                 **extents},
        constexprs={**constexprs, **layout, "BLOCK_M": config.block_m,
                    "BLOCK_C": config.block_n},
        num_warps=config.num_warps, name=f"{name}[{config.name}{mark}]")
