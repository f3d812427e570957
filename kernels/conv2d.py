"""Convolution forward as an implicit GEMM over NHWC, with a fused epilogue; and the geometry
every convolution kernel shares (forward here, dgrad and wgrad in ``conv2d_backward``).

GEMM view: M = N*P*Q output pixels, N = K_out output channels, K = R*S*C. A program owns a
[BLOCK_M pixels x BLOCK_N channels] tile of the output and never materializes im2col: each
K step gathers its [BLOCK_M x BLOCK_K] slice of the input straight from the strided tensor
(channels_last is the coalesced fast path; any strides work) and multiplies it with a
[BLOCK_K x BLOCK_N] slice of the weight. Accumulation is fp32; pixel offsets are int64.

Two main loops, picked by a constexpr:
* channels (C >= SMALL_C): one flat loop over (tap r, s) x (C in BLOCK_K chunks). The
  per-pixel index math (n, p, q, the input base offset) is done once; the tap and channel
  counters are carried from step to step, and a step adds their scalar offsets and compares
  the tap's row/column with the bounds. One flat loop (not nested) so Triton pipelines
  across taps too.
* row runs (C < SMALL_C: LeNet, AlexNet, VGG and ResNet first layers), over a padded copy of x
  (``nhwc.padded_copy_kernel``, host side in ``fastarch.ops.conv2d``): dense
  [N, H + padding, W + padding, CP], CP = ``run_channels`` (8 16-bit or 4 fp32 channels,
  the zeros past C included), the convolution's padding written into its border. For one
  output pixel and kernel row r, the S taps' CP channels are then one contiguous run of
  S*CP elements (runs of CP, DW pixels apart, when dilated); a K step loads BLOCK_K lanes of
  it, lane k being (s, c) = (k // CP, k % CP), a shift. No bounds check is left (rows past M
  repeat a valid pixel), so x's loads are 16-byte vectors (cp.async, pipelined). The weight
  is read as it is, [K_out, C, R, S] through its strides, lane k's element (s, c) masked
  where c >= C: element gathers (cp.async in fp32, through registers in 16-bit), but the
  weight is small and stays in L2, where a padded copy of it cost a launch every call. A
  3-channel 3x3 layer steps 3 rows of 24 lanes in 32-deep tiles.

A pipelined main loop runs at least one step (``tl.maximum(steps, 1)``; where a reduction
can be empty that step is fully masked): with a loop that may run no step, the
accumulator's zeros reach the loop's exit on a path of their own, ptxas sees registers of an
in-flight wgmma written between it and its wait, and serializes every wgmma of the loop
(warning C7515). The dgrad and wgrad loops (``conv2d_backward``) do the same.

The channel loop reads the weight as [K_out, R*S*C] with (r, s, c) contiguous (for a
channels_last weight that is the weight itself, viewed).

Input prologue (PROLOGUE, IN_RELU; ``nhwc.InputNormalization``): a conv after a BatchNorm
reads the raw x and applies relu?(x * in_scale[c] + in_shift[c]) (fp32 math, rounded back to
x's dtype for the MMA) to each input tile as it is loaded, so the normalized tensor is never
stored; elements outside x (padding, masked lanes) are set back to 0 after the transform,
as the zero padding of the normalized tensor. The channel loop loads the step's BLOCK_K
in_scale/in_shift elements with its tile; the row-run loop needs nothing, its padded copy
(``nhwc.padded_copy_kernel``) applies the prologue as it writes the copy.

Epilogue, constexpr flags applied in this order on the fp32 accumulator:
HAS_BIAS (+ bias[k], any stride), STATS (Welford partials of this tile: count, mean, M2 per
channel, of conv + bias, for BatchNorm's batch statistics; written to a [3, M tiles, K_out]
fp32 buffer and merged on the host with Chan's formula, no atomics), HAS_SCALE_SHIFT
(* scale[k] + shift[k], e.g. an eval-mode BatchNorm folded in), HAS_RESIDUAL (+ residual, a
tensor of y's shape and dtype, any strides, read in fp32: a residual block's identity,
torchvision's bn(conv) + identity), RELU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from .launch import UNUSED, Extent, Launch, TileConfig, dense, vector
from .nhwc import (InputNormalization, batch_norm_grad_epilogue, input_prologue,
                   prologue_operands, split_pixel, strided_args, strided_extent)
from .tensor_cores import Operand, dot, upcast_operands
from .welford import store_statistics, tile_statistics

# Inputs with fewer channels than this take the row-run loop over a padded copy (a K step
# covers a kernel row's taps together), so a 3-channel first layer does not pad every tap
# to a 16-wide K tile; the wgrad's first-layer path too.
SMALL_C = 16


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution window, groups=1.

    ``padding`` is the top/left padding. ``padding_end`` is the bottom/right padding; it
    differs from ``padding`` only for padding='same' with an even effective kernel, where
    torch pads the extra row/column at the end.
    """
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_end: tuple[int, int] | None = None

    def end_padding(self) -> tuple[int, int]:
        return self.padding if self.padding_end is None else self.padding_end

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        pad_end = self.end_padding()
        return tuple(
            (size + begin + end - dilation * (k - 1) - 1) // stride + 1
            for size, begin, end, k, stride, dilation in zip(
                (height, width), self.padding, pad_end, self.kernel, self.stride, self.dilation))

    def constexprs(self) -> dict[str, int]:
        """Stride, top/left padding and dilation as the kernels' constexprs."""
        return {"SH": self.stride[0], "SW": self.stride[1], "PH": self.padding[0],
                "PW": self.padding[1], "DH": self.dilation[0], "DW": self.dilation[1]}


@triton.jit
def inside(coordinate, size):
    """0 <= coordinate < size for an int32 coordinate, as one unsigned comparison (a
    negative coordinate wraps past any size)."""
    return coordinate.to(tl.uint32) < tl.cast(size, tl.uint32)


@triton.jit
def _channel_tile_loop(acc, x_ptr, w_ptr, in_scale_ptr, in_shift_ptr, pixel_base, h0, w0,
                       m_ok, w_cols, k_out_ok, C, C_TILES, H, W, x_sh, x_sw, x_sc,
                       in_scale_s, in_shift_s,
                       S: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, R_TIMES_S,
                       EVEN_C: tl.constexpr, PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """K = (r, s) taps x C in BLOCK_K chunks (C_TILES of them), as one flat loop. The tap (as
    its offsets r * DH, s * DW and its first weight column) and the step's first channel are
    carried from step to step: no division in the loop. PROLOGUE: each x tile goes through
    ``input_prologue`` (its out-of-bounds and past-C elements 0)."""
    lanes = tl.arange(0, BLOCK_K)
    a_tile = x_ptr + pixel_base[:, None] + (lanes * x_sc)[None, :]
    b_tile = w_ptr + lanes[:, None] + w_cols[None, :]
    tap_h = tl.cast(0, tl.int32)
    tap_w = tl.cast(0, tl.int32)
    c0 = tl.cast(0, tl.int32)
    tap_column = tl.cast(0, tl.int32)  # the tap's first weight column, tap * C
    # At least one step (the module docstring says why).
    for _ in range(tl.maximum(R_TIMES_S * C_TILES, 1)):
        row_ok = m_ok & inside(h0 + tap_h, H) & inside(w0 + tap_w, W)
        a_ptrs = a_tile + (tap_h.to(tl.int64) * x_sh + tap_w.to(tl.int64) * x_sw + c0 * x_sc)
        b_ptrs = b_tile + (tap_column + c0)
        if EVEN_C:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=k_out_ok[None, :], other=0.0)
        else:
            c_ok = c0 + lanes < C
            a = tl.load(a_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=c_ok[:, None] & k_out_ok[None, :], other=0.0)
        if PROLOGUE:
            a = _normalized_tile(a, in_scale_ptr, in_shift_ptr, c0 + lanes, row_ok, C,
                                 in_scale_s, in_shift_s, EVEN_C, IN_RELU)
        acc = dot(a, b, acc, DOT_PRECISION, UPCAST_OPERANDS)
        c0, tap_column, tap_w, tap_h = next_channel_step(c0, tap_column, tap_w, tap_h, C, S,
                                                         DW, DH, BLOCK_K)
    return acc


@triton.jit
def _normalized_tile(a, in_scale_ptr, in_shift_ptr, channels, row_ok, C, in_scale_s,
                     in_shift_s, EVEN_C: tl.constexpr, IN_RELU: tl.constexpr):
    """``input_prologue`` of the channel loop's [BLOCK_M, BLOCK_K] x tile ``a`` (its rows
    valid where ``row_ok``, its columns ``channels``, all valid when EVEN_C)."""
    if EVEN_C:
        scale = tl.load(in_scale_ptr + channels * in_scale_s)
        shift = tl.load(in_shift_ptr + channels * in_shift_s)
        ok = row_ok[:, None]
    else:
        channel_ok = channels < C
        scale = tl.load(in_scale_ptr + channels * in_scale_s, mask=channel_ok, other=0.0)
        shift = tl.load(in_shift_ptr + channels * in_shift_s, mask=channel_ok, other=0.0)
        ok = row_ok[:, None] & channel_ok[None, :]
    return input_prologue(a, ok, scale[None, :], shift[None, :], IN_RELU)


@triton.jit
def next_channel_step(c0, tap_column, tap_w, tap_h, C, S, DW, DH, BLOCK_K: tl.constexpr):
    """The K step after channels [c0, c0 + BLOCK_K) of the tap at (tap_h, tap_w) (dilated
    offsets; its weight columns start at tap_column): the next channels of the tap, else the
    first of the next tap in (r, s) order. Carried, so the loop divides nothing."""
    c0 += BLOCK_K
    next_tap = c0 >= C
    next_row = next_tap & (tap_w == (S - 1) * DW)
    c0 = tl.where(next_tap, 0, c0)
    tap_column = tl.where(next_tap, tap_column + C, tap_column)
    tap_w = tl.where(next_row, 0, tl.where(next_tap, tap_w + DW, tap_w))
    tap_h = tl.where(next_row, tap_h + DH, tap_h)
    return c0, tap_column, tap_w, tap_h


@triton.jit
def run_offsets(lanes, DW: tl.constexpr, CP: tl.constexpr):
    """Offsets of the (s, c) = (lane // CP, lane % CP) elements of a kernel row in the
    padded copy: the lanes themselves without dilation (one contiguous run), else runs of CP
    channels DW pixels apart (shifts, CP a power of two)."""
    if DW == 1:
        offsets = lanes
    else:
        offsets = (lanes // CP) * (DW * CP) + lanes % CP
        offsets = tl.max_contiguous(tl.multiple_of(offsets, CP), CP)
    return offsets


@triton.jit
def _row_run_loop(acc, x_ptr, w_ptr, run_base, w_rows, WP, C, w_sc, w_sr, w_ss,
                  R: tl.constexpr, S: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  CP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  UPCAST_OPERANDS: tl.constexpr, BLOCK_K: tl.constexpr):
    """K = kernel rows r, each the S*CP elements (s, c) of the padded copy (``run_base``:
    each pixel's window origin, the border and channels padded so no lane needs a bounds
    check; rows past M repeat a valid one) and of the weight [K_out, C, R, S] (``w_rows``:
    each output channel's first element; strides w_sc, w_sr, w_ss; lanes with c >= C
    masked), in CHUNKS static steps of BLOCK_K lanes: no division, the copy's loads 16-byte
    vectors."""
    RUN: tl.constexpr = S * CP
    CHUNKS: tl.constexpr = (RUN + BLOCK_K - 1) // BLOCK_K
    lanes = tl.arange(0, BLOCK_K)
    a_tile = x_ptr + run_base[:, None] + run_offsets(lanes, DW, CP)[None, :]
    b_tile = w_ptr + ((lanes // CP) * w_ss + (lanes % CP) * w_sc)[:, None] + w_rows[None, :]
    channel_ok = lanes % CP < C
    row_step = WP * (DH * CP)
    for r in range(R):
        for chunk in tl.static_range(CHUNKS):
            # A chunk starts at a multiple of CP: its offsets are the lanes' shifted.
            a_ptrs = a_tile + (r * row_step + chunk * BLOCK_K // CP * DW * CP)
            b_ptrs = b_tile + (r * w_sr + chunk * BLOCK_K // CP * w_ss)
            if (chunk + 1) * BLOCK_K <= RUN:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs, mask=channel_ok[:, None], other=0.0)
            else:
                lane_ok = chunk * BLOCK_K + lanes < RUN
                a = tl.load(a_ptrs, mask=lane_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=(lane_ok & channel_ok)[:, None], other=0.0)
            acc = dot(a, b, acc, DOT_PRECISION, UPCAST_OPERANDS)
    return acc


@triton.jit
def conv2d_forward_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, residual_ptr, y_ptr, stats_ptr,
    in_scale_ptr, in_shift_ptr, M, C, C_TILES, H, W, P, Q, K_OUT, NUM_M_TILES,
    x_sn, x_sh, x_sw, x_sc, w_sk, w_sc, w_sr, w_ss, bias_s, scale_s, shift_s,
    res_sn, res_sh, res_sw, res_sc, y_sn, y_sh, y_sw, y_sc, in_scale_s, in_shift_s,
    R: tl.constexpr, S: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ROW_RUN: tl.constexpr, CP: tl.constexpr, EVEN_C: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
    HAS_BIAS: tl.constexpr, STATS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Channel tiles vary fastest, so the programs sharing an input tile run together and
    # the input is read from DRAM about once (the weight stays in L2).
    n_tiles = tl.cdiv(K_OUT, BLOCK_N)
    tile_m = tl.program_id(0) // n_tiles
    tile_n = tl.program_id(0) % n_tiles
    m = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_out = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    k_out_ok = k_out < K_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if ROW_RUN:
        # Rows past M are pixel M - 1 (the epilogue stores only the valid ones): every
        # load stays unmasked along M.
        n, p, q = split_pixel(tl.minimum(m, M - 1), P, Q)
        run_base = ((n * H + p * SH) * W + q * SW) * CP
        # Likewise channels past K_OUT read channel K_OUT - 1's weight.
        w_rows = tl.minimum(k_out, K_OUT - 1).to(tl.int64) * w_sk
        acc = _row_run_loop(acc, x_ptr, w_ptr, run_base, w_rows, W, C, w_sc, w_sr, w_ss, R,
                            S, DH, DW, CP, DOT_PRECISION, UPCAST_OPERANDS, BLOCK_K)
    else:
        n, p, q = split_pixel(m, P, Q)
        h0 = (p * SH - PH).to(tl.int32)
        w0 = (q * SW - PW).to(tl.int32)
        pixel_base = n * x_sn + h0.to(tl.int64) * x_sh + w0.to(tl.int64) * x_sw
        w_cols = k_out * w_sk
        acc = _channel_tile_loop(acc, x_ptr, w_ptr, in_scale_ptr, in_shift_ptr, pixel_base,
                                 h0, w0, m_ok, w_cols, k_out_ok, C, C_TILES, H, W, x_sh, x_sw,
                                 x_sc, in_scale_s, in_shift_s, S, DH, DW, R * S, EVEN_C,
                                 PROLOGUE, IN_RELU, DOT_PRECISION, UPCAST_OPERANDS, BLOCK_K)

    forward_epilogue(acc, bias_ptr, scale_ptr, shift_ptr, residual_ptr, y_ptr, stats_ptr, n,
                     p, q, m_ok, M - tile_m.to(tl.int64) * BLOCK_M, k_out, K_OUT, tile_m,
                     NUM_M_TILES, bias_s, scale_s, shift_s, res_sn, res_sh, res_sw, res_sc,
                     y_sn, y_sh, y_sw, y_sc, HAS_BIAS, STATS, HAS_SCALE_SHIFT, HAS_RESIDUAL,
                     RELU, BLOCK_M)


@triton.jit
def forward_epilogue(acc, bias_ptr, scale_ptr, shift_ptr, residual_ptr, y_ptr, stats_ptr, n,
                     p, q, m_ok, rows_left, k_out, K_OUT, tile_m, NUM_M_TILES, bias_s, scale_s,
                     shift_s, res_sn, res_sh, res_sw, res_sc, y_sn, y_sh, y_sw, y_sc,
                     HAS_BIAS: tl.constexpr, STATS: tl.constexpr,
                     HAS_SCALE_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     RELU: tl.constexpr, BLOCK_M: tl.constexpr,
                     bn_x_ptr=None, bn_mean_ptr=None, bn_scale_ptr=None, bn_shift_ptr=None,
                     sums_ptr=None, bn_x_sn=0, bn_x_sh=0, bn_x_sw=0, bn_x_sc=0, bn_mean_s=0,
                     bn_scale_s=0, bn_shift_s=0, sums_row=0,
                     BN_GRAD: tl.constexpr = False, BN_RELU: tl.constexpr = False):
    """The forward's epilogue (the module docstring's flags) on the [BLOCK_M, BLOCK_N] fp32
    ``acc`` of M tile ``tile_m``, whose rows are output pixels (n, p, q) (int64; scalars
    broadcast), the valid ones (``m_ok``) the first ``rows_left``. BN_GRAD (off by default;
    a TMA input gradient's, with no other flag: ``nhwc.BatchNormGradEpilogue``): acc is the
    dgrad's dz, stored as du * scale, x read at the same pixels through the bn_x strides,
    the tile's sums of du and du * (x - mean) written to row ``sums_row`` of the dense
    [rows, 2, K_OUT] ``sums_ptr``; BN_RELU masks du where x * scale + shift <= 0."""
    k_out_ok = k_out < K_OUT
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k_out * bias_s, mask=k_out_ok,
                       other=0.0).to(tl.float32)[None, :]
    if STATS:  # count, mean and M2 of this tile's valid rows, per channel
        count = tl.minimum(rows_left, BLOCK_M).to(tl.float32)
        mean, m2 = tile_statistics(acc, m_ok, BLOCK_M)
        store_statistics(stats_ptr, NUM_M_TILES.to(tl.int64) * K_OUT,
                         tile_m.to(tl.int64) * K_OUT + k_out, count, mean, m2, k_out_ok)
    if HAS_SCALE_SHIFT:
        scale = tl.load(scale_ptr + k_out * scale_s, mask=k_out_ok, other=0.0)
        shift = tl.load(shift_ptr + k_out * shift_s, mask=k_out_ok, other=0.0)
        acc = acc * scale[None, :] + shift[None, :]
    tile_ok = m_ok[:, None] & k_out_ok[None, :]
    if HAS_RESIDUAL:
        residual_offsets = ((n * res_sn + p * res_sh + q * res_sw)[:, None]
                            + (k_out * res_sc)[None, :])
        acc += tl.load(residual_ptr + residual_offsets, mask=tile_ok, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in torch.relu
    if BN_GRAD:
        x_offsets = ((n * bn_x_sn + p * bn_x_sh + q * bn_x_sw)[:, None]
                     + (k_out * bn_x_sc)[None, :])
        x = tl.load(bn_x_ptr + x_offsets, mask=tile_ok, other=0.0)
        mean = tl.load(bn_mean_ptr + k_out * bn_mean_s, mask=k_out_ok, other=0.0)
        bn_scale = tl.load(bn_scale_ptr + k_out * bn_scale_s, mask=k_out_ok, other=0.0)
        bn_shift = tl.load(bn_shift_ptr + k_out * bn_shift_s, mask=k_out_ok, other=0.0)
        acc, du_sum, du_x_sum = batch_norm_grad_epilogue(acc, x, tile_ok, mean[None, :],
                                                         bn_scale[None, :], bn_shift[None, :],
                                                         BN_RELU)
        sums = sums_ptr + sums_row.to(tl.int64) * 2 * K_OUT + k_out
        tl.store(sums, du_sum, mask=k_out_ok)
        tl.store(sums + K_OUT, du_x_sum, mask=k_out_ok)
    y_offsets = (n * y_sn + p * y_sh + q * y_sw)[:, None] + (k_out * y_sc)[None, :]
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------- launch

def forward_launch(x: torch.Tensor, weight_rsc: torch.Tensor, bias: torch.Tensor | None,
                   scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool,
                   y: torch.Tensor, stats: torch.Tensor | None, geometry: ConvGeometry,
                   operand: Operand, config: TileConfig, *,
                   prologue: InputNormalization | None = None,
                   residual: torch.Tensor | None = None) -> Launch:
    """The channel-loop launch for x [N, C, H, W] (any strides), ``weight_rsc`` [K_out, R, S,
    C] with (r, s, c) contiguous, [K_out] bias, scale and shift (any stride), y [N, K_out, P,
    Q] (any strides), for the STATS epilogue a dense [3, M tiles, K_out] fp32 ``stats``, the
    input ``prologue`` and the ``residual`` (y's shape and dtype, any strides) where given.
    Right for any C; a first layer (C < SMALL_C) takes ``row_run_forward_launch``."""
    N, C, H, W = x.shape
    K_out, R, S, _ = weight_rsc.shape
    extra = prologue_operands(prologue, x, C)
    return _forward_launch(
        N, K_out, y, bias, scale, shift, relu, stats, residual, geometry, operand, config,
        x.dtype,
        args={"x_ptr": x, "w_ptr": weight_rsc, "C": C, "C_TILES": triton.cdiv(C, config.block_k),
              "H": H, "W": W, **strided_args("x", x), "w_sk": weight_rsc.stride(0),
              "w_sc": 0, "w_sr": 0, "w_ss": 0, **extra.args},
        extents={"x_ptr": strided_extent("x", (N, C, H, W)),
                 "w_ptr": Extent((K_out, R * S * C), ("w_sk", 1)), **extra.extents},
        constexprs={"R": R, "S": S, **geometry.constexprs(), "ROW_RUN": False, "CP": 1,
                    "EVEN_C": C % config.block_k == 0, **extra.constexprs})


def row_run_forward_launch(x_run: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None, scale: torch.Tensor | None,
                           shift: torch.Tensor | None, relu: bool, y: torch.Tensor,
                           stats: torch.Tensor | None, geometry: ConvGeometry,
                           operand: Operand, config: TileConfig, *,
                           residual: torch.Tensor | None = None) -> Launch:
    """The first-layer launch: ``x_run`` is the padded copy of x, dense [N, H', W', CP]
    (``run_copy_shape``) with channels C .. CP - 1 zero, ``weight`` the [K_out, C, R, S]
    weight itself (any strides); the rest as ``forward_launch``. An input prologue is the
    copy's (``nhwc.padded_copy_launch``), which writes the normalized x."""
    N, HP, WP, CP = x_run.shape
    K_out, C, R, S = weight.shape
    extra = prologue_operands(None, x_run, CP)
    w_sk, w_sc, w_sr, w_ss = weight.stride()
    return _forward_launch(
        N, K_out, y, bias, scale, shift, relu, stats, residual, geometry, operand, config,
        x_run.dtype,
        args={"x_ptr": x_run, "w_ptr": weight, "C": C, "C_TILES": 1, "H": HP, "W": WP,
              "x_sn": 0, "x_sh": 0, "x_sw": 0, "x_sc": 0, "w_sk": w_sk, "w_sc": w_sc,
              "w_sr": w_sr, "w_ss": w_ss, **extra.args},
        extents={"x_ptr": dense(N, HP, WP, CP),
                 "w_ptr": Extent((K_out, C, R, S), ("w_sk", "w_sc", "w_sr", "w_ss")),
                 **extra.extents},
        constexprs={"R": R, "S": S, **geometry.constexprs(), "PH": 0, "PW": 0,
                    "ROW_RUN": True, "CP": CP, "EVEN_C": True, **extra.constexprs})


def _forward_launch(N: int, K_out: int, y: torch.Tensor, bias: torch.Tensor | None,
                    scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool,
                    stats: torch.Tensor | None, residual: torch.Tensor | None,
                    geometry: ConvGeometry, operand: Operand,
                    config: TileConfig, dtype: torch.dtype, args: dict[str, Any],
                    extents: dict[str, Extent], constexprs: dict[str, Any]) -> Launch:
    """A forward launch of the input's batch ``N`` and the weight's ``K_out`` output
    channels: the input's and weight's ``args``, ``extents`` and ``constexprs`` (those of one
    main loop) joined with y's and the epilogue's."""
    P, Q = y.shape[2:]
    M = N * P * Q
    m_tiles = triton.cdiv(M, config.block_m)
    epilogue = epilogue_operands(y, bias, scale, shift, relu, stats, m_tiles, residual)
    return Launch(
        conv2d_forward_kernel, (m_tiles * triton.cdiv(K_out, config.block_n),),
        args={**args, "y_ptr": y, **epilogue.args, "M": M, "P": P, "Q": Q, "K_OUT": K_out,
              "NUM_M_TILES": m_tiles, **strided_args("y", y)},
        extents={**extents, "y_ptr": strided_extent("y", (N, K_out, P, Q)),
                 **epilogue.extents},
        constexprs={**constexprs, **epilogue.constexprs,
                    **gemm_constexprs(operand, dtype, config)},
        num_warps=config.num_warps, num_stages=config.num_stages,
        name=f"conv2d_forward[{config.name},{epilogue.name_suffix(dtype)}"
             f"{prologue_suffix(constexprs)}]")


def prologue_suffix(constexprs: dict[str, Any], separator: str = "+") -> str:
    """A launch name's mark of an input prologue (its PROLOGUE and IN_RELU constexprs):
    "prologue" or "prologue_relu" after ``separator``, or nothing."""
    if not constexprs["PROLOGUE"]:
        return ""
    return separator + ("prologue_relu" if constexprs["IN_RELU"] else "prologue")


def run_channels(channels: int, dtype: torch.dtype) -> int:
    """CP, the channels of a first layer's padded copy: a power of two of at least 16 bytes
    (8 16-bit or 4 fp32 elements), so a pixel's channels are one vector and lane // CP a
    shift."""
    return max(16 // dtype.itemsize, triton.next_power_of_2(channels))


def run_copy_shape(x_shape: tuple[int, ...], geometry: ConvGeometry, dtype: torch.dtype
                   ) -> tuple[int, int, int, int]:
    """The [N, H', W', CP] padded copy of an [N, C, H, W] input a first layer reads: its
    border holds the convolution's padding (top/left and bottom/right)."""
    N, C, H, W = x_shape
    (top, left), (bottom, right) = geometry.padding, geometry.end_padding()
    return N, H + top + bottom, W + left + right, run_channels(C, dtype)


class EpilogueOperands(NamedTuple):
    """What a forward kernel's fused epilogue adds to its launch: the bias, scale and shift
    vectors and the residual (an absent one passes y, never read) and the STATS partials, as
    arguments, extents and constexpr flags."""
    args: dict[str, Any]
    extents: dict[str, Extent]
    constexprs: dict[str, bool]

    def name_suffix(self, dtype: torch.dtype) -> str:
        flags = (("bias", "HAS_BIAS"), ("stats", "STATS"), ("scale_shift", "HAS_SCALE_SHIFT"),
                 ("residual", "HAS_RESIDUAL"), ("relu", "RELU"))
        return _DTYPE_NAMES[dtype] + "".join(f"+{flag}" for flag, constexpr in flags
                                             if self.constexprs[constexpr])


def epilogue_operands(y: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
                      shift: torch.Tensor | None, relu: bool, stats: torch.Tensor | None,
                      m_tiles: int, residual: torch.Tensor | None = None) -> EpilogueOperands:
    """The epilogue's share of a forward launch writing y [N, K_out, P, Q] in ``m_tiles``
    M tiles (the STATS partials are [3, m_tiles, K_out] fp32), adding ``residual`` (y's
    shape and dtype, any strides) where given."""
    K_out = y.shape[1]
    vectors = {"bias": bias, "scale": scale, "shift": shift}
    args = {**{f"{name}_ptr": y if t is None else t for name, t in vectors.items()},
            "stats_ptr": stats if stats is not None else y,
            **{f"{name}_s": 0 if t is None else t.stride(0) for name, t in vectors.items()},
            "residual_ptr": y if residual is None else residual,
            **strided_args("res", y if residual is None else residual)}
    extents = {"bias_ptr": vector(bias, K_out, "bias_s"),
               "scale_ptr": vector(scale, K_out, "scale_s", (torch.float32,)),
               "shift_ptr": vector(shift, K_out, "shift_s", (torch.float32,)),
               "stats_ptr": UNUSED if stats is None
               else dense(3, m_tiles, K_out, dtypes=(torch.float32,)),
               "residual_ptr": UNUSED if residual is None
               else strided_extent("res", tuple(y.shape), (y.dtype,))}
    constexprs = {"HAS_BIAS": bias is not None, "STATS": stats is not None,
                  "HAS_SCALE_SHIFT": scale is not None, "HAS_RESIDUAL": residual is not None,
                  "RELU": relu}
    return EpilogueOperands(args, extents, constexprs)


def gemm_constexprs(operand: Operand, dtype: torch.dtype, config: TileConfig) -> dict[str, Any]:
    """What every convolution GEMM takes besides its geometry: the dot's precision, whether
    interpreted bf16 upcasts its operands, and the tile."""
    return {"DOT_PRECISION": operand.dot_precision, "UPCAST_OPERANDS": upcast_operands(dtype),
            "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k}


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

