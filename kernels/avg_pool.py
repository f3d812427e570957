"""Average pooling (fixed windows) and adaptive average pooling (windows from the sizes).

Sums are fp32 whatever the input dtype. Both backward passes are gathers: each input element
sums dy / divisor over the windows that contain it, in a fixed order, without atomics.

With NORMALIZE the average pool's forward pools a BatchNorm (+ ReLU) of x computed on the fly
(padding pads the normalised tensor with zeros, not x): a BatchNorm fused into the pool.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import Launch, TileConfig
from .nhwc import (Normalization, batch_norm_vectors, load_tile, nhwc_offsets,
                   normalization_mark, normalization_operands, normalize, pixel_channel_tile,
                   store_tile)
from .pool_geometry import (PoolGeometry, covering_window, window_launch, window_layout,
                            window_tap)


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
    DENSE_NHWC: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n0, n, p, q, c, m_ok, c_ok = pixel_channel_tile(M, C, P, Q, EVEN_C, BLOCK_M, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    if NORMALIZE:
        mean, scale, shift = batch_norm_vectors(mean_ptr, scale_ptr, shift_ptr, c, c_ok)
    for kh in tl.static_range(KH):
        h, h_ok = window_tap(p, kh, SH, PH, 1, H)
        for kw in tl.static_range(KW):
            w, w_ok = window_tap(q, kw, SW, PW, 1, W)
            mask = (m_ok & h_ok & w_ok)[:, None] & c_ok[None, :]
            v = load_tile(x_ptr, nhwc_offsets(n0, n, h, w, c, H, W, C, x_sn, x_sh, x_sw, x_sc,
                                              DENSE_NHWC), mask)
            if NORMALIZE:
                v = tl.where(mask, normalize(v, mean, scale, shift, RELU), 0.0)
            acc += v
    divisor = avg_pool_divisor(p, q, H, W, divisor_override, KH, KW, SH, SW, PH, PW,
                               COUNT_INCLUDE_PAD, HAS_DIVISOR_OVERRIDE)
    store_tile(y_ptr, acc / divisor[:, None],
               nhwc_offsets(n0, n, p, q, c, P, Q, C, y_sn, y_sh, y_sw, y_sc, DENSE_NHWC),
               m_ok[:, None] & c_ok[None, :])


@triton.jit
def avg_pool2d_backward_kernel(
    dy_ptr, dx_ptr, M, C, H, W, P, Q,
    dy_sn, dy_sh, dy_sw, dy_sc, dx_sn, dx_sh, dx_sw, dx_sc, divisor_override,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    COUNT_INCLUDE_PAD: tl.constexpr, HAS_DIVISOR_OVERRIDE: tl.constexpr,
    DENSE_NHWC: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n0, n, h, w, c, m_ok, c_ok = pixel_channel_tile(M, C, H, W, EVEN_C, BLOCK_M, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for kh in tl.static_range(KH):
        p, p_ok = covering_window(h, kh, SH, PH, 1, P)
        for kw in tl.static_range(KW):
            q, q_ok = covering_window(w, kw, SW, PW, 1, Q)
            window_ok = m_ok & p_ok & q_ok
            dy = load_tile(dy_ptr, nhwc_offsets(n0, n, p, q, c, P, Q, C, dy_sn, dy_sh, dy_sw,
                                                dy_sc, DENSE_NHWC),
                           window_ok[:, None] & c_ok[None, :])
            divisor = avg_pool_divisor(p, q, H, W, divisor_override, KH, KW, SH, SW, PH, PW,
                                       COUNT_INCLUDE_PAD, HAS_DIVISOR_OVERRIDE)
            acc += dy / tl.where(window_ok, divisor, 1.0)[:, None]
    store_tile(dx_ptr, acc, nhwc_offsets(n0, n, h, w, c, H, W, C, dx_sn, dx_sh, dx_sw, dx_sc,
                                         DENSE_NHWC), m_ok[:, None] & c_ok[None, :])


@triton.jit
def adaptive_window(i, size, out_size):
    """torch's adaptive window of output i along one axis: [floor(i*s/o), ceil((i+1)*s/o))."""
    return (i * size) // out_size, ((i + 1) * size + out_size - 1) // out_size


@triton.jit
def adaptive_tap(o, k, size, out_size):
    """Position ``k`` of adaptive window ``o`` (``size`` -> ``out_size``) and whether it lies
    inside the window (a position past it is the window's start, masked: offsets stay inside
    the tensor). With the sizes swapped, the windows that contain input position ``o`` are
    ``adaptive_tap(o, k, out_size, size)``: the inverse map."""
    start, end = adaptive_window(o, size, out_size)
    inside = start + k < end
    return tl.where(inside, start + k, start), inside


@triton.jit
def adaptive_area(p, q, H, W, P, Q):
    """How many input elements adaptive window (p, q) averages, as fp32."""
    h_start, h_end = adaptive_window(p, H, P)
    w_start, w_end = adaptive_window(q, W, Q)
    return ((h_end - h_start) * (w_end - w_start)).to(tl.float32)


@triton.jit
def adaptive_avg_pool2d_kernel(
    src_ptr, dst_ptr, M, C, H, W, P, Q,
    src_sn, src_sh, src_sw, src_sc, dst_sn, dst_sh, dst_sw, dst_sc,
    SPAN_H: tl.constexpr, SPAN_W: tl.constexpr, BACKWARD: tl.constexpr,
    DENSE_NHWC: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Forward (src x [N, C, H, W], dst y [N, C, P, Q]): y at (p, q) is the mean of x over
    adaptive window (p, q). Backward, its transpose (src dy, dst dx): dx at (h, w) sums
    dy / area over the windows that contain (h, w). SPAN_H x SPAN_W: the most taps of a
    window (forward) or windows over a position (backward)."""
    if BACKWARD:
        rows, cols, src_rows, src_cols = H, W, P, Q
    else:
        rows, cols, src_rows, src_cols = P, Q, H, W
    n0, n, i, j, c, m_ok, c_ok = pixel_channel_tile(M, C, rows, cols, EVEN_C, BLOCK_M, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for k in tl.static_range(SPAN_H):
        a, a_ok = adaptive_tap(i, k, src_rows, rows)
        for l in tl.static_range(SPAN_W):
            b, b_ok = adaptive_tap(j, l, src_cols, cols)
            ok = m_ok & a_ok & b_ok
            v = load_tile(src_ptr, nhwc_offsets(n0, n, a, b, c, src_rows, src_cols, C, src_sn,
                                                src_sh, src_sw, src_sc, DENSE_NHWC),
                          ok[:, None] & c_ok[None, :])
            if BACKWARD:
                v = v / tl.where(ok, adaptive_area(a, b, H, W, P, Q), 1.0)[:, None]
            acc += v
    if BACKWARD:
        out = acc
    else:
        out = acc / adaptive_area(i, j, H, W, P, Q)[:, None]
    store_tile(dst_ptr, out, nhwc_offsets(n0, n, i, j, c, rows, cols, C, dst_sn, dst_sh, dst_sw,
                                          dst_sc, DENSE_NHWC), m_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------- launchers

def _avg_constexprs(geometry: PoolGeometry, count_include_pad: bool,
                    divisor_override: int | None) -> dict:
    constexprs = geometry.constexprs()
    del constexprs["DH"], constexprs["DW"]
    return {**constexprs, "COUNT_INCLUDE_PAD": bool(count_include_pad),
            "HAS_DIVISOR_OVERRIDE": divisor_override is not None}


def avg_forward_launch(x: torch.Tensor, y: torch.Tensor, geometry: PoolGeometry,
                       count_include_pad: bool, divisor_override: int | None,
                       config: TileConfig, normalization: Normalization | None = None,
                       relu: bool = False) -> Launch:
    """y of an average pool of x; ``normalization``: (mean, scale, shift) fp32 [C] vectors
    of a BatchNorm applied to x (then ReLU if ``relu``) before pooling."""
    vectors, vector_extents = normalization_operands(x.shape[1], normalization, y)
    return window_launch(
        avg_pool2d_forward_kernel, "avg_pool2d_forward", config, ("x", x), ("y", y),
        gather=False, layout=window_layout(config, x, y, gather=False),
        args={**vectors, "divisor_override": divisor_override or 0}, extents=vector_extents,
        constexprs={**_avg_constexprs(geometry, count_include_pad, divisor_override),
                    "NORMALIZE": normalization is not None, "RELU": relu},
        mark=normalization_mark(normalization, relu))


def avg_backward_launch(dy: torch.Tensor, dx: torch.Tensor, geometry: PoolGeometry,
                        count_include_pad: bool, divisor_override: int | None,
                        config: TileConfig) -> Launch:
    """dx of an average pool from dy."""
    return window_launch(
        avg_pool2d_backward_kernel, "avg_pool2d_backward", config, ("dx", dx), ("dy", dy),
        gather=True, layout=window_layout(config, dx, dy, gather=True),
        args={"divisor_override": divisor_override or 0}, extents={},
        constexprs=_avg_constexprs(geometry, count_include_pad, divisor_override))


@functools.lru_cache(maxsize=256)
def adaptive_span(size: int, out_size: int) -> int:
    """The most input rows one adaptive window covers (size -> out_size); with the sizes
    swapped, the most windows that cover one input row."""
    return max(((i + 1) * size + out_size - 1) // out_size - (i * size) // out_size
               for i in range(out_size))


def adaptive_forward_launch(x: torch.Tensor, y: torch.Tensor, config: TileConfig) -> Launch:
    """y of an adaptive average pool of x (its size is y's)."""
    return _adaptive_launch(x, y, config, backward=False)


def adaptive_backward_launch(dy: torch.Tensor, dx: torch.Tensor, config: TileConfig) -> Launch:
    """dx of an adaptive average pool from dy."""
    return _adaptive_launch(dx, dy, config, backward=True)


def _adaptive_launch(full: torch.Tensor, pooled: torch.Tensor, config: TileConfig,
                     backward: bool) -> Launch:
    """The adaptive kernel from x to y (full to pooled) or, ``backward``, from dy to dx."""
    (H, W), (P, Q) = full.shape[2:], pooled.shape[2:]
    spans = (adaptive_span(P, H), adaptive_span(Q, W)) if backward \
        else (adaptive_span(H, P), adaptive_span(W, Q))
    full_role, pooled_role = ("dst", "src") if backward else ("src", "dst")
    return window_launch(
        adaptive_avg_pool2d_kernel,
        f"adaptive_avg_pool2d_{'backward' if backward else 'forward'}", config,
        (full_role, full), (pooled_role, pooled), gather=backward,
        layout=window_layout(config, full, pooled, gather=backward), args={}, extents={},
        constexprs={"SPAN_H": spans[0], "SPAN_W": spans[1], "BACKWARD": backward})
