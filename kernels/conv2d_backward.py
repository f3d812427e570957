"""Convolution backward as implicit GEMMs, groups=1: the input gradient (dgrad) and the weight
and bias gradients (wgrad), fp32 accumulation, deterministic (no atomics).

dgrad. dx[n, h, w, c] = sum over taps (r, s) and output channels k of dy[n, p, q, k] *
W[k, c, r, s] where h = p * SH - PH + r * DH (and likewise for w): GEMM M = input pixels,
N = C, K = taps x K_out.

Stride is handled by decomposing the input by stride phase rather than by masking. Input
rows h with the same h mod SH are reached by the same taps: those r with
(h + PH - r * DH) divisible by SH, which form one residue class r0, r0 + STEP, r0 + 2 STEP, ...
(STEP = SH / gcd(SH, DH)). Each program owns one phase (grid axis 2 runs over the SH * SW
phases), visits only its phase's taps, and then p = i + base - j * DSTEP for the i-th row of
the phase and the j-th tap: no division and no wasted tap in the main loop. A masked
"visit every tap, skip the non-dividing ones" loop would spend 1 - 1/(SH * SW) of its tiles
on zeros: 3/4 at stride 2, 15/16 for AlexNet's stride-4 conv1. Rows that no window reaches
(a phase without taps, or the last rows when the input is not covered exactly by the
windows) get an empty or fully masked reduction and are stored as zeros.

wgrad. dW[k, c, r, s] = sum over pixels (n, p, q) of dy[n, p, q, k] * x[n, p*SH - PH + r*DH,
q*SW - PW + s*DW, c]: GEMM M = (r, s, c) flattened, N = K_out, K = N*P*Q. Three ways to
load the x tile: when C is a multiple of the M tile, a tile stays inside one tap and its
patch load is one channel run per pixel (TAP_ALIGNED); a first layer (C < SMALL_C, ROW_RUN)
reads x's padded copy (``conv2d``'s row runs: [N, H', W', CP], the padding in its border),
M running over (r, s, c < CP), so a pixel's column of the tile is runs of CP contiguous
elements, 16-byte vectors with no bounds check (72 columns for a 3x3 RGB layer, the
c >= C ones, zeros, not stored); any other C flattens (r, s, c) across taps and gathers
element by element.

An input prologue (``conv2d``'s docstring) transforms the x tile as loaded, its elements
outside x set back to 0; a program's columns have fixed channels, so their in_scale and
in_shift load once. A first layer's padded copy applies it instead (dgrad needs none).

A BatchNorm's backward folds into both GEMMs (``nhwc.GradientPrologue``,
``nhwc.BatchNormGradEpilogue``). Both can read dy through a gradient prologue: y's tile
loads beside each dy tile, dy + scale[k] * y + shift[k] goes to the MMA (positions outside
dy stay 0), and wgrad's db sums it; a wgrad program's k are fixed, so its vectors load once.
dgrad's epilogue turns its dz tile into du * scale, stored as dx, and writes the channels'
sums of du and du * (x - mean) to the program's own row of a [rows, 2, C] buffer (row
phase * M tiles + M tile: ``dgrad_sum_rows``), which the caller sums in order: no atomics.

The pixel reduction is long (N*P*Q, a million and more) while the output is small, so it is
split across programs: split i reduces its own pixel range into an fp32 partial, and a second
tiny kernel sums the partials in split order (``reduction.sum_in_order``). With one split the
main kernel writes dW (and db) directly.

The bias gradient db[k] = sum of dy[., ., ., k] comes from the dy tiles the GEMM loads
anyway: the programs holding the first (r, s, c) tile also sum each dy tile into per-split
bias partials, merged the same way. No extra pass over dy.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .conv2d import ConvGeometry, gemm_constexprs, inside, prologue_suffix
from .launch import UNUSED, Extent, Launch, TileConfig, dense
from .nhwc import (BatchNormGradEpilogue, GradientPrologue, InputNormalization,
                   batch_norm_grad_epilogue, gradient_prologue, input_prologue,
                   prologue_operands, strided_args, strided_extent)
from .reduction import sum_in_order
from .tensor_cores import Operand, dot

FP32 = (torch.float32,)  # the dtypes of the fp32-only operands' extents


@triton.jit
def split_pixels(start, count, H, W, BLOCK: tl.constexpr):
    """Pixels start .. start + BLOCK of an [N, H, W] grid as (n, h, w) and their mask.

    The flat index (int64 ``start``) may pass 2^31 while each coordinate cannot, so one
    scalar int64 division finds the image and the per-pixel divisions are int32."""
    image = start // (H * W)
    local = (start - image * (H * W)).to(tl.int32) + tl.arange(0, BLOCK)
    hw = local % (H * W)
    n = image.to(tl.int32) + local // (H * W)
    return n, hw // W, hw % W, tl.arange(0, BLOCK) < count - start


@triton.jit
def add_digits(high, mid, low, d_high, d_mid, d_low, MID, LOW):
    """(high, mid, low) + (d_high, d_mid, d_low) in the mixed radix whose lower digits run
    below MID and LOW. Every mid and low digit is below its radix, so each carry is 0 or 1:
    the main loops advance a decomposed index with this instead of dividing it."""
    low = low + d_low
    carry = (low >= LOW).to(tl.int32)
    low -= carry * LOW
    mid = mid + d_mid + carry
    carry = (mid >= MID).to(tl.int32)
    return high + d_high + carry, mid - carry * MID, low


@triton.jit
def split_digits(index, MID, LOW):
    """index -> (high, mid, low) in the mixed radix whose lower digits run below MID, LOW."""
    return index // (MID * LOW), (index // LOW) % MID, index % LOW


@triton.jit
def phase_taps(phase, PAD: tl.constexpr, TAPS: tl.constexpr, STRIDE: tl.constexpr,
               STEP: tl.constexpr, INVERSE: tl.constexpr):
    """The first tap t reaching input rows ``phase`` (mod STRIDE), i.e. the least t with
    t * DIL = phase + PAD (mod STRIDE) for the dilation DIL, and how many taps do (every
    STEP-th).

    With g = STRIDE / STEP = gcd(STRIDE, DIL) a tap exists iff g divides phase + PAD, and
    t = (phase + PAD) / g * INVERSE mod STEP, INVERSE being (DIL / g)^-1 mod STEP."""
    GCD: tl.constexpr = STRIDE // STEP
    first = ((phase + PAD) // GCD * INVERSE) % STEP
    reachable = ((phase + PAD) % GCD == 0).to(tl.int32)
    return first, (TAPS - first + STEP - 1) // STEP * reachable


@triton.jit
def prologue_gradient_tile(grad, ok, y_ptrs, scale_ptr, shift_ptr, k, k_ok, scale_s,
                           shift_s):
    """A dy tile [pixels, out-channels k] (``ok``: its elements inside dy) through
    ``gradient_prologue`` with y's tile at ``y_ptrs`` and the channels' scale and shift."""
    y = tl.load(y_ptrs, mask=ok, other=0.0)
    scale = tl.load(scale_ptr + k * scale_s, mask=k_ok, other=0.0)
    shift = tl.load(shift_ptr + k * shift_s, mask=k_ok, other=0.0)
    return gradient_prologue(grad, y, ok, scale[None, :], shift[None, :])


@triton.jit
def batch_norm_grad_rows(dz, x_ptrs, mean_ptr, scale_ptr, shift_ptr, sums_ptr, m_ok, c, c_ok,
                         C, row, mean_s, scale_s, shift_s, RELU: tl.constexpr):
    """``batch_norm_grad_epilogue`` of the fp32 dz tile [pixels, channels c] (``m_ok``: its
    pixels inside dx) with x's tile at ``x_ptrs``: writes the channels' sums of du and of
    du * (x - mean) into ``row`` of the dense [rows, 2, C] ``sums_ptr`` (zeros without a
    pixel) and returns du * scale, dx's tile."""
    ok = m_ok[:, None] & c_ok[None, :]
    x = tl.load(x_ptrs, mask=ok, other=0.0)
    mean = tl.load(mean_ptr + c * mean_s, mask=c_ok, other=0.0)
    scale = tl.load(scale_ptr + c * scale_s, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + c * shift_s, mask=c_ok, other=0.0)
    dx, du_sum, du_x_sum = batch_norm_grad_epilogue(dz, x, ok, mean[None, :], scale[None, :],
                                                    shift[None, :], RELU)
    sums = sums_ptr + row.to(tl.int64) * (2 * C) + c
    tl.store(sums, du_sum, mask=c_ok)
    tl.store(sums + C, du_x_sum, mask=c_ok)
    return dx


@triton.jit
def conv2d_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr, y_ptr, grad_scale_ptr, grad_shift_ptr,
    x_ptr, mean_ptr, bn_scale_ptr, bn_shift_ptr, sums_ptr,
    N, H, W, P, Q, C, K_out,
    dy_sn, dy_sh, dy_sw, dy_sc, w_sk, w_sc, w_sr, w_ss, dx_sn, dx_sh, dx_sw, dx_sc,
    y_sn, y_sh, y_sw, y_sc, grad_scale_s, grad_shift_s,
    x_sn, x_sh, x_sw, x_sc, mean_s, bn_scale_s, bn_shift_s,
    R: tl.constexpr, S: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    STEP_R: tl.constexpr, STEP_S: tl.constexpr, DSTEP_R: tl.constexpr, DSTEP_S: tl.constexpr,
    INVERSE_R: tl.constexpr, INVERSE_S: tl.constexpr, EVEN_K: tl.constexpr,
    GRAD_PROLOGUE: tl.constexpr, BN_GRAD: tl.constexpr, BN_RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    phase = tl.program_id(2)
    phase_h = phase // SW
    phase_w = phase % SW
    r0, taps_r = phase_taps(phase_h, PH, R, SH, STEP_R, INVERSE_R)
    s0, taps_s = phase_taps(phase_w, PW, S, SW, STEP_S, INVERSE_S)
    # This phase's input rows are phase_h, phase_h + SH, ...; row i meets tap j at output
    # row i + base_p - j * DSTEP_R (base_p is exact: r0 was chosen to make it divide).
    rows = (H - phase_h + SH - 1) // SH
    cols = (W - phase_w + SW - 1) // SW
    base_p = (phase_h + PH - r0 * DH) // SH
    base_q = (phase_w + PW - s0 * DW) // SW
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    count = rows.to(tl.int64) * cols * N
    # A phase past the input's end (H < SH) has no rows: count is 0, every pixel masked.
    n, i_h, i_w, m_ok = split_pixels(start, count, tl.maximum(rows, 1), tl.maximum(cols, 1),
                                     BLOCK_M)
    p0 = i_h + base_p
    q0 = i_w + base_q
    dy_rows = n.to(tl.int64) * dy_sn + p0.to(tl.int64) * dy_sh + q0.to(tl.int64) * dy_sw
    if GRAD_PROLOGUE:
        y_rows = n.to(tl.int64) * y_sn + p0.to(tl.int64) * y_sh + q0.to(tl.int64) * y_sw
    # dx's rows before the loop too: after it, their index math (redone in the store's
    # layout) sat beside the accumulator, and ptxas spilled it for sm_80.
    h = phase_h + i_h * SH
    w = phase_w + i_w * SW
    dx_rows = n.to(tl.int64) * dx_sn + h.to(tl.int64) * dx_sh + w.to(tl.int64) * dx_sw
    if BN_GRAD:
        x_rows = n.to(tl.int64) * x_sn + h.to(tl.int64) * x_sh + w.to(tl.int64) * x_sw

    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < C
    k = tl.arange(0, BLOCK_K)
    # Programs past their phase's pixel count (phases differ by a row or column) idle.
    steps = taps_r * taps_s * tl.cdiv(K_out, BLOCK_K) * (start < count).to(tl.int32)
    # A program without a step (a phase without taps, an idle one) runs one fully masked.
    rows_live = m_ok & (steps > 0)
    columns_live = c_ok & (steps > 0)
    b_tile = w_ptr + (r0 * w_sr + s0 * w_ss) + (k * w_sk)[:, None] + (c * w_sc)[None, :]
    # The step's tap (j_r, j_s) with its offsets in dy (subtracted) and in the weight, and its
    # first output channel k0, carried from step to step: no division in the loop.
    j_r = tl.cast(0, tl.int32)
    j_s = tl.cast(0, tl.int32)
    k0 = tl.cast(0, tl.int32)
    dy_tap = tl.cast(0, tl.int64)
    w_tap = tl.cast(0, tl.int32)
    dy_next_s = DSTEP_S * tl.cast(dy_sw, tl.int64)
    dy_next_r = DSTEP_R * tl.cast(dy_sh, tl.int64) - (taps_s - 1) * dy_next_s
    w_next_s = STEP_S * w_ss
    w_next_r = STEP_R * w_sr - (taps_s - 1) * w_next_s
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in range(tl.maximum(steps, 1)):  # at least one step: see conv2d's docstring
        row_ok = rows_live & inside(p0 - j_r * DSTEP_R, P) & inside(q0 - j_s * DSTEP_S, Q)
        a_ptrs = dy_ptr + (dy_rows - dy_tap)[:, None] + ((k0 + k) * dy_sc)[None, :]
        b_ptrs = b_tile + (w_tap + k0 * w_sk)
        if EVEN_K:
            a_ok = row_ok[:, None]
            a = tl.load(a_ptrs, mask=a_ok, other=0.0)
            b = tl.load(b_ptrs, mask=columns_live[None, :], other=0.0)
        else:
            k_ok = k0 + k < K_out
            a_ok = row_ok[:, None] & k_ok[None, :]
            a = tl.load(a_ptrs, mask=a_ok, other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & columns_live[None, :], other=0.0)
        if GRAD_PROLOGUE:  # y at dy's positions: the step's tap moves both by whole rows
            y_tap = ((j_r * DSTEP_R).to(tl.int64) * y_sh
                     + (j_s * DSTEP_S).to(tl.int64) * y_sw)
            a = prologue_gradient_tile(a, a_ok, y_ptr + (y_rows - y_tap)[:, None]
                                       + ((k0 + k) * y_sc)[None, :], grad_scale_ptr,
                                       grad_shift_ptr, k0 + k, k0 + k < K_out,
                                       grad_scale_s, grad_shift_s)
        acc = dot(a, b, acc, DOT_PRECISION, UPCAST_OPERANDS)
        k0 += BLOCK_K
        next_tap = k0 >= K_out
        next_row = next_tap & (j_s == taps_s - 1)
        k0 = tl.where(next_tap, 0, k0)
        dy_tap += tl.where(next_row, dy_next_r, tl.where(next_tap, dy_next_s, 0))
        w_tap += tl.where(next_row, w_next_r, tl.where(next_tap, w_next_s, 0))
        j_s = tl.where(next_row, 0, tl.where(next_tap, j_s + 1, j_s))
        j_r = tl.where(next_row, j_r + 1, j_r)

    dx = acc
    if BN_GRAD:
        x_tile = x_ptr + x_rows[:, None] + (c.to(tl.int64) * x_sc)[None, :]
        # Sum rows are the programs': phase by phase, M tile by M tile.
        row = phase * tl.num_programs(0) + tl.program_id(0)
        dx = batch_norm_grad_rows(acc, x_tile, mean_ptr, bn_scale_ptr, bn_shift_ptr, sums_ptr,
                                  m_ok, c, c_ok, C, row, mean_s, bn_scale_s, bn_shift_s,
                                  BN_RELU)
    tl.store(dx_ptr + dx_rows[:, None] + (c.to(tl.int64) * dx_sc)[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def wgrad_reduce(x_ptr, dy_ptr, y_ptr, x_cols, tap_h, tap_w, col_ok, in_scale, in_shift,
                 grad_scale, grad_shift, k, k_ok, start, end, steps, H, W, P, Q, x_sn, x_sh,
                 x_sw, dy_sn, dy_sh, dy_sw, dy_sc, y_sn, y_sh, y_sw, y_sc,
                 SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                 ROW_RUN: tl.constexpr, CP: tl.constexpr, PROLOGUE: tl.constexpr,
                 IN_RELU: tl.constexpr, GRAD_PROLOGUE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
                 WITH_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sum of x_patch^T @ dy over pixels start .. end (and of dy itself, WITH_BIAS).

    ``tap_h``/``tap_w`` are the (r*DH, s*DW) tap offsets of the M columns: scalars when the
    tile lies in one tap, [BLOCK_M, 1] columns otherwise; ``x_cols`` their address offsets.
    ROW_RUN: x is the padded copy [N, H, W, CP] (no bounds to check), ``x_cols`` runs of CP.
    PROLOGUE: the x tile goes through ``input_prologue`` with the [BLOCK_M, 1] ``in_scale``
    and ``in_shift`` of its columns' channels (elements outside x, 0). GRAD_PROLOGUE: the dy
    tile goes through ``gradient_prologue`` with y's tile and the [1, BLOCK_N] ``grad_scale``
    and ``grad_shift``, before the bias sums it.
    A pixel's (n, p, q) is its step's first pixel's, carried from step to step, plus its
    lane's, split once: no division in the loop."""
    lanes = tl.arange(0, BLOCK_K)
    lane_n, lane_p, lane_q = split_digits(lanes, P, Q)
    step_n, step_p, step_q = split_digits(BLOCK_K, P, Q)
    image = start // (P * Q)  # int64: the flat pixel index may pass 2^31, an image index not
    first = (start - image * (P * Q)).to(tl.int32)
    n0, p0, q0 = image.to(tl.int32), first // Q, first % Q
    # Every step but the last is full: the last one's pixel count (none without a step).
    last = tl.maximum(steps, 1) - 1
    tail = tl.maximum(end - start - last.to(tl.int64) * BLOCK_K, 0).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    bias = tl.zeros((BLOCK_N,), tl.float32)
    for step in range(last + 1):  # at least one step: see conv2d's docstring
        n, p, q = add_digits(n0, p0, q0, lane_n, lane_p, lane_q, P, Q)
        pix_ok = lanes < tl.where(step == last, tail, BLOCK_K)
        h0 = p * SH - PH
        w0 = q * SW - PW
        if ROW_RUN:
            x_rows = ((n.to(tl.int64) * H + h0) * W + w0) * CP
            x_ok = pix_ok[None, :] & col_ok
        else:
            x_rows = n.to(tl.int64) * x_sn + h0.to(tl.int64) * x_sh + w0.to(tl.int64) * x_sw
            x_ok = (pix_ok[None, :] & col_ok & inside(h0[None, :] + tap_h, H)
                    & inside(w0[None, :] + tap_w, W))
        a = tl.load(x_ptr + x_cols + x_rows[None, :], mask=x_ok, other=0.0)
        if PROLOGUE:
            a = input_prologue(a, x_ok, in_scale, in_shift, IN_RELU)
        dy_rows = n.to(tl.int64) * dy_sn + p.to(tl.int64) * dy_sh + q.to(tl.int64) * dy_sw
        b_ok = pix_ok[:, None] & k_ok[None, :]
        b = tl.load(dy_ptr + dy_rows[:, None] + (k * dy_sc)[None, :], mask=b_ok, other=0.0)
        if GRAD_PROLOGUE:
            y_rows = n.to(tl.int64) * y_sn + p.to(tl.int64) * y_sh + q.to(tl.int64) * y_sw
            y = tl.load(y_ptr + y_rows[:, None] + (k * y_sc)[None, :], mask=b_ok, other=0.0)
            b = gradient_prologue(b, y, b_ok, grad_scale, grad_shift)
        acc = dot(a, b, acc, DOT_PRECISION, UPCAST_OPERANDS)
        if WITH_BIAS:
            bias += tl.sum(b.to(tl.float32), axis=0)
        n0, p0, q0 = add_digits(n0, p0, q0, step_n, step_p, step_q, P, Q)
    return acc, bias


@triton.jit
def conv2d_wgrad_kernel(
    x_ptr, dy_ptr, out_ptr, bias_out_ptr, in_scale_ptr, in_shift_ptr,
    y_ptr, grad_scale_ptr, grad_shift_ptr,
    H, W, P, Q, C, K_out, pixels, split_pixels_count,
    x_sn, x_sh, x_sw, x_sc, dy_sn, dy_sh, dy_sw, dy_sc,
    o_split, o_sr, o_ss, o_sc, o_sk, b_split, in_scale_s, in_shift_s,
    y_sn, y_sh, y_sw, y_sc, grad_scale_s, grad_shift_s,
    R: tl.constexpr, S: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    TAP_ALIGNED: tl.constexpr, ROW_RUN: tl.constexpr, CP: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr, GRAD_PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(2)
    j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if ROW_RUN:  # (r, s, c) over the padded copy's CP channels; c >= C is not stored
        r = j // (S * CP)
        s = (j // CP) % S
        c = j % CP
        tap_h = 0
        tap_w = 0
        x_cols = ((r * (DH * W) + s * DW) * CP + c).to(tl.int64)
        x_cols = tl.max_contiguous(tl.multiple_of(x_cols, CP), CP)[:, None]
        col_ok = (j < R * S * CP)[:, None]
        out_ok = col_ok & (c < C)[:, None]
    elif TAP_ALIGNED:  # C % BLOCK_M == 0: one tap, a run of channels
        tap = (pid_m * BLOCK_M) // C
        r = tap // S
        s = tap % S
        c = j - tap * C
        tap_h = r * DH
        tap_w = s * DW
    else:
        r = j // (S * C)
        s = (j // C) % S
        c = j % C
        tap_h = (r * DH)[:, None]
        tap_w = (s * DW)[:, None]
    if not ROW_RUN:
        col_ok = (j < R * S * C)[:, None]
        out_ok = col_ok
        x_cols = (tap_h.to(tl.int64) * x_sh + tap_w.to(tl.int64) * x_sw
                  + (c.to(tl.int64) * x_sc)[:, None])
    k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k < K_out
    if PROLOGUE:  # the columns' channels are fixed: their vectors load once (never ROW_RUN)
        in_scale = tl.load(in_scale_ptr + c[:, None] * in_scale_s, mask=col_ok, other=0.0)
        in_shift = tl.load(in_shift_ptr + c[:, None] * in_shift_s, mask=col_ok, other=0.0)
    else:  # unused
        in_scale = 0.0
        in_shift = 0.0
    if GRAD_PROLOGUE:  # the program's output channels are fixed: their vectors load once
        grad_scale = tl.load(grad_scale_ptr + k * grad_scale_s, mask=k_ok, other=0.0)[None, :]
        grad_shift = tl.load(grad_shift_ptr + k * grad_shift_s, mask=k_ok, other=0.0)[None, :]
    else:  # unused
        grad_scale = 0.0
        grad_shift = 0.0

    start = split.to(tl.int64) * split_pixels_count
    end = tl.minimum(start + split_pixels_count, pixels)
    steps = tl.cdiv(end - start, BLOCK_K).to(tl.int32)
    # The bias sum rides on the programs of the first M tile only: one compiled loop with
    # the sum, one without, so the other programs pay nothing for it.
    with_bias = (pid_m == 0) if HAS_BIAS else False
    if with_bias:
        acc, bias = wgrad_reduce(x_ptr, dy_ptr, y_ptr, x_cols, tap_h, tap_w, col_ok,
                                 in_scale, in_shift, grad_scale, grad_shift, k, k_ok, start,
                                 end, steps, H, W, P, Q, x_sn, x_sh, x_sw, dy_sn, dy_sh, dy_sw,
                                 dy_sc, y_sn, y_sh, y_sw, y_sc, SH, SW, PH, PW, ROW_RUN, CP,
                                 PROLOGUE, IN_RELU, GRAD_PROLOGUE, DOT_PRECISION,
                                 UPCAST_OPERANDS, True, BLOCK_M, BLOCK_N, BLOCK_K)
        tl.store(bias_out_ptr + split * b_split + k, bias.to(bias_out_ptr.dtype.element_ty),
                 mask=k_ok)
    else:
        acc, bias = wgrad_reduce(x_ptr, dy_ptr, y_ptr, x_cols, tap_h, tap_w, col_ok,
                                 in_scale, in_shift, grad_scale, grad_shift, k, k_ok, start,
                                 end, steps, H, W, P, Q, x_sn, x_sh, x_sw, dy_sn, dy_sh, dy_sw,
                                 dy_sc, y_sn, y_sh, y_sw, y_sc, SH, SW, PH, PW, ROW_RUN, CP,
                                 PROLOGUE, IN_RELU, GRAD_PROLOGUE, DOT_PRECISION,
                                 UPCAST_OPERANDS, False, BLOCK_M, BLOCK_N, BLOCK_K)
    out = split.to(tl.int64) * o_split + r * o_sr + s * o_ss + c * o_sc
    tl.store(out_ptr + out[:, None] + (k * o_sk)[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_ok & k_ok[None, :])


@triton.jit
def sum_splits_kernel(partial_ptr, out_ptr, splits, numel, D1, D2, D3,
                      o_s0, o_s1, o_s2, o_s3, BLOCK: tl.constexpr):
    """out[e] = sum of partial[0 .. splits-1, e] in split order, for a dense [D0, D1, D2, D3]
    partial index e, stored through out's own strides."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < numel
    total = sum_in_order(partial_ptr + e.to(tl.int64), ok, splits, numel)
    i3 = e % D3
    i2 = (e // D3) % D2
    i1 = (e // (D2 * D3)) % D1
    i0 = e // (D1 * D2 * D3)
    tl.store(out_ptr + i0 * o_s0 + i1 * o_s1 + i2 * o_s2 + i3 * o_s3,
             total.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launches

def phase_steps(stride: int, dilation: int) -> tuple[int, int, int]:
    """(tap step, output-row step, inverse): taps reaching one stride phase repeat every
    stride / g (g = gcd(stride, dilation)) and move the output row by dilation / g; the
    inverse of dilation / g modulo the tap step finds a phase's first tap."""
    g = math.gcd(stride, dilation)
    return stride // g, dilation // g, pow(dilation // g, -1, stride // g)


def phase_pixels(N: int, H: int, W: int, geometry: ConvGeometry) -> int:
    """Input pixels of the largest stride phase: the M extent of the grid."""
    return N * triton.cdiv(H, geometry.stride[0]) * triton.cdiv(W, geometry.stride[1])


def dgrad_m_tiles(dx_shape: tuple[int, ...], geometry: ConvGeometry, config: TileConfig
                  ) -> int:
    """A dgrad's M tiles per stride phase: grid axis 0."""
    N, _, H, W = dx_shape
    return triton.cdiv(phase_pixels(N, H, W, geometry), config.block_m)


def dgrad_sum_rows(dx_shape: tuple[int, ...], geometry: ConvGeometry, config: TileConfig
                   ) -> int:
    """The rows of a ``BatchNormGradEpilogue``'s ``sums`` [rows, 2, C] for a dgrad of dx
    ``dx_shape`` on ``config``: one per stride phase and M tile (phase * M tiles + M tile),
    each written by its programs (one per channel tile, disjoint channels)."""
    return dgrad_m_tiles(dx_shape, geometry, config) * geometry.stride[0] * geometry.stride[1]


def dgrad_launch(dy: torch.Tensor, weight_rsck: torch.Tensor, dx: torch.Tensor,
                 geometry: ConvGeometry, operand: Operand, config: TileConfig, *,
                 grad_prologue: GradientPrologue | None = None,
                 epilogue: BatchNormGradEpilogue | None = None) -> Launch:
    """``weight_rsck`` is the [R, S, C, K_out]-shaped weight (any strides). dy is read
    through ``grad_prologue`` where given; with ``epilogue``, dx receives its du * scale and
    its ``sums`` (``dgrad_sum_rows`` rows) the partial sums."""
    N, C, H, W = dx.shape
    K_out, P, Q = dy.shape[1:]
    R, S = geometry.kernel
    (SH, SW), (DH, DW) = geometry.stride, geometry.dilation
    (step_r, dstep_r, inverse_r), (step_s, dstep_s, inverse_s) = (phase_steps(SH, DH),
                                                                  phase_steps(SW, DW))
    w_sr, w_ss, w_sc, w_sk = weight_rsck.stride()
    gradient = gradient_operands(grad_prologue, dy)
    batch_norm = batch_norm_grad_operands(epilogue, dx, dgrad_sum_rows(dx.shape, geometry,
                                                                       config))
    return Launch(
        conv2d_dgrad_kernel,
        (dgrad_m_tiles(dx.shape, geometry, config), triton.cdiv(C, config.block_n), SH * SW),
        args={"dy_ptr": dy, "w_ptr": weight_rsck, "dx_ptr": dx,
              "N": N, "H": H, "W": W, "P": P, "Q": Q, "C": C, "K_out": K_out,
              **strided_args("dy", dy),
              "w_sk": w_sk, "w_sc": w_sc, "w_sr": w_sr, "w_ss": w_ss,
              **strided_args("dx", dx), **gradient.args, **batch_norm.args},
        extents={"dy_ptr": strided_extent("dy", (N, K_out, P, Q)),
                 "w_ptr": Extent((R, S, C, K_out), ("w_sr", "w_ss", "w_sc", "w_sk")),
                 "dx_ptr": strided_extent("dx", (N, C, H, W)), **gradient.extents,
                 **batch_norm.extents},
        constexprs={"R": R, "S": S, **geometry.constexprs(),
                    "STEP_R": step_r, "STEP_S": step_s, "DSTEP_R": dstep_r,
                    "DSTEP_S": dstep_s, "INVERSE_R": inverse_r, "INVERSE_S": inverse_s,
                    "EVEN_K": K_out % config.block_k == 0, **gradient.constexprs,
                    **batch_norm.constexprs, **gemm_constexprs(operand, dy.dtype, config)},
        num_warps=config.num_warps, num_stages=config.num_stages,
        name=f"conv2d_dgrad[{config.name}{gradient.mark}{batch_norm.mark}]")


class FusedOperands(NamedTuple):
    """What an optional fused operand (``GradientPrologue``, ``BatchNormGradEpilogue``) adds
    to a launch: its pointer and stride arguments (absent: a placeholder tensor, never read,
    and zero strides), their extents, its constexprs, and its mark in the launch's name."""
    args: dict
    extents: dict
    constexprs: dict
    mark: str


def gradient_operands(prologue: GradientPrologue | None, dy: torch.Tensor) -> FusedOperands:
    """The operands of ``prologue`` on dy [N, K_out, P, Q]: y_ptr and grad_scale_ptr /
    grad_shift_ptr with their strides, and GRAD_PROLOGUE."""
    vectors = ("grad_scale", "grad_shift")
    if prologue is None:
        return FusedOperands(
            {"y_ptr": dy, **{f"{name}_ptr": dy for name in vectors},
             **dict.fromkeys(("y_sn", "y_sh", "y_sw", "y_sc"), 0),
             **{f"{name}_s": 0 for name in vectors}},
            {"y_ptr": UNUSED, **{f"{name}_ptr": UNUSED for name in vectors}},
            {"GRAD_PROLOGUE": False}, "")
    K_out = dy.shape[1]
    tensors = dict(zip(vectors, (prologue.scale, prologue.shift)))
    return FusedOperands(
        {"y_ptr": prologue.y, **{f"{name}_ptr": t for name, t in tensors.items()},
         **strided_args("y", prologue.y), **{f"{name}_s": t.stride(0)
                                             for name, t in tensors.items()}},
        {"y_ptr": strided_extent("y", tuple(dy.shape)),
         **{f"{name}_ptr": Extent((K_out,), (f"{name}_s",), FP32) for name in vectors}},
        {"GRAD_PROLOGUE": True}, ",grad_prologue")


def batch_norm_grad_operands(epilogue: BatchNormGradEpilogue | None, dx: torch.Tensor,
                             rows: int) -> FusedOperands:
    """The operands of ``epilogue`` on dx [N, C, H, W] with ``rows`` sum rows: x_ptr,
    mean_ptr, bn_scale_ptr, bn_shift_ptr with their strides and sums_ptr, and BN_GRAD,
    BN_RELU."""
    vectors = ("mean", "bn_scale", "bn_shift")
    pointers = ("x_ptr", *(f"{name}_ptr" for name in vectors), "sums_ptr")
    if epilogue is None:
        return FusedOperands(
            {**dict.fromkeys(pointers, dx),
             **dict.fromkeys(("x_sn", "x_sh", "x_sw", "x_sc"), 0),
             **{f"{name}_s": 0 for name in vectors}},
            dict.fromkeys(pointers, UNUSED), {"BN_GRAD": False, "BN_RELU": False}, "")
    C = dx.shape[1]
    normalization = epilogue.normalization
    tensors = dict(zip(vectors, (epilogue.mean, normalization.scale, normalization.shift)))
    return FusedOperands(
        {"x_ptr": epilogue.x, **{f"{name}_ptr": t for name, t in tensors.items()},
         "sums_ptr": epilogue.sums, **strided_args("x", epilogue.x),
         **{f"{name}_s": t.stride(0) for name, t in tensors.items()}},
        {"x_ptr": strided_extent("x", tuple(dx.shape)),
         **{f"{name}_ptr": Extent((C,), (f"{name}_s",), FP32) for name in vectors},
         "sums_ptr": dense(rows, 2, C, dtypes=FP32)},
        {"BN_GRAD": True, "BN_RELU": normalization.relu},
        ",bn_grad_relu" if normalization.relu else ",bn_grad")


def wgrad_launch(x: torch.Tensor, dy: torch.Tensor, out: torch.Tensor,
                 bias_out: torch.Tensor | None, splits: int, per_split: int,
                 geometry: ConvGeometry, operand: Operand, config: TileConfig, *,
                 prologue: InputNormalization | None = None,
                 grad_prologue: GradientPrologue | None = None) -> Launch:
    """``out`` [splits, R, S, C, K_out] (any strides) receives split i's dW, ``bias_out``
    [splits, K_out] (K_out contiguous) its db: partial buffers, or with one split views of
    dW and db themselves. x [N, C, H, W] any strides, read through the input ``prologue``
    where given, dy through ``grad_prologue`` (db too sums what it gives); a first layer
    (C < SMALL_C) takes ``row_run_wgrad_launch``."""
    N, C, H, W = x.shape
    R, S = geometry.kernel
    extra = prologue_operands(prologue, x, C)
    return _wgrad_launch(
        dy, out, bias_out, splits, per_split, geometry, operand, config, C,
        (triton.cdiv(R * S * C, config.block_m),),
        args={"x_ptr": x, "H": H, "W": W, **strided_args("x", x), **extra.args},
        extents={"x_ptr": strided_extent("x", (N, C, H, W)), **extra.extents},
        constexprs={**geometry.constexprs(), "TAP_ALIGNED": C % config.block_m == 0,
                    "ROW_RUN": False, "CP": 1, **extra.constexprs},
        grad_prologue=grad_prologue)


def row_run_wgrad_launch(x_run: torch.Tensor, dy: torch.Tensor, out: torch.Tensor,
                         bias_out: torch.Tensor | None, splits: int, per_split: int,
                         geometry: ConvGeometry, operand: Operand, config: TileConfig, *,
                         grad_prologue: GradientPrologue | None = None) -> Launch:
    """``wgrad_launch`` of a first layer reading ``x_run``, x's padded copy, dense
    [N, H', W', CP] (``conv2d.run_copy_shape``): M runs over (r, s, c) with c < CP, the
    columns c >= C (zeros in x) are not stored. An input prologue is the copy's
    (``nhwc.padded_copy_launch``); dy is read through ``grad_prologue`` where given."""
    N, HP, WP, CP = x_run.shape
    R, S = geometry.kernel
    extra = prologue_operands(None, x_run, CP)
    return _wgrad_launch(
        dy, out, bias_out, splits, per_split, geometry, operand, config, out.shape[3],
        (triton.cdiv(R * S * CP, config.block_m),),
        args={"x_ptr": x_run, "H": HP, "W": WP, "x_sn": 0, "x_sh": 0, "x_sw": 0, "x_sc": 0,
              **extra.args},
        extents={"x_ptr": dense(N, HP, WP, CP), **extra.extents},
        constexprs={**geometry.constexprs(), "PH": 0, "PW": 0, "TAP_ALIGNED": False,
                    "ROW_RUN": True, "CP": CP, **extra.constexprs},
        grad_prologue=grad_prologue)


def _wgrad_launch(dy: torch.Tensor, out: torch.Tensor, bias_out: torch.Tensor | None,
                  splits: int, per_split: int, geometry: ConvGeometry, operand: Operand,
                  config: TileConfig, C: int, m_tiles: tuple[int], args: dict,
                  extents: dict, constexprs: dict, *,
                  grad_prologue: GradientPrologue | None) -> Launch:
    """A wgrad launch of ``m_tiles`` M tiles: x's ``args``, ``extents`` and ``constexprs``
    (those of one path) joined with dy's (through ``grad_prologue`` where given), the
    outputs' and the tile's."""
    N, K_out, P, Q = dy.shape
    R, S = geometry.kernel
    o_split, o_sr, o_ss, o_sc, o_sk = out.stride()
    gradient = gradient_operands(grad_prologue, dy)
    return Launch(
        conv2d_wgrad_kernel, (*m_tiles, triton.cdiv(K_out, config.block_n), splits),
        args={**args, "dy_ptr": dy, "out_ptr": out,
              "bias_out_ptr": bias_out if bias_out is not None else out,
              "P": P, "Q": Q, "C": C, "K_out": K_out, "pixels": N * P * Q,
              "split_pixels_count": per_split, **strided_args("dy", dy),
              "o_split": o_split, "o_sr": o_sr, "o_ss": o_ss, "o_sc": o_sc, "o_sk": o_sk,
              "b_split": bias_out.stride(0) if bias_out is not None else 0,
              **gradient.args},
        extents={**extents, "dy_ptr": strided_extent("dy", (N, K_out, P, Q)),
                 "out_ptr": Extent((splits, R, S, C, K_out),
                                   ("o_split", "o_sr", "o_ss", "o_sc", "o_sk")),
                 "bias_out_ptr": UNUSED if bias_out is None
                 else Extent((splits, K_out), ("b_split", 1)), **gradient.extents},
        constexprs={"R": R, "S": S, **constexprs, "HAS_BIAS": bias_out is not None,
                    **gradient.constexprs, **gemm_constexprs(operand, dy.dtype, config)},
        num_warps=config.num_warps, num_stages=config.num_stages,
        name=f"conv2d_wgrad[{config.name}{prologue_suffix(constexprs, ',')}"
             f"{gradient.mark}]")


def merge_launch(partial: torch.Tensor, out: torch.Tensor, config: TileConfig) -> Launch:
    """Sum a dense [splits, D0, D1, D2, D3] fp32 partial over splits into ``out``
    [D0, D1, D2, D3] (any strides), ``config.block_m`` elements a program."""
    splits, d0, d1, d2, d3 = partial.shape
    s0, s1, s2, s3 = out.stride()
    return Launch(sum_splits_kernel, (triton.cdiv(d0 * d1 * d2 * d3, config.block_m),),
                  args={"partial_ptr": partial, "out_ptr": out, "splits": splits,
                        "numel": d0 * d1 * d2 * d3, "D1": d1, "D2": d2, "D3": d3,
                        "o_s0": s0, "o_s1": s1, "o_s2": s2, "o_s3": s3},
                  extents={"partial_ptr": dense(splits, d0, d1, d2, d3,
                                                dtypes=(torch.float32,)),
                           "out_ptr": Extent((d0, d1, d2, d3), ("o_s0", "o_s1", "o_s2", "o_s3"))},
                  constexprs={"BLOCK": config.block_m}, num_warps=config.num_warps,
                  name="conv2d_wgrad_merge")
