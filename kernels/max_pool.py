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
computed on the fly: a BatchNorm fused into the pool, whose normalised tensor is never
written. Its backward can fold BatchNorm's (``PoolGradFold``, BN_GRAD): the gathered
gradient of the normalised tensor is ReLU-masked, stored as x's gradient at fixed statistics,
and summed per channel into one row per program of pixels, which the caller adds in order.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import UNUSED, Launch, TileConfig, dense
from .nhwc import (Normalization, batch_norm_vectors, load_tile, nhwc_offsets,
                   normalization_mark, normalization_operands, normalize, normalize_grad,
                   pixel_channel_tile, store_tile, strided_args, strided_extent)
from .pool_geometry import (PoolGeometry, covering_window, window_launch, window_layout,
                            window_tap)

WINDOW_OFFSET_DTYPES = (torch.int8, torch.int16, torch.int32)
# The backward's operands that only BN_GRAD reads: None (constexprs) without a fold, so the
# kernel compiles exactly as it does without them.
FOLD_OPERANDS = ("x_ptr", "mean_ptr", "scale_ptr", "shift_ptr", "sums_ptr",
                 "x_sn", "x_sh", "x_sw", "x_sc")


class PoolGradFold(NamedTuple):
    """BatchNorm's backward folded into the max pool's, for a pool that read x through a
    BatchNorm (+ ReLU) (``forward_launch``'s ``normalization`` and ``relu``): the gathered
    dz, the gradient of relu?((x - mean) * scale + shift), becomes du = dz zeroed where the
    ReLU was off (``normalize``'s own fp32 arithmetic <= 0, as ``nhwc.normalize_grad``; no
    mask without ``relu``), dx receives du * scale (x's gradient at fixed statistics), and
    each program writes its fp32 per-channel sums of du and of du * (x - mean) to its row of
    ``sums`` (its program along the pixels; dense [``backward_sum_rows``, 2, C] fp32, every
    row written; the caller sums the rows in order). ``x``: dx's shape, any strides;
    ``normalization``: (mean, scale, shift) fp32 [C] dense vectors."""
    x: torch.Tensor
    normalization: Normalization
    relu: bool
    sums: torch.Tensor


@triton.jit
def max_pool2d_forward_kernel(
    x_ptr, y_ptr, offset_ptr, index_ptr, mean_ptr, scale_ptr, shift_ptr,
    M, C, H, W, P, Q,
    x_sn, x_sh, x_sw, x_sc, y_sn, y_sh, y_sw, y_sc,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    WRITE_OFFSETS: tl.constexpr, WRITE_INDICES: tl.constexpr,
    NORMALIZE: tl.constexpr, RELU: tl.constexpr,
    DENSE_NHWC: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n0, n, p, q, c, m_ok, c_ok = pixel_channel_tile(M, C, P, Q, EVEN_C, BLOCK_M, BLOCK_C)
    best = tl.full((BLOCK_M, BLOCK_C), float("-inf"), tl.float32)
    best_offset = tl.full((BLOCK_M, BLOCK_C), -1, tl.int32)
    if NORMALIZE:
        mean, scale, shift = batch_norm_vectors(mean_ptr, scale_ptr, shift_ptr, c, c_ok)
    for kh in tl.static_range(KH):
        h, h_ok = window_tap(p, kh, SH, PH, DH, H)
        for kw in tl.static_range(KW):
            w, w_ok = window_tap(q, kw, SW, PW, DW, W)
            mask = (m_ok & h_ok & w_ok)[:, None] & c_ok[None, :]
            x = load_tile(x_ptr, nhwc_offsets(n0, n, h, w, c, H, W, C, x_sn, x_sh, x_sw, x_sc,
                                              DENSE_NHWC), mask)
            if NORMALIZE:
                x = normalize(x, mean, scale, shift, RELU)
            x = tl.where(mask, x, float("-inf"))  # padding never wins
            # The first valid element seeds the window (so an all -inf window keeps a real
            # position); after it a strictly greater value or any NaN takes over, as in torch.
            take = mask & ((x > best) | (x != x) | (best_offset < 0))
            best = tl.where(take, x, best)
            best_offset = tl.where(take, kh * KW + kw, best_offset)
    # Offsets and indices are stored at y's strides.
    y_at = nhwc_offsets(n0, n, p, q, c, P, Q, C, y_sn, y_sh, y_sw, y_sc, DENSE_NHWC)
    tile_ok = m_ok[:, None] & c_ok[None, :]
    store_tile(y_ptr, best, y_at, tile_ok)
    if WRITE_OFFSETS:
        store_tile(offset_ptr, best_offset, y_at, tile_ok)
    if WRITE_INDICES:
        h = (p * SH - PH)[:, None] + (best_offset // KW) * DH
        w = (q * SW - PW)[:, None] + (best_offset % KW) * DW
        store_tile(index_ptr, h * W + w, y_at, tile_ok)


@triton.jit
def batch_norm_grad_row(dz, x_ptr, x_at, ok, mean_ptr, scale_ptr, shift_ptr, sums_ptr, c,
                        c_ok, C, RELU: tl.constexpr):
    """``PoolGradFold`` on the fp32 dz tile of x's elements at ``x_at`` (``ok``: the valid
    ones; channels c): writes the channels' sums of du and of du * (x - mean) into this
    program's row of the dense [rows, 2, C] ``sums_ptr`` and returns du * scale."""
    x = load_tile(x_ptr, x_at, ok)
    mean, scale, shift = batch_norm_vectors(mean_ptr, scale_ptr, shift_ptr, c, c_ok)
    dx, du_sum, du_x_sum = normalize_grad(dz, x, mean, scale, shift, RELU)
    sums = sums_ptr + tl.program_id(0).to(tl.int64) * (2 * C) + c
    tl.store(sums, du_sum, mask=c_ok)
    tl.store(sums + C, du_x_sum, mask=c_ok)
    return dx


@triton.jit
def max_pool2d_backward_kernel(
    dy_ptr, offset_ptr, dx_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, sums_ptr,
    M, C, H, W, P, Q,
    dy_sn, dy_sh, dy_sw, dy_sc, o_sn, o_sh, o_sw, o_sc, dx_sn, dx_sh, dx_sw, dx_sc,
    x_sn, x_sh, x_sw, x_sc,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BN_GRAD: tl.constexpr, BN_RELU: tl.constexpr,
    DENSE_NHWC: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n0, n, h, w, c, m_ok, c_ok = pixel_channel_tile(M, C, H, W, EVEN_C, BLOCK_M, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for kh in tl.static_range(KH):
        p, p_ok = covering_window(h, kh, SH, PH, DH, P)
        for kw in tl.static_range(KW):
            q, q_ok = covering_window(w, kw, SW, PW, DW, Q)
            # The window's whole channel vector is read and the hits picked after: a mask
            # that varied along the channels would split the vector loads into scalar ones.
            mask = (m_ok & p_ok & q_ok)[:, None] & c_ok[None, :]
            offset = tl.load(offset_ptr + nhwc_offsets(n0, n, p, q, c, P, Q, C, o_sn, o_sh,
                                                       o_sw, o_sc, DENSE_NHWC),
                             mask=mask, other=-1)
            dy = load_tile(dy_ptr, nhwc_offsets(n0, n, p, q, c, P, Q, C, dy_sn, dy_sh, dy_sw,
                                                dy_sc, DENSE_NHWC), mask)
            acc += tl.where(offset == kh * KW + kw, dy, 0.0)
    dx_at = nhwc_offsets(n0, n, h, w, c, H, W, C, dx_sn, dx_sh, dx_sw, dx_sc, DENSE_NHWC)
    tile_ok = m_ok[:, None] & c_ok[None, :]
    if BN_GRAD:  # BatchNorm's backward folded in (``PoolGradFold``): acc is its dz
        x_at = nhwc_offsets(n0, n, h, w, c, H, W, C, x_sn, x_sh, x_sw, x_sc, DENSE_NHWC)
        acc = batch_norm_grad_row(acc, x_ptr, x_at, tile_ok, mean_ptr, scale_ptr, shift_ptr,
                                  sums_ptr, c, c_ok, C, BN_RELU)
    store_tile(dx_ptr, acc, dx_at, tile_ok)


def window_offset_dtype(geometry: PoolGeometry) -> torch.dtype:
    """The narrowest of ``WINDOW_OFFSET_DTYPES`` that holds every offset kh * KW + kw."""
    taps = geometry.kernel[0] * geometry.kernel[1]
    return torch.int8 if taps <= 127 else torch.int16 if taps <= 32767 else torch.int32


def forward_launch(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor | None,
                   indices: torch.Tensor | None, geometry: PoolGeometry,
                   config: TileConfig, normalization: Normalization | None = None,
                   relu: bool = False) -> Launch:
    """y (and the window offsets, torch's int64 indices, when given) of a max pool of x;
    ``normalization``: (mean, scale, shift) fp32 [C] vectors of a BatchNorm applied to x
    (then ReLU if ``relu``) before pooling."""
    N, C, P, Q = y.shape
    vectors, vector_extents = normalization_operands(C, normalization, y)
    layout = window_layout(config, x, y, offsets, indices, gather=False)
    dense = layout["DENSE_NHWC"]
    # Offsets and indices are stored at y's strides: they must share its layout.
    return window_launch(
        max_pool2d_forward_kernel, "max_pool2d_forward", config, ("x", x), ("y", y),
        gather=False, layout=layout,
        args={"offset_ptr": y if offsets is None else offsets,
              "index_ptr": y if indices is None else indices, **vectors},
        extents={"offset_ptr": UNUSED if offsets is None
                 else strided_extent("y", (N, C, P, Q), WINDOW_OFFSET_DTYPES, dense_nhwc=dense),
                 "index_ptr": UNUSED if indices is None
                 else strided_extent("y", (N, C, P, Q), (torch.int64,), dense_nhwc=dense),
                 **vector_extents},
        constexprs={**geometry.constexprs(), "WRITE_OFFSETS": offsets is not None,
                    "WRITE_INDICES": indices is not None,
                    "NORMALIZE": normalization is not None, "RELU": relu},
        mark=normalization_mark(normalization, relu))


def backward_sum_rows(dx_shape: tuple[int, ...], config: TileConfig) -> int:
    """The rows of a ``PoolGradFold``'s ``sums`` [rows, 2, C] for a backward of dx
    ``dx_shape`` on ``config``: one per program along the pixels (each written by its
    programs along the channels, disjoint channels)."""
    N, _, H, W = dx_shape
    return triton.cdiv(N * H * W, config.block_m)


def backward_launch(dy: torch.Tensor, offsets: torch.Tensor, dx: torch.Tensor,
                    geometry: PoolGeometry, config: TileConfig, *,
                    fold: PoolGradFold | None = None) -> Launch:
    """dx of a max pool from dy and the window offsets its forward kept; with ``fold``, the
    pool's input x was normalised on the fly and BatchNorm's backward is folded in
    (``PoolGradFold``: dx receives du * scale, ``fold.sums`` the partial sums)."""
    layout = window_layout(config, dx, dy, offsets, None if fold is None else fold.x,
                           gather=True)
    operands = fold_operands(fold, dx, backward_sum_rows(dx.shape, config),
                             layout["DENSE_NHWC"])
    return window_launch(
        max_pool2d_backward_kernel, "max_pool2d_backward", config, ("dx", dx), ("dy", dy),
        gather=True, layout=layout,
        args={"offset_ptr": offsets, **strided_args("o", offsets), **operands.args},
        extents={"offset_ptr": strided_extent("o", dy.shape, WINDOW_OFFSET_DTYPES,
                                              dense_nhwc=layout["DENSE_NHWC"]),
                 **operands.extents},
        constexprs={**geometry.constexprs(), **operands.constexprs}, mark=operands.mark)


class FoldOperands(NamedTuple):
    """What a ``PoolGradFold`` adds to the backward's launch: its arguments, their extents,
    the constexprs (BN_GRAD, BN_RELU, and without a fold the ``FOLD_OPERANDS`` as None) and
    the mark in the launch's name."""
    args: dict
    extents: dict
    constexprs: dict
    mark: str


def fold_operands(fold: PoolGradFold | None, dx: torch.Tensor, rows: int,
                  dense_nhwc: bool) -> FoldOperands:
    """The backward's operands of ``fold`` on dx [N, C, H, W] with ``rows`` sum rows."""
    if fold is None:
        return FoldOperands({}, {}, {"BN_GRAD": False, "BN_RELU": False,
                                     **dict.fromkeys(FOLD_OPERANDS)}, "")
    C = dx.shape[1]
    vectors, vector_extents = normalization_operands(C, fold.normalization, dx)
    return FoldOperands(
        {"x_ptr": fold.x, **vectors, "sums_ptr": fold.sums, **strided_args("x", fold.x)},
        {"x_ptr": strided_extent("x", tuple(dx.shape), dense_nhwc=dense_nhwc),
         **vector_extents, "sums_ptr": dense(rows, 2, C, dtypes=(torch.float32,))},
        {"BN_GRAD": True, "BN_RELU": fold.relu},
        "+bn_grad_relu" if fold.relu else "+bn_grad")
