"""BatchNorm2d for training and inference, forward and backward, on [pixels x channels] NHWC
tiles (channels_last is the coalesced fast path; any strides work). Every statistic is fp32
whatever the input dtype; offsets are int64; no atomics, every merge runs in a fixed order,
so results are bitwise reproducible.

Forward:
1. ``welford_partials_kernel``: a program (a tile of pixels x a block of channels) keeps a
   Welford mean and M2 per (row lane, channel) across its pixel blocks, merges its lanes with
   Chan's formula and writes one (count, mean, M2) per channel into a [3, tiles, C] fp32
   buffer: the layout of the convolution's STATS epilogue, so both feed the finalize.
2. ``batch_norm_finalize_kernel`` merges the partials with Chan's formula (never
   E[x^2] - E[x]^2) into mean and invstd = 1/sqrt(biased var + eps), the per-channel
   scale = gamma * invstd and shift = beta, and updates running_mean / running_var with the
   momentum and the unbiased variance. In eval mode it reads the running statistics instead.
3. ``batch_norm_apply_kernel``: y = (x - mean) * scale + shift, then ReLU if asked. Centring
   before scaling leaves one error on a channel of mean 1e4 and std 1, the fp32 rounding of
   the mean (x - mean is exact for nearby values); the folded x * scale + (beta - mean *
   scale) adds two more roundings at the scale of the mean, about 1e-3 in all.
   ``batch_norm_max_pool2d_kernel`` / ``batch_norm_avg_pool2d_kernel`` normalise
   each tap of the following pool's window instead, so the normalised tensor is never
   written; the max pool keeps the window offsets its (unchanged) backward gather needs.

Backward (x_hat recomputed from x, mean and invstd: x is saved anyway, and y does not exist
when a pool follows):
4. ``batch_norm_backward_partials_kernel``: per-tile sums of dy and dy * x_hat, dy masked by
   the ReLU (z recomputed exactly as the forward computed it), into [2, tiles, C] fp32;
   ``batch_norm_backward_reduce_kernel`` sums the tiles: dbeta = sum dy, dgamma = sum dy*x_hat.
5. ``batch_norm_backward_input_kernel``: dx = scale * (dy - sum dy / n - x_hat * sum dy*x_hat
   / n) in training; dx = scale * dy in eval mode (the running statistics are constants).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastarch import backend

from . import avg_pool, configs, max_pool
from .launch import UNUSED, Extent, Launch, dense, vector
from .max_pool import window_offset_dtype
from .welford import chan_merge
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

FP32 = (torch.float32,)


@triton.jit
def _relu_grad(dy, x, mean, scale, shift):
    """torch's threshold_backward on the recomputed pre-ReLU value: zero where z <= 0."""
    return tl.where(normalize(x, mean, scale, shift, False) <= 0.0, 0.0, dy)


@triton.jit
def _tile_rows(tile, step, M, TILE_STEPS, BLOCK_M: tl.constexpr):
    """Pixel rows of block ``step`` of reduction tile ``tile``."""
    m = (tile.to(tl.int64) * TILE_STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
    return m, m < M


@triton.jit
def welford_partials_kernel(
    x_ptr, partial_ptr, M, C, H, W, TILE_STEPS,
    x_sn, x_sh, x_sw, x_sc,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    # Every statistic is of x - pivot, the tile's first pixel (see kernels/welford.py).
    n0, h0, w0 = split_pixel(tile.to(tl.int64) * TILE_STEPS * BLOCK_M, H, W)
    pivot = tl.load(x_ptr + n0 * x_sn + h0 * x_sh + w0 * x_sw + c * x_sc, mask=c_ok,
                    other=0.0).to(tl.float32)
    count = tl.zeros((BLOCK_M,), tl.float32)
    mean = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    m2 = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for step in range(TILE_STEPS):
        m, m_ok = _tile_rows(tile, step, M, TILE_STEPS, BLOCK_M)
        n, h, w = split_pixel(m, H, W)
        ok = m_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + address(n, h, w, c, x_sn, x_sh, x_sw, x_sc), mask=ok,
                    other=0.0).to(tl.float32) - pivot[None, :]
        count += m_ok.to(tl.float32)
        delta = tl.where(ok, x - mean, 0.0)
        mean += delta / tl.maximum(count, 1.0)[:, None]
        m2 += delta * (x - mean)
    # Chan's formula across the row lanes (a lane past the end has count 0 and adds nothing).
    lanes = tl.broadcast_to(count[:, None], (BLOCK_M, BLOCK_C))
    total, tile_offset, tile_m2 = chan_merge(lanes, mean, m2, lanes > 0)
    tile_mean = pivot + tile_offset
    plane = tl.num_programs(0).to(tl.int64) * C
    offsets = tile.to(tl.int64) * C + c
    tl.store(partial_ptr + offsets, total, mask=c_ok)
    tl.store(partial_ptr + plane + offsets, tile_mean, mask=c_ok)
    tl.store(partial_ptr + 2 * plane + offsets, tile_m2, mask=c_ok)


@triton.jit
def _merge_welford(count_ptr, mean_ptr, m2_ptr, NUM_TILES, c, c_ok, p_st, p_sc,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """(count, mean, M2) per channel from [tiles, C] partials: Chan's formula within each
    block of BLOCK_T tiles, then between the blocks, in tile order, on the tile means less
    the first tile's (see kernels/welford.py)."""
    pivot = tl.load(mean_ptr + c * p_sc, mask=c_ok & (NUM_TILES > 0), other=0.0)
    n = tl.zeros((BLOCK_C,), tl.float32)
    offset = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for start in range(0, NUM_TILES, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        ok = (t < NUM_TILES)[:, None] & c_ok[None, :]
        offsets = t.to(tl.int64)[:, None] * p_st + c[None, :] * p_sc
        tile_count = tl.load(count_ptr + offsets, mask=ok, other=0.0)
        tile_offset = tl.load(mean_ptr + offsets, mask=ok, other=0.0) - pivot[None, :]
        tile_m2 = tl.load(m2_ptr + offsets, mask=ok, other=0.0)
        n_b, offset_b, m2_b = chan_merge(tile_count, tile_offset, tile_m2, ok)
        n_ab = n + n_b
        delta = offset_b - offset
        weight_b = n_b / tl.maximum(n_ab, 1.0)
        offset += delta * weight_b
        m2 += m2_b + delta * delta * n * weight_b
        n = n_ab
    return n, pivot + offset, m2


@triton.jit
def batch_norm_finalize_kernel(
    count_ptr, mean_ptr, m2_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
    save_mean_ptr, save_invstd_ptr, scale_ptr, shift_ptr,
    NUM_TILES, C, p_st, p_sc, w_s, b_s, rm_s, rv_s, momentum, eps,
    TRAINING: tl.constexpr, UPDATE_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if TRAINING:
        n, mean, m2 = _merge_welford(count_ptr, mean_ptr, m2_ptr, NUM_TILES, c, c_ok,
                                     p_st, p_sc, BLOCK_T, BLOCK_C)
        var = m2 / tl.maximum(n, 1.0)  # n = 0 only on masked channels
        if UPDATE_RUNNING:
            running_mean = tl.load(running_mean_ptr + c * rm_s, mask=c_ok).to(tl.float32)
            running_var = tl.load(running_var_ptr + c * rv_s, mask=c_ok).to(tl.float32)
            running_mean = (1.0 - momentum) * running_mean + momentum * mean
            running_var = (1.0 - momentum) * running_var + momentum * (m2 / (n - 1.0))
            tl.store(running_mean_ptr + c * rm_s,
                     running_mean.to(running_mean_ptr.dtype.element_ty), mask=c_ok)
            tl.store(running_var_ptr + c * rv_s,
                     running_var.to(running_var_ptr.dtype.element_ty), mask=c_ok)
    else:
        mean = tl.load(running_mean_ptr + c * rm_s, mask=c_ok, other=0.0).to(tl.float32)
        var = tl.load(running_var_ptr + c * rv_s, mask=c_ok, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt_rn(var + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * channel_vector(weight_ptr, c * w_s, c_ok)
    shift = tl.zeros_like(scale)
    if HAS_BIAS:
        shift = channel_vector(bias_ptr, c * b_s, c_ok)
    tl.store(save_mean_ptr + c, mean, mask=c_ok)
    tl.store(save_invstd_ptr + c, invstd, mask=c_ok)
    tl.store(scale_ptr + c, scale, mask=c_ok)
    tl.store(shift_ptr + c, shift, mask=c_ok)


@triton.jit
def batch_norm_apply_kernel(
    x_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, M, C, H, W,
    x_sn, x_sh, x_sw, x_sc, y_sn, y_sh, y_sw, y_sc,
    RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    m, c, m_ok, c_ok = pixel_tile(M, C, BLOCK_M, BLOCK_C)
    n, h, w = split_pixel(m, H, W)
    mask = m_ok[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + address(n, h, w, c, x_sn, x_sh, x_sw, x_sc), mask=mask,
                other=0.0).to(tl.float32)
    y = normalize(x, channel_vector(mean_ptr, c, c_ok), channel_vector(scale_ptr, c, c_ok),
                   channel_vector(shift_ptr, c, c_ok), RELU)
    tl.store(y_ptr + address(n, h, w, c, y_sn, y_sh, y_sw, y_sc),
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def batch_norm_backward_partials_kernel(
    x_ptr, dy_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, partial_ptr,
    M, C, H, W, TILE_STEPS,
    x_sn, x_sh, x_sw, x_sc, dy_sn, dy_sh, dy_sw, dy_sc,
    RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = channel_vector(mean_ptr, c, c_ok)
    invstd = channel_vector(invstd_ptr, c, c_ok)
    scale = channel_vector(scale_ptr, c, c_ok)
    shift = channel_vector(shift_ptr, c, c_ok)
    sum_dy = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for step in range(TILE_STEPS):
        m, m_ok = _tile_rows(tile, step, M, TILE_STEPS, BLOCK_M)
        n, h, w = split_pixel(m, H, W)
        ok = m_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + address(n, h, w, c, x_sn, x_sh, x_sw, x_sc), mask=ok,
                    other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + address(n, h, w, c, dy_sn, dy_sh, dy_sw, dy_sc), mask=ok,
                     other=0.0).to(tl.float32)
        if RELU:
            dy = _relu_grad(dy, x, mean, scale, shift)
        sum_dy += dy
        sum_dy_xhat += dy * ((x - mean[None, :]) * invstd[None, :])
    plane = tl.num_programs(0).to(tl.int64) * C
    offsets = tile.to(tl.int64) * C + c
    tl.store(partial_ptr + offsets, tl.sum(sum_dy, axis=0), mask=c_ok)
    tl.store(partial_ptr + plane + offsets, tl.sum(sum_dy_xhat, axis=0), mask=c_ok)


@triton.jit
def batch_norm_backward_reduce_kernel(
    partial_ptr, sum_dy_ptr, sum_dy_xhat_ptr, grad_weight_ptr, grad_bias_ptr, NUM_TILES, C,
    p_sp, p_st, WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sum_dy = tl.zeros((BLOCK_C,), tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_C,), tl.float32)
    for start in range(0, NUM_TILES, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        ok = (t < NUM_TILES)[:, None] & c_ok[None, :]
        offsets = t.to(tl.int64)[:, None] * p_st + c[None, :]
        sum_dy += tl.sum(tl.load(partial_ptr + offsets, mask=ok, other=0.0), axis=0)
        sum_dy_xhat += tl.sum(tl.load(partial_ptr + p_sp + offsets, mask=ok, other=0.0),
                              axis=0)
    tl.store(sum_dy_ptr + c, sum_dy, mask=c_ok)
    tl.store(sum_dy_xhat_ptr + c, sum_dy_xhat, mask=c_ok)
    if WRITE_GRAD_WEIGHT:
        tl.store(grad_weight_ptr + c, sum_dy_xhat.to(grad_weight_ptr.dtype.element_ty),
                 mask=c_ok)
    if WRITE_GRAD_BIAS:
        tl.store(grad_bias_ptr + c, sum_dy.to(grad_bias_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def batch_norm_backward_input_kernel(
    x_ptr, dy_ptr, dx_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
    sum_dy_ptr, sum_dy_xhat_ptr, inv_count, M, C, H, W,
    x_sn, x_sh, x_sw, x_sc, dy_sn, dy_sh, dy_sw, dy_sc, dx_sn, dx_sh, dx_sw, dx_sc,
    TRAINING: tl.constexpr, RELU: tl.constexpr, READ_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    m, c, m_ok, c_ok = pixel_tile(M, C, BLOCK_M, BLOCK_C)
    n, h, w = split_pixel(m, H, W)
    mask = m_ok[:, None] & c_ok[None, :]
    scale = channel_vector(scale_ptr, c, c_ok)
    dy = tl.load(dy_ptr + address(n, h, w, c, dy_sn, dy_sh, dy_sw, dy_sc), mask=mask,
                 other=0.0).to(tl.float32)
    if READ_X:  # training or ReLU
        mean = channel_vector(mean_ptr, c, c_ok)
        x = tl.load(x_ptr + address(n, h, w, c, x_sn, x_sh, x_sw, x_sc), mask=mask,
                    other=0.0).to(tl.float32)
        if RELU:
            dy = _relu_grad(dy, x, mean, scale, channel_vector(shift_ptr, c, c_ok))
    if TRAINING:
        x_hat = (x - mean[None, :]) * channel_vector(invstd_ptr, c, c_ok)[None, :]
        mean_dy = channel_vector(sum_dy_ptr, c, c_ok) * inv_count
        mean_dy_xhat = channel_vector(sum_dy_xhat_ptr, c, c_ok) * inv_count
        dx = scale[None, :] * (dy - mean_dy[None, :] - x_hat * mean_dy_xhat[None, :])
    else:
        dx = scale[None, :] * dy
    tl.store(dx_ptr + address(n, h, w, c, dx_sn, dx_sh, dx_sw, dx_sc),
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launches

def _name(kernel: str, config: configs.PoolConfig, x: torch.Tensor, **flags: bool) -> str:
    """kernel[config,dtype+flag...], the row name in ``python -m fastarch.sm90``."""
    dtype = str(x.dtype).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp")
    return f"{kernel}[{config.name},{dtype}{''.join(f'+{k}' for k, on in flags.items() if on)}]"


class BatchNormStatistics(NamedTuple):
    """Per-channel fp32 [C] vectors; y = (x - mean) * scale + shift is the normalised x
    (scale = gamma * invstd, shift = beta; gamma = 1 and beta = 0 without affine)."""
    mean: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


class BackwardSums(NamedTuple):
    """Per-channel fp32 sums of the (ReLU-masked) output gradient over N*H*W."""
    sum_dy: torch.Tensor
    sum_dy_xhat: torch.Tensor


def _pixels(x: torch.Tensor) -> int:
    return x.shape[0] * x.shape[2] * x.shape[3]


def partials_launch(x: torch.Tensor, partials: torch.Tensor, tile_steps: int,
                    config: configs.PoolConfig) -> Launch:
    """Welford partials of x [N, C, H, W] into ``partials`` [3, tiles, C] fp32."""
    N, C, H, W = x.shape
    return Launch(
        welford_partials_kernel, (partials.shape[1], triton.cdiv(C, config.block_c)),
        args={"x_ptr": x, "partial_ptr": partials, "M": N * H * W, "C": C, "H": H, "W": W,
              "TILE_STEPS": tile_steps, **strided_args("x", x)},
        extents={"x_ptr": strided_extent("x", (N, C, H, W)),
                 "partial_ptr": dense(3, partials.shape[1], C, dtypes=FP32)},
        constexprs={"BLOCK_M": config.block_m, "BLOCK_C": config.block_c},
        num_warps=config.num_warps, name=_name("batch_norm_welford_partials", config, x))


def finalize_launch(partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                    weight: torch.Tensor | None, bias: torch.Tensor | None,
                    running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    stats: BatchNormStatistics, momentum: float, eps: float,
                    config: configs.PoolConfig) -> Launch:
    """Training (``partials`` given: (count, mean, M2), each [tiles, C] with equal strides)
    or eval mode (running statistics read, ``partials`` None); weight, bias and the running
    statistics are [C] vectors of any stride."""
    C = stats.mean.shape[0]
    training = partials is not None
    count, mean, m2 = partials if training else (stats.mean,) * 3
    placeholder = stats.mean
    vectors = {"w": weight, "b": bias, "rm": running_mean, "rv": running_var}
    return Launch(
        batch_norm_finalize_kernel, (triton.cdiv(C, config.block_c),),
        args={"count_ptr": count, "mean_ptr": mean, "m2_ptr": m2,
              "weight_ptr": weight if weight is not None else placeholder,
              "bias_ptr": bias if bias is not None else placeholder,
              "running_mean_ptr": running_mean if running_mean is not None else placeholder,
              "running_var_ptr": running_var if running_var is not None else placeholder,
              "save_mean_ptr": stats.mean, "save_invstd_ptr": stats.invstd,
              "scale_ptr": stats.scale, "shift_ptr": stats.shift,
              "NUM_TILES": count.shape[0] if training else 0, "C": C,
              "p_st": count.stride(0) if training else 0,
              "p_sc": count.stride(1) if training else 0,
              **{f"{name}_s": 0 if t is None else t.stride(0) for name, t in vectors.items()},
              "momentum": float(momentum), "eps": float(eps)},
        extents={**{f"{name}_ptr": Extent((count.shape[0], C), ("p_st", "p_sc"), FP32)
                    if training else UNUSED for name in ("count", "mean", "m2")},
                 "weight_ptr": vector(weight, C, "w_s"), "bias_ptr": vector(bias, C, "b_s"),
                 "running_mean_ptr": vector(running_mean, C, "rm_s"),
                 "running_var_ptr": vector(running_var, C, "rv_s"),
                 **_statistics_extents(C, "save_mean_ptr", "save_invstd_ptr", "scale_ptr",
                                       "shift_ptr")},
        constexprs={"TRAINING": training,
                    "UPDATE_RUNNING": training and running_mean is not None,
                    "HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None,
                    "BLOCK_T": config.block_m, "BLOCK_C": config.block_c},
        num_warps=config.num_warps,
        name=f"batch_norm_finalize[{config.name}{'' if training else '+eval'}]")


def _normalization(stats: BatchNormStatistics) -> max_pool.Normalization:
    """What the pool kernels take to pool the normalised tensor without writing it."""
    return stats.mean, stats.scale, stats.shift


def _stats_args(stats: BatchNormStatistics) -> dict[str, torch.Tensor]:
    return {"mean_ptr": stats.mean, "scale_ptr": stats.scale, "shift_ptr": stats.shift}


def _statistics_extents(channels: int, *names: str) -> dict[str, Extent]:
    """The dense fp32 [C] vectors (statistics, sums) among a launch's arguments."""
    return {name: dense(channels, dtypes=FP32) for name in names}


def apply_launch(x: torch.Tensor, y: torch.Tensor, stats: BatchNormStatistics, relu: bool,
                 config: configs.PoolConfig) -> Launch:
    N, C, H, W = x.shape
    return Launch(
        batch_norm_apply_kernel, grid(N * H * W, C, config),
        args={"x_ptr": x, "y_ptr": y, **_stats_args(stats), "M": N * H * W, "C": C,
              "H": H, "W": W, **strided_args("x", x), **strided_args("y", y)},
        extents={"x_ptr": strided_extent("x", (N, C, H, W)),
                 "y_ptr": strided_extent("y", (N, C, H, W)),
                 **_statistics_extents(C, *_stats_args(stats))},
        constexprs={"RELU": relu, "BLOCK_M": config.block_m, "BLOCK_C": config.block_c},
        num_warps=config.num_warps,
        name=_name("batch_norm_apply", config, x, relu=relu))


def backward_partials_launch(x: torch.Tensor, dy: torch.Tensor, stats: BatchNormStatistics,
                             relu: bool, partials: torch.Tensor, tile_steps: int,
                             config: configs.PoolConfig) -> Launch:
    """Per-tile sums of dy and dy * x_hat into ``partials`` [2, tiles, C] fp32."""
    N, C, H, W = x.shape
    return Launch(
        batch_norm_backward_partials_kernel,
        (partials.shape[1], triton.cdiv(C, config.block_c)),
        args={"x_ptr": x, "dy_ptr": dy, "mean_ptr": stats.mean, "invstd_ptr": stats.invstd,
              "scale_ptr": stats.scale, "shift_ptr": stats.shift, "partial_ptr": partials,
              "M": N * H * W, "C": C, "H": H, "W": W, "TILE_STEPS": tile_steps,
              **strided_args("x", x), **strided_args("dy", dy)},
        extents={"x_ptr": strided_extent("x", (N, C, H, W)),
                 "dy_ptr": strided_extent("dy", (N, C, H, W)),
                 **_statistics_extents(C, "mean_ptr", "invstd_ptr", "scale_ptr", "shift_ptr"),
                 "partial_ptr": dense(2, partials.shape[1], C, dtypes=FP32)},
        constexprs={"RELU": relu, "BLOCK_M": config.block_m, "BLOCK_C": config.block_c},
        num_warps=config.num_warps,
        name=_name("batch_norm_backward_partials", config, x, relu=relu))


def backward_reduce_launch(partials: torch.Tensor, sums: BackwardSums,
                           grad_weight: torch.Tensor | None, grad_bias: torch.Tensor | None,
                           config: configs.PoolConfig) -> Launch:
    _, tiles, C = partials.shape
    return Launch(
        batch_norm_backward_reduce_kernel, (triton.cdiv(C, config.block_c),),
        args={"partial_ptr": partials, "sum_dy_ptr": sums.sum_dy,
              "sum_dy_xhat_ptr": sums.sum_dy_xhat,
              "grad_weight_ptr": grad_weight if grad_weight is not None else sums.sum_dy,
              "grad_bias_ptr": grad_bias if grad_bias is not None else sums.sum_dy,
              "NUM_TILES": tiles, "C": C, "p_sp": partials.stride(0),
              "p_st": partials.stride(1)},
        extents={"partial_ptr": Extent((2, tiles, C), ("p_sp", "p_st", 1), FP32),
                 **_statistics_extents(C, "sum_dy_ptr", "sum_dy_xhat_ptr"),
                 "grad_weight_ptr": UNUSED if grad_weight is None else dense(C),
                 "grad_bias_ptr": UNUSED if grad_bias is None else dense(C)},
        constexprs={"WRITE_GRAD_WEIGHT": grad_weight is not None,
                    "WRITE_GRAD_BIAS": grad_bias is not None,
                    "BLOCK_T": config.block_m, "BLOCK_C": config.block_c},
        num_warps=config.num_warps, name=f"batch_norm_backward_reduce[{config.name}]")


def backward_input_launch(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                          stats: BatchNormStatistics, sums: BackwardSums | None, relu: bool,
                          config: configs.PoolConfig) -> Launch:
    """dx in training (``sums`` given) or eval mode (``sums`` None)."""
    N, C, H, W = x.shape
    training = sums is not None
    return Launch(
        batch_norm_backward_input_kernel, grid(N * H * W, C, config),
        args={"x_ptr": x, "dy_ptr": dy, "dx_ptr": dx, "mean_ptr": stats.mean,
              "invstd_ptr": stats.invstd, "scale_ptr": stats.scale, "shift_ptr": stats.shift,
              "sum_dy_ptr": sums.sum_dy if training else stats.mean,
              "sum_dy_xhat_ptr": sums.sum_dy_xhat if training else stats.mean,
              "inv_count": 1.0 / max(N * H * W, 1), "M": N * H * W, "C": C, "H": H, "W": W,
              **strided_args("x", x), **strided_args("dy", dy), **strided_args("dx", dx)},
        extents={**{f"{name}_ptr": strided_extent(name, (N, C, H, W))
                    for name in ("x", "dy", "dx")},
                 **_statistics_extents(C, "mean_ptr", "invstd_ptr", "scale_ptr", "shift_ptr"),
                 **(_statistics_extents(C, "sum_dy_ptr", "sum_dy_xhat_ptr") if training
                    else {"sum_dy_ptr": UNUSED, "sum_dy_xhat_ptr": UNUSED})},
        constexprs={"TRAINING": training, "RELU": relu, "READ_X": training or relu,
                    "BLOCK_M": config.block_m, "BLOCK_C": config.block_c},
        num_warps=config.num_warps,
        name=_name("batch_norm_backward_input", config, x, eval=not training, relu=relu))


# ----------------------------------------------------------------------------- launchers

def _empty_statistics(channels: int, device: torch.device) -> BatchNormStatistics:
    return BatchNormStatistics(*(backend.empty((channels,), torch.float32, device)
                                 for _ in range(4)))


def _reduction_tiles(x: torch.Tensor) -> tuple[configs.PoolConfig, int, int]:
    """(tile config, pixel blocks per tile, tiles) of a reduction over x's pixels."""
    C = x.shape[1]
    pixels = _pixels(x)
    config = configs.batch_norm_config(C, backend.INTERPRETER, pixels, reduction=True)
    steps = configs.batch_norm_tile_steps(pixels, C, config, backend.INTERPRETER)
    return config, steps, max(1, triton.cdiv(pixels, steps * config.block_m))


def partial_tiles(x: torch.Tensor) -> int:
    """The pixel tiles ``welford_partials`` and ``batch_norm_backward_sums`` split x into
    (the partials' tile dimension): what a shape function needs without running them."""
    return _reduction_tiles(x)[2]


def welford_partial_buffer(x: torch.Tensor) -> torch.Tensor:
    """(count, mean, M2) per pixel tile and channel of x [N, C, H, W] (N*H*W > 0) in one
    [3, tiles, C] fp32 buffer."""
    config, steps, tiles = _reduction_tiles(x)
    partials = backend.empty((3, tiles, x.shape[1]), torch.float32, x.device)
    partials_launch(x, partials, steps, config)()
    return partials


def welford_partials(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``welford_partial_buffer`` as (count, mean, M2), each a [tiles, C] fp32 view of the
    buffer: what ``batch_norm_finalize`` takes."""
    partials = welford_partial_buffer(x)
    return partials[0], partials[1], partials[2]


def batch_norm_finalize(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                        weight: torch.Tensor | None, bias: torch.Tensor | None,
                        running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                        momentum: float, eps: float) -> BatchNormStatistics:
    """Batch statistics from Welford partials (ours or the conv epilogue's: [tiles, C] fp32
    each, equal strides); updates running_mean / running_var in place (if given) with
    ``momentum`` (the exponential-average factor: 1/num_batches_tracked for a cumulative
    average) and the unbiased variance."""
    if not count.stride() == mean.stride() == m2.stride():
        raise ValueError("batch_norm_finalize: count, mean and m2 must share their strides")
    C = count.shape[1]
    stats = _empty_statistics(C, count.device)
    config = configs.batch_norm_merge_config(C, backend.INTERPRETER)
    finalize_launch((count, mean, m2), _vector(weight), _vector(bias), running_mean,
                    running_var, stats, momentum, eps, config)()
    if running_mean is not None:
        torch.autograd.graph.increment_version((running_mean, running_var))
    return stats


def batch_norm_running_statistics(running_mean: torch.Tensor, running_var: torch.Tensor,
                                  weight: torch.Tensor | None, bias: torch.Tensor | None,
                                  eps: float) -> BatchNormStatistics:
    """Eval mode: the statistics that normalise with the running mean and variance."""
    C = running_mean.shape[0]
    stats = _empty_statistics(C, running_mean.device)
    config = configs.batch_norm_merge_config(C, backend.INTERPRETER)
    finalize_launch(None, _vector(weight), _vector(bias), running_mean, running_var, stats,
                    0.0, eps, config)()
    return stats


def _vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """weight or bias (C elements, any shape torch takes) as a [C] vector: a view when its
    strides allow, since the finalize takes any stride."""
    return None if t is None else t.reshape(-1)


def batch_norm_apply(x: torch.Tensor, stats: BatchNormStatistics, relu: bool) -> torch.Tensor:
    """y = (x - mean) * scale + shift [ReLU], in x's dtype and memory format."""
    N, C, H, W = x.shape
    y = backend.empty(x.shape, x.dtype, x.device, backend.memory_format_of(x))
    config = configs.batch_norm_config(C, backend.INTERPRETER, N * H * W)
    apply_launch(x, y, stats, relu, config)()
    return y


def batch_norm_max_pool2d_forward(x: torch.Tensor, stats: BatchNormStatistics, relu: bool,
                                  geometry: PoolGeometry, keep_offsets: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """max_pool2d of the normalised (and ReLU'd) x without writing it; with ``keep_offsets``
    also the window offsets ``max_pool.max_pool2d_backward`` takes."""
    N, C, H, W = x.shape
    P, Q = geometry.output_size(H, W)
    fmt = backend.memory_format_of(x)
    y = backend.empty((N, C, P, Q), x.dtype, x.device, fmt)
    offsets = (backend.empty((N, C, P, Q), window_offset_dtype(geometry), x.device, fmt)
               if keep_offsets else None)
    config = configs.batch_norm_config(C, backend.INTERPRETER, N * P * Q)
    max_pool.forward_launch(x, y, offsets, None, geometry, config, _normalization(stats),
                            relu)()
    return y, offsets


def batch_norm_avg_pool2d_forward(x: torch.Tensor, stats: BatchNormStatistics, relu: bool,
                                  geometry: PoolGeometry, count_include_pad: bool,
                                  divisor_override: int | None) -> torch.Tensor:
    """avg_pool2d of the normalised (and ReLU'd) x without writing it."""
    N, C, H, W = x.shape
    P, Q = geometry.output_size(H, W)
    y = backend.empty((N, C, P, Q), x.dtype, x.device, backend.memory_format_of(x))
    config = configs.batch_norm_config(C, backend.INTERPRETER, N * P * Q)
    avg_pool.avg_forward_launch(x, y, geometry, count_include_pad, divisor_override, config,
                                _normalization(stats), relu)()
    return y


def batch_norm_backward_sums(x: torch.Tensor, dy: torch.Tensor, stats: BatchNormStatistics,
                             relu: bool, grad_weight_dtype: torch.dtype | None,
                             grad_bias_dtype: torch.dtype | None
                             ) -> tuple[BackwardSums, torch.Tensor | None, torch.Tensor | None]:
    """One pass over x and dy: the fp32 sums the training dx needs, and dgamma (sum dy*x_hat)
    and dbeta (sum dy) in the given dtypes (None: not computed)."""
    C = x.shape[1]
    config, steps, tiles = _reduction_tiles(x)
    partials = backend.empty((2, tiles, C), torch.float32, x.device)
    backward_partials_launch(x, dy, stats, relu, partials, steps, config)()
    sums = BackwardSums(*(backend.empty((C,), torch.float32, x.device) for _ in range(2)))
    grad_weight = (backend.empty((C,), grad_weight_dtype, x.device)
                   if grad_weight_dtype is not None else None)
    grad_bias = (backend.empty((C,), grad_bias_dtype, x.device)
                 if grad_bias_dtype is not None else None)
    merge = configs.batch_norm_merge_config(C, backend.INTERPRETER)
    backward_reduce_launch(partials, sums, grad_weight, grad_bias, merge)()
    return sums, grad_weight, grad_bias


def batch_norm_backward_input(x: torch.Tensor, dy: torch.Tensor, stats: BatchNormStatistics,
                              sums: BackwardSums | None, relu: bool) -> torch.Tensor:
    """dx in x's dtype and memory format: training when ``sums`` are given (batch
    statistics), eval mode (constant running statistics) when None."""
    N, C, H, W = x.shape
    dx = backend.empty(x.shape, dy.dtype, x.device, backend.memory_format_of(x))
    config = configs.batch_norm_config(C, backend.INTERPRETER, N * H * W)
    backward_input_launch(x, dy, dx, stats, sums, relu, config)()
    return dx


def sm90_launches() -> list[Launch]:
    """Every GPU config on a VGG-like 64 x C x 56 x 56 activation (C the config's width,
    256 for the widest), 2x2 max pool and 3x3 avg pool; fp32 on the widest tile only."""
    launches = []
    for dtype in (torch.bfloat16, torch.float32):
        for config in configs.BATCH_NORM_CONFIGS.values():
            if dtype == torch.float32 and config.name != "c128":
                continue  # fp32 differs from bf16 only in vector width: the widest tile shows it
            launches += _sm90_tile_launches(config, dtype)
    C = 256
    stats = BatchNormStatistics(*(meta_tensor((C,), torch.float32, False) for _ in range(4)))
    partials = meta_tensor((3, 512, C), torch.float32, False)
    running = meta_tensor((C,), torch.float32, False)
    merge = configs.BATCH_NORM_MERGE_CONFIG
    launches += [
        finalize_launch(tuple(partials), running, running, running, running, stats, 0.1, 1e-5,
                        merge),
        finalize_launch(None, running, running, running, running, stats, 0.0, 1e-5, merge),
        backward_reduce_launch(meta_tensor((2, 512, C), torch.float32, False),
                               BackwardSums(running, running), running, running, merge),
    ]
    return launches


def _sm90_tile_launches(config: configs.PoolConfig, dtype: torch.dtype) -> list[Launch]:
    C = 256 if config.name == "c128" else config.block_c
    x = meta_tensor((64, C, 56, 56), dtype)
    stats = BatchNormStatistics(*(meta_tensor((C,), torch.float32, False) for _ in range(4)))
    max_geometry = PoolGeometry((2, 2), (2, 2), (0, 0))
    avg_geometry = PoolGeometry((3, 3), (2, 2), (1, 1))
    pooled = meta_tensor((64, C, 28, 28), dtype)
    steps = configs.batch_norm_tile_steps(64 * 56 * 56, C, config, False)
    tiles = triton.cdiv(64 * 56 * 56, steps * config.block_m)
    return [
        partials_launch(x, meta_tensor((3, tiles, C), torch.float32, False), steps, config),
        apply_launch(x, x, stats, True, config),
        max_pool.forward_launch(x, pooled, meta_tensor((64, C, 28, 28), torch.int8), None,
                                max_geometry, config, _normalization(stats), True),
        avg_pool.avg_forward_launch(x, pooled, avg_geometry, True, None, config,
                                    _normalization(stats), True),
        backward_partials_launch(x, x, stats, True,
                                 meta_tensor((2, tiles, C), torch.float32, False), steps, config),
        backward_input_launch(x, x, x, stats, BackwardSums(stats.mean, stats.mean), True,
                              config),
        backward_input_launch(x, x, x, stats, None, False, config),
    ]
