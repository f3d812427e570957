"""Average pooling (fixed windows) and adaptive average pooling (windows from the sizes).

Sums are fp32 whatever the input dtype. Both backward passes are gathers: each input element
sums dy / divisor over the windows that contain it, in a fixed order, without atomics.

With NORMALIZE the average pool's forward pools a BatchNorm (+ ReLU) of x computed on the fly
(padding pads the normalised tensor with zeros, not x): ``kernels.batch_norm`` uses it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastarch import backend

from . import configs
from .launch import Extent, Launch
from .max_pool import Normalization, normalization_extents
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


@triton.jit
def avg_pool_divisor(p, q, H, W, divisor_override,
                     KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                     PH: tl.constexpr, PW: tl.constexpr,
                     COUNT_INCLUDE_PAD: tl.constexpr, HAS_DIVISOR_OVERRIDE: tl.constexpr):
    """torch's divisor for output (p, q): the window clipped to the padded input (with
    count_include_pad) or to the input itself (without), unless overridden."""
    if HAS_DIVISOR_OVERRIDE:
        divisor = tl.zeros_like(p).to(tl.float32) + divisor_override
    else:
        h_start = p * SH - PH
        w_start = q * SW - PW
        h_end = tl.minimum(h_start + KH, H + PH)
        w_end = tl.minimum(w_start + KW, W + PW)
        if COUNT_INCLUDE_PAD:
            divisor = ((h_end - h_start) * (w_end - w_start)).to(tl.float32)
        else:
            rows = tl.minimum(h_end, H) - tl.maximum(h_start, 0)
            cols = tl.minimum(w_end, W) - tl.maximum(w_start, 0)
            divisor = (rows * cols).to(tl.float32)
    return divisor


@triton.jit
def avg_pool2d_forward_kernel(
    x_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, M, C, H, W, P, Q,
    x_sn, x_sh, x_sw, x_sc, y_sn, y_sh, y_sw, y_sc, divisor_override,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    COUNT_INCLUDE_PAD: tl.constexpr, HAS_DIVISOR_OVERRIDE: tl.constexpr,
    NORMALIZE: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    m, c, m_ok, c_ok = pixel_tile(M, C, BLOCK_M, BLOCK_C)
    n, p, q = split_pixel(m, P, Q)
    if NORMALIZE:
        mean = channel_vector(mean_ptr, c, c_ok)
        scale = channel_vector(scale_ptr, c, c_ok)
        shift = channel_vector(shift_ptr, c, c_ok)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for kh in tl.static_range(KH):
        h = p * SH - PH + kh
        h_ok = m_ok & (h >= 0) & (h < H)
        for kw in tl.static_range(KW):
            w = q * SW - PW + kw
            mask = (h_ok & (w >= 0) & (w < W))[:, None] & c_ok[None, :]
            v = tl.load(x_ptr + address(n, h, w, c, x_sn, x_sh, x_sw, x_sc),
                        mask=mask, other=0.0).to(tl.float32)
            if NORMALIZE:
                v = tl.where(mask, normalize(v, mean, scale, shift, RELU), 0.0)
            acc += v
    divisor = avg_pool_divisor(p, q, H, W, divisor_override, KH, KW, SH, SW, PH, PW,
                               COUNT_INCLUDE_PAD, HAS_DIVISOR_OVERRIDE)
    tl.store(y_ptr + address(n, p, q, c, y_sn, y_sh, y_sw, y_sc),
             (acc / divisor[:, None]).to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def avg_pool2d_backward_kernel(
    dy_ptr, dx_ptr, M, C, H, W, P, Q,
    dy_sn, dy_sh, dy_sw, dy_sc, dx_sn, dx_sh, dx_sw, dx_sc, divisor_override,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    COUNT_INCLUDE_PAD: tl.constexpr, HAS_DIVISOR_OVERRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    m, c, m_ok, c_ok = pixel_tile(M, C, BLOCK_M, BLOCK_C)
    n, h, w = split_pixel(m, H, W)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for kh in tl.static_range(KH):
        th = h + PH - kh  # window row p covers h through tap kh iff th == p * SH
        p = th // SH
        p_ok = m_ok & (th >= 0) & (th % SH == 0) & (p < P)
        for kw in tl.static_range(KW):
            tw = w + PW - kw
            q = tw // SW
            window_ok = p_ok & (tw >= 0) & (tw % SW == 0) & (q < Q)
            dy = tl.load(dy_ptr + address(n, p, q, c, dy_sn, dy_sh, dy_sw, dy_sc),
                         mask=window_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            divisor = avg_pool_divisor(p, q, H, W, divisor_override, KH, KW, SH, SW, PH, PW,
                                       COUNT_INCLUDE_PAD, HAS_DIVISOR_OVERRIDE)
            acc += dy / tl.where(window_ok, divisor, 1.0)[:, None]
    tl.store(dx_ptr + address(n, h, w, c, dx_sn, dx_sh, dx_sw, dx_sc),
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def adaptive_window(i, size, out_size):
    """torch's adaptive window of output i along one axis: [floor(i*s/o), ceil((i+1)*s/o))."""
    return (i * size) // out_size, ((i + 1) * size + out_size - 1) // out_size


@triton.jit
def adaptive_avg_pool2d_forward_kernel(
    x_ptr, y_ptr, M, C, H, W, P, Q,
    x_sn, x_sh, x_sw, x_sc, y_sn, y_sh, y_sw, y_sc,
    MAX_KH: tl.constexpr, MAX_KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    m, c, m_ok, c_ok = pixel_tile(M, C, BLOCK_M, BLOCK_C)
    n, p, q = split_pixel(m, P, Q)
    h_start, h_end = adaptive_window(p, H, P)
    w_start, w_end = adaptive_window(q, W, Q)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for kh in tl.static_range(MAX_KH):
        h = h_start + kh
        h_ok = m_ok & (h < h_end)
        for kw in tl.static_range(MAX_KW):
            w = w_start + kw
            mask = (h_ok & (w < w_end))[:, None] & c_ok[None, :]
            acc += tl.load(x_ptr + address(n, h, w, c, x_sn, x_sh, x_sw, x_sc),
                           mask=mask, other=0.0).to(tl.float32)
    area = ((h_end - h_start) * (w_end - w_start)).to(tl.float32)
    tl.store(y_ptr + address(n, p, q, c, y_sn, y_sh, y_sw, y_sc),
             (acc / area[:, None]).to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def adaptive_avg_pool2d_backward_kernel(
    dy_ptr, dx_ptr, M, C, H, W, P, Q,
    dy_sn, dy_sh, dy_sw, dy_sc, dx_sn, dx_sh, dx_sw, dx_sc,
    MAX_WINDOWS_H: tl.constexpr, MAX_WINDOWS_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    m, c, m_ok, c_ok = pixel_tile(M, C, BLOCK_M, BLOCK_C)
    n, h, w = split_pixel(m, H, W)
    # Windows containing h are p in [floor(h*P/H), ceil((h+1)*P/H)): the inverse map.
    p_first, p_stop = adaptive_window(h, P, H)
    q_first, q_stop = adaptive_window(w, Q, W)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for i in tl.static_range(MAX_WINDOWS_H):
        p = p_first + i
        p_ok = m_ok & (p < p_stop)
        h_start, h_end = adaptive_window(p, H, P)
        for j in tl.static_range(MAX_WINDOWS_W):
            q = q_first + j
            window_ok = p_ok & (q < q_stop)
            w_start, w_end = adaptive_window(q, W, Q)
            area = tl.where(window_ok, (h_end - h_start) * (w_end - w_start), 1)
            dy = tl.load(dy_ptr + address(n, p, q, c, dy_sn, dy_sh, dy_sw, dy_sc),
                         mask=window_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            acc += dy / area.to(tl.float32)[:, None]
    tl.store(dx_ptr + address(n, h, w, c, dx_sn, dx_sh, dx_sw, dx_sc),
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------- launchers

def _avg_constexprs(geometry: PoolGeometry, count_include_pad: bool,
                    divisor_override: int | None, config: configs.PoolConfig) -> dict:
    constexprs = geometry.constexprs()
    del constexprs["DH"], constexprs["DW"]
    return {**constexprs, "COUNT_INCLUDE_PAD": bool(count_include_pad),
            "HAS_DIVISOR_OVERRIDE": divisor_override is not None,
            "BLOCK_M": config.block_m, "BLOCK_C": config.block_c}


def _gather_extents(N: int, C: int, H: int, W: int, P: int, Q: int) -> dict[str, Extent]:
    """A backward gather's dy [N, C, P, Q] and dx [N, C, H, W]."""
    return {"dy_ptr": strided_extent("dy", (N, C, P, Q)),
            "dx_ptr": strided_extent("dx", (N, C, H, W))}


def avg_forward_launch(x: torch.Tensor, y: torch.Tensor, geometry: PoolGeometry,
                       count_include_pad: bool, divisor_override: int | None,
                       config: configs.PoolConfig, normalization: Normalization | None = None,
                       relu: bool = False) -> Launch:
    """``normalization``: (mean, scale, shift) fp32 [C] vectors of a BatchNorm applied to x
    (then ReLU if ``relu``) before pooling."""
    N, C, H, W = x.shape
    P, Q = y.shape[2:]
    mean, scale, shift = normalization if normalization is not None else (y, y, y)
    suffix = ("+bn+relu" if relu else "+bn") if normalization is not None else ""
    return Launch(
        avg_pool2d_forward_kernel, grid(N * P * Q, C, config),
        args={"x_ptr": x, "y_ptr": y, "mean_ptr": mean, "scale_ptr": scale,
              "shift_ptr": shift, "M": N * P * Q, "C": C, "H": H, "W": W, "P": P, "Q": Q,
              **strided_args("x", x), **strided_args("y", y),
              "divisor_override": divisor_override or 0},
        extents={"x_ptr": strided_extent("x", (N, C, H, W)),
                 "y_ptr": strided_extent("y", (N, C, P, Q)),
                 **normalization_extents(C, normalization)},
        constexprs={**_avg_constexprs(geometry, count_include_pad, divisor_override, config),
                    "NORMALIZE": normalization is not None, "RELU": relu},
        num_warps=config.num_warps, name=f"avg_pool2d_forward[{config.name}{suffix}]")


def avg_backward_launch(dy: torch.Tensor, dx: torch.Tensor, geometry: PoolGeometry,
                        count_include_pad: bool, divisor_override: int | None,
                        config: configs.PoolConfig) -> Launch:
    N, C, H, W = dx.shape
    P, Q = dy.shape[2:]
    return Launch(
        avg_pool2d_backward_kernel, grid(N * H * W, C, config),
        args={"dy_ptr": dy, "dx_ptr": dx, "M": N * H * W, "C": C, "H": H, "W": W,
              "P": P, "Q": Q, **strided_args("dy", dy), **strided_args("dx", dx),
              "divisor_override": divisor_override or 0},
        extents=_gather_extents(N, C, H, W, P, Q),
        constexprs=_avg_constexprs(geometry, count_include_pad, divisor_override, config),
        num_warps=config.num_warps, name=f"avg_pool2d_backward[{config.name}]")


@functools.lru_cache(maxsize=256)
def adaptive_span(size: int, out_size: int) -> int:
    """The most input rows one adaptive window covers (size -> out_size)."""
    return max(((i + 1) * size + out_size - 1) // out_size - (i * size) // out_size
               for i in range(out_size))


def adaptive_forward_launch(x: torch.Tensor, y: torch.Tensor,
                            config: configs.PoolConfig) -> Launch:
    N, C, H, W = x.shape
    P, Q = y.shape[2:]
    return Launch(
        adaptive_avg_pool2d_forward_kernel, grid(N * P * Q, C, config),
        args={"x_ptr": x, "y_ptr": y, "M": N * P * Q, "C": C, "H": H, "W": W, "P": P, "Q": Q,
              **strided_args("x", x), **strided_args("y", y)},
        extents={"x_ptr": strided_extent("x", (N, C, H, W)),
                 "y_ptr": strided_extent("y", (N, C, P, Q))},
        constexprs={"MAX_KH": adaptive_span(H, P), "MAX_KW": adaptive_span(W, Q),
                    "BLOCK_M": config.block_m, "BLOCK_C": config.block_c},
        num_warps=config.num_warps, name=f"adaptive_avg_pool2d_forward[{config.name}]")


def adaptive_backward_launch(dy: torch.Tensor, dx: torch.Tensor,
                             config: configs.PoolConfig) -> Launch:
    N, C, H, W = dx.shape
    P, Q = dy.shape[2:]
    return Launch(
        adaptive_avg_pool2d_backward_kernel, grid(N * H * W, C, config),
        args={"dy_ptr": dy, "dx_ptr": dx, "M": N * H * W, "C": C, "H": H, "W": W,
              "P": P, "Q": Q, **strided_args("dy", dy), **strided_args("dx", dx)},
        extents=_gather_extents(N, C, H, W, P, Q),
        constexprs={"MAX_WINDOWS_H": adaptive_span(P, H), "MAX_WINDOWS_W": adaptive_span(Q, W),
                    "BLOCK_M": config.block_m, "BLOCK_C": config.block_c},
        num_warps=config.num_warps, name=f"adaptive_avg_pool2d_backward[{config.name}]")


def avg_pool2d_forward(x: torch.Tensor, geometry: PoolGeometry, count_include_pad: bool,
                       divisor_override: int | None) -> torch.Tensor:
    N, C, H, W = x.shape
    P, Q = geometry.output_size(H, W)
    y = backend.empty((N, C, P, Q), x.dtype, x.device, backend.memory_format_of(x))
    config = configs.pool_config(C, backend.INTERPRETER, N * P * Q)
    avg_forward_launch(x, y, geometry, count_include_pad, divisor_override, config)()
    return y


def avg_pool2d_backward(dy: torch.Tensor, input_shape: torch.Size,
                        memory_format: torch.memory_format, geometry: PoolGeometry,
                        count_include_pad: bool, divisor_override: int | None) -> torch.Tensor:
    N, C, H, W = input_shape
    dx = backend.empty(input_shape, dy.dtype, dy.device, memory_format)
    config = configs.pool_config(C, backend.INTERPRETER, N * H * W)
    avg_backward_launch(dy, dx, geometry, count_include_pad, divisor_override, config)()
    return dx


def adaptive_avg_pool2d_forward(x: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    N, C = x.shape[:2]
    y = backend.empty((N, C, *output_size), x.dtype, x.device, backend.memory_format_of(x))
    config = configs.pool_config(C, backend.INTERPRETER, y.numel() // max(C, 1))
    adaptive_forward_launch(x, y, config)()
    return y


def adaptive_avg_pool2d_backward(dy: torch.Tensor, input_shape: torch.Size,
                                 memory_format: torch.memory_format) -> torch.Tensor:
    N, C, H, W = input_shape
    dx = backend.empty(input_shape, dy.dtype, dy.device, memory_format)
    config = configs.pool_config(C, backend.INTERPRETER, N * H * W)
    adaptive_backward_launch(dy, dx, config)()
    return dx


def sm90_launches() -> list[Launch]:
    """Every GPU config: LeNet's 2x2 average pool and AlexNet's adaptive 13x13 -> 6x6."""
    geometry = PoolGeometry((2, 2), (2, 2), (0, 0))
    launches = []
    for dtype in (torch.bfloat16, torch.float32):
        x = meta_tensor((1024, 16, 10, 10), dtype)
        y = meta_tensor((1024, 16, 5, 5), dtype)
        features = meta_tensor((256, 256, 13, 13), dtype)
        pooled = meta_tensor((256, 256, 6, 6), dtype)
        for config in configs.POOL_CONFIGS.values():
            if dtype == torch.float32 and config.name != "c128":
                continue  # fp32 differs from bf16 only in vector width: the widest tile shows it
            launches += [avg_forward_launch(x, y, geometry, True, None, config),
                         avg_backward_launch(y, x, geometry, False, None, config),
                         adaptive_forward_launch(features, pooled, config),
                         adaptive_backward_launch(pooled, features, config)]
    return launches
