"""Max pooling, forward and backward.

Forward keeps, per output element, the position of its maximum inside the window as a
compact window offset (kh * KW + kw, int8 for windows up to 127 elements) instead of
torch's int64 flat index; the int64 indices are written only when the caller asks for them.

Backward is a gather, not a scatter: each input element visits the (at most KH*KW) windows
that contain it and sums the gradients of those whose stored offset points back at it. No
atomics, a fixed summation order: bitwise deterministic, overlapping windows included.

NaN propagates as in torch: a NaN always wins the comparison, and the last NaN of a window
is the one whose position is kept.

With NORMALIZE the forward pools a BatchNorm (+ ReLU) of x, (x - mean) * scale + shift,
computed on the fly: the normalised tensor is never written (``kernels.batch_norm``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastarch import backend

from . import configs
from .launch import UNUSED, Extent, Launch, dense
from .pool_tile import (
    PoolGeometry,
    address,
    channel_vector,
    grid,
    meta_tensor,
    normalize,
    pixel_tile,
    split_pixel,
    strided_args,
    strided_extent,
)

WINDOW_OFFSET_DTYPES = (torch.int8, torch.int16, torch.int32)


@triton.jit
def max_pool2d_forward_kernel(
    x_ptr, y_ptr, offset_ptr, index_ptr, mean_ptr, scale_ptr, shift_ptr,
    M, C, H, W, P, Q,
    x_sn, x_sh, x_sw, x_sc, y_sn, y_sh, y_sw, y_sc,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    WRITE_OFFSETS: tl.constexpr, WRITE_INDICES: tl.constexpr,
    NORMALIZE: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    m, c, m_ok, c_ok = pixel_tile(M, C, BLOCK_M, BLOCK_C)
    n, p, q = split_pixel(m, P, Q)
    if NORMALIZE:
        mean = channel_vector(mean_ptr, c, c_ok)
        scale = channel_vector(scale_ptr, c, c_ok)
        shift = channel_vector(shift_ptr, c, c_ok)
    h0 = p * SH - PH
    w0 = q * SW - PW
    best = tl.full((BLOCK_M, BLOCK_C), float("-inf"), tl.float32)
    best_offset = tl.full((BLOCK_M, BLOCK_C), -1, tl.int32)
    for kh in tl.static_range(KH):
        h = h0 + kh * DH
        h_ok = m_ok & (h >= 0) & (h < H)
        for kw in tl.static_range(KW):
            w = w0 + kw * DW
            mask = (h_ok & (w >= 0) & (w < W))[:, None] & c_ok[None, :]
            if NORMALIZE:
                x = tl.load(x_ptr + address(n, h, w, c, x_sn, x_sh, x_sw, x_sc), mask=mask,
                            other=0.0).to(tl.float32)
                v = tl.where(mask, normalize(x, mean, scale, shift, RELU), float("-inf"))
            else:
                v = tl.load(x_ptr + address(n, h, w, c, x_sn, x_sh, x_sw, x_sc), mask=mask,
                            other=float("-inf")).to(tl.float32)
            # The first valid element seeds the window (so an all -inf window keeps a real
            # position); after it a strictly greater value or any NaN takes over, as in torch.
            take = mask & ((v > best) | (v != v) | (best_offset < 0))
            best = tl.where(take, v, best)
            best_offset = tl.where(take, kh * KW + kw, best_offset)
    out = address(n, p, q, c, y_sn, y_sh, y_sw, y_sc)
    out_mask = m_ok[:, None] & c_ok[None, :]
    tl.store(y_ptr + out, best.to(y_ptr.dtype.element_ty), mask=out_mask)
    if WRITE_OFFSETS:
        tl.store(offset_ptr + out, best_offset.to(offset_ptr.dtype.element_ty), mask=out_mask)
    if WRITE_INDICES:
        h = h0[:, None] + (best_offset // KW) * DH
        w = w0[:, None] + (best_offset % KW) * DW
        tl.store(index_ptr + out, h * W + w, mask=out_mask)


@triton.jit
def max_pool2d_backward_kernel(
    dy_ptr, offset_ptr, dx_ptr,
    M, C, H, W, P, Q,
    dy_sn, dy_sh, dy_sw, dy_sc, o_sn, o_sh, o_sw, o_sc, dx_sn, dx_sh, dx_sw, dx_sc,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    m, c, m_ok, c_ok = pixel_tile(M, C, BLOCK_M, BLOCK_C)
    n, h, w = split_pixel(m, H, W)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for kh in tl.static_range(KH):
        th = h + PH - kh * DH  # window row p covers h through tap kh iff th == p * SH
        p = th // SH
        p_ok = m_ok & (th >= 0) & (th % SH == 0) & (p < P)
        for kw in tl.static_range(KW):
            tw = w + PW - kw * DW
            q = tw // SW
            mask = (p_ok & (tw >= 0) & (tw % SW == 0) & (q < Q))[:, None] & c_ok[None, :]
            offset = tl.load(offset_ptr + address(n, p, q, c, o_sn, o_sh, o_sw, o_sc),
                             mask=mask, other=-1)
            hit = mask & (offset == kh * KW + kw)
            acc += tl.load(dy_ptr + address(n, p, q, c, dy_sn, dy_sh, dy_sw, dy_sc),
                           mask=hit, other=0.0).to(tl.float32)
    tl.store(dx_ptr + address(n, h, w, c, dx_sn, dx_sh, dx_sw, dx_sc),
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


Normalization = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def normalization_extents(channels: int, normalization: Normalization | None
                          ) -> dict[str, Extent]:
    """The (mean, scale, shift) arguments of a pool that normalises its input: dense fp32
    [C] vectors, or unused placeholders."""
    extent = UNUSED if normalization is None else dense(channels, dtypes=(torch.float32,))
    return {"mean_ptr": extent, "scale_ptr": extent, "shift_ptr": extent}


def window_offset_dtype(geometry: PoolGeometry) -> torch.dtype:
    taps = geometry.kernel[0] * geometry.kernel[1]
    return torch.int8 if taps <= 127 else torch.int16 if taps <= 32767 else torch.int32


def forward_launch(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor | None,
                   indices: torch.Tensor | None, geometry: PoolGeometry,
                   config: configs.PoolConfig, normalization: Normalization | None = None,
                   relu: bool = False) -> Launch:
    """``normalization``: (mean, scale, shift) fp32 [C] vectors of a BatchNorm applied to x
    (then ReLU if ``relu``) before pooling."""
    N, C, H, W = x.shape
    P, Q = y.shape[2:]
    M = N * P * Q
    mean, scale, shift = normalization if normalization is not None else (y, y, y)
    suffix = ("+bn+relu" if relu else "+bn") if normalization is not None else ""
    return Launch(
        max_pool2d_forward_kernel, grid(M, C, config),
        args={"x_ptr": x, "y_ptr": y, "offset_ptr": offsets if offsets is not None else y,
              "index_ptr": indices if indices is not None else y,
              "mean_ptr": mean, "scale_ptr": scale, "shift_ptr": shift,
              "M": M, "C": C, "H": H, "W": W, "P": P, "Q": Q,
              **strided_args("x", x), **strided_args("y", y)},
        extents={"x_ptr": strided_extent("x", (N, C, H, W)),
                 "y_ptr": strided_extent("y", (N, C, P, Q)),
                 # Offsets and indices are stored at y's strides: they must share its layout.
                 "offset_ptr": UNUSED if offsets is None
                 else strided_extent("y", (N, C, P, Q), WINDOW_OFFSET_DTYPES),
                 "index_ptr": UNUSED if indices is None
                 else strided_extent("y", (N, C, P, Q), (torch.int64,)),
                 **normalization_extents(C, normalization)},
        constexprs={**geometry.constexprs(), "WRITE_OFFSETS": offsets is not None,
                    "WRITE_INDICES": indices is not None,
                    "NORMALIZE": normalization is not None, "RELU": relu,
                    "BLOCK_M": config.block_m, "BLOCK_C": config.block_c},
        num_warps=config.num_warps, name=f"max_pool2d_forward[{config.name}{suffix}]")


def backward_launch(dy: torch.Tensor, offsets: torch.Tensor, dx: torch.Tensor,
                    geometry: PoolGeometry, config: configs.PoolConfig) -> Launch:
    N, C, H, W = dx.shape
    P, Q = dy.shape[2:]
    M = N * H * W
    return Launch(
        max_pool2d_backward_kernel, grid(M, C, config),
        args={"dy_ptr": dy, "offset_ptr": offsets, "dx_ptr": dx,
              "M": M, "C": C, "H": H, "W": W, "P": P, "Q": Q,
              **strided_args("dy", dy), **strided_args("o", offsets), **strided_args("dx", dx)},
        extents={"dy_ptr": strided_extent("dy", (N, C, P, Q)),
                 "offset_ptr": strided_extent("o", (N, C, P, Q), WINDOW_OFFSET_DTYPES),
                 "dx_ptr": strided_extent("dx", (N, C, H, W))},
        constexprs={**geometry.constexprs(), "BLOCK_M": config.block_m,
                    "BLOCK_C": config.block_c},
        num_warps=config.num_warps, name=f"max_pool2d_backward[{config.name}]")


def max_pool2d_forward(x: torch.Tensor, geometry: PoolGeometry, keep_offsets: bool,
                       return_indices: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """y, the window offsets (if ``keep_offsets``, for backward) and torch's int64 indices
    (if ``return_indices``) of a 4-D input; outputs take the input's memory format."""
    N, C, H, W = x.shape
    P, Q = geometry.output_size(H, W)
    fmt = backend.memory_format_of(x)
    y = backend.empty((N, C, P, Q), x.dtype, x.device, fmt)
    offsets = (backend.empty((N, C, P, Q), window_offset_dtype(geometry), x.device, fmt)
               if keep_offsets else None)
    indices = backend.empty((N, C, P, Q), torch.int64, x.device, fmt) if return_indices else None
    config = configs.pool_config(C, backend.INTERPRETER, N * P * Q)
    forward_launch(x, y, offsets, indices, geometry, config)()
    return y, offsets, indices


def max_pool2d_backward(dy: torch.Tensor, offsets: torch.Tensor, input_shape: torch.Size,
                        memory_format: torch.memory_format, geometry: PoolGeometry
                        ) -> torch.Tensor:
    N, C, H, W = input_shape
    dx = backend.empty(input_shape, dy.dtype, dy.device, memory_format)
    config = configs.pool_config(C, backend.INTERPRETER, N * H * W)
    backward_launch(dy, offsets, dx, geometry, config)()
    return dx


def sm90_launches() -> list[Launch]:
    """Every GPU config, on AlexNet's overlapping 3x3 stride-2 window (the most taps)."""
    geometry = PoolGeometry((3, 3), (2, 2), (0, 0))
    launches = []
    for dtype in (torch.bfloat16, torch.float32):
        x = meta_tensor((128, 64, 55, 55), dtype)
        y = meta_tensor((128, 64, 27, 27), dtype)
        offsets = meta_tensor((128, 64, 27, 27), torch.int8)
        for config in configs.POOL_CONFIGS.values():
            if dtype == torch.float32 and config.name != "c128":
                continue  # fp32 differs from bf16 only in vector width: the widest tile shows it
            launches.append(forward_launch(x, y, offsets, None, geometry, config))
            launches.append(backward_launch(y, offsets, x, geometry, config))
    return launches
