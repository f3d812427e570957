"""BatchNorm2d for training and inference, forward and backward, on [pixels x channels] NHWC
tiles (dense channels_last is the vectorized fast path, any strides work: ``kernels.nhwc``):
the @triton.jit kernels and their launch builders. Every statistic is fp32 whatever the
input dtype; no atomics, every merge runs in a fixed order, so results are bitwise
reproducible.

Forward:
1. ``welford_partials_kernel``: a program (a tile of pixels x a block of channels) keeps a
   Welford mean and M2 per (row lane, channel) across its pixel blocks, merges its lanes with
   Chan's formula and writes one (count, mean, M2) per channel into a [3, tiles, C] fp32
   buffer: the layout of the convolution's STATS epilogue, so both feed the finalize.
2. ``batch_norm_finalize_kernel`` merges the partials with Chan's formula (never
   E[x^2] - E[x]^2) into mean and invstd = 1/sqrt(biased var + eps), the per-channel
   scale = gamma * invstd and shift = beta, and updates running_mean / running_var with the
   momentum and the unbiased variance. In eval mode it reads the running statistics instead.
3. ``batch_norm_apply_kernel``: y = (x - mean) * scale + shift, plus a residual operand if
   given (a ResNet block's end), then ReLU if asked. Centring before scaling leaves one
   error on a channel of mean 1e4 and std 1, the fp32 rounding of the mean (x - mean is
   exact for nearby values); the folded x * scale + (beta - mean * scale) adds two more
   roundings at the scale of the mean, about 1e-3 in all.
   A BatchNorm followed by a pool runs instead as the pool's own forward kernel with its
   NORMALIZE switch (``kernels.max_pool``, ``kernels.avg_pool``): each tap of the window is
   normalised on the fly, so the normalised tensor is never written.

Backward (x_hat recomputed from x, mean and invstd: x is saved anyway, and y does not exist
when a pool follows):
4. ``batch_norm_backward_partials_kernel``: per-tile sums of dy and dy * x_hat, dy masked by
   the ReLU (z recomputed exactly as the forward computed it), into [2, tiles, C] fp32;
   ``batch_norm_backward_reduce_kernel`` adds the tiles in order: dbeta = sum dy,
   dgamma = sum dy * x_hat.
5. ``batch_norm_backward_input_kernel``: dx = scale * (dy - sum dy / n - x_hat * sum dy*x_hat
   / n) in training; dx = scale * dy in eval mode (the running statistics are constants).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import UNUSED, Extent, Launch, TileConfig, dense, vector
from .nhwc import (batch_norm_vectors, block_offsets, channel_block, channel_vector, grid,
                   layout_constexprs, load_tile, normalize, pixel_block, store_tile,
                   strided_args, strided_extent)
from .reduction import sum_in_order
from .welford import chan_merge, store_statistics

FP32 = (torch.float32,)


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


@triton.jit
def _relu_grad(dy, x, mean, scale, shift):
    """torch's threshold_backward on the recomputed pre-ReLU value: zero where z <= 0."""
    return tl.where(normalize(x, mean, scale, shift, False) <= 0.0, 0.0, dy)


@triton.jit
def welford_partials_kernel(
    x_ptr, partial_ptr, M, C, H, W, TILE_STEPS,
    x_sn, x_sh, x_sw, x_sc,
    DENSE_NHWC: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    c, c_ok = channel_block(C, EVEN_C, BLOCK_C)
    first = tile.to(tl.int64) * TILE_STEPS * BLOCK_M
    # Every statistic is of x - pivot, the tile's first pixel (see kernels/welford.py).
    pivot = tl.reshape(load_tile(x_ptr, block_offsets(first, c, H, W, C, x_sn, x_sh, x_sw,
                                                      x_sc, DENSE_NHWC, 1), c_ok[None, :]),
                       (BLOCK_C,))
    count = tl.zeros((BLOCK_M,), tl.float32)
    mean = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    m2 = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for step in range(TILE_STEPS):
        start = first + step * BLOCK_M
        m_ok = pixel_block(start, M, BLOCK_M)
        ok = m_ok[:, None] & c_ok[None, :]
        x = load_tile(x_ptr, block_offsets(start, c, H, W, C, x_sn, x_sh, x_sw, x_sc,
                                           DENSE_NHWC, BLOCK_M), ok) - pivot[None, :]
        count += m_ok.to(tl.float32)
        delta = tl.where(ok, x - mean, 0.0)
        mean += delta / tl.maximum(count, 1.0)[:, None]
        m2 += delta * (x - mean)
    # Chan's formula across the row lanes (a lane past the end has count 0 and adds nothing).
    lanes = tl.broadcast_to(count[:, None], (BLOCK_M, BLOCK_C))
    total, tile_offset, tile_m2 = chan_merge(lanes, mean, m2, lanes > 0)
    plane = tl.num_programs(0).to(tl.int64) * C
    store_statistics(partial_ptr, plane, tile.to(tl.int64) * C + c, total, pivot + tile_offset,
                     tile_m2, c_ok)


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
    x_ptr, residual_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, M, C, H, W,
    x_sn, x_sh, x_sw, x_sc, residual_sn, residual_sh, residual_sw, residual_sc,
    y_sn, y_sh, y_sw, y_sc,
    RELU: tl.constexpr, RESIDUAL: tl.constexpr, DENSE_NHWC: tl.constexpr,
    EVEN_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    c, c_ok = channel_block(C, EVEN_C, BLOCK_C)
    mask = pixel_block(start, M, BLOCK_M)[:, None] & c_ok[None, :]
    x = load_tile(x_ptr, block_offsets(start, c, H, W, C, x_sn, x_sh, x_sw, x_sc, DENSE_NHWC,
                                       BLOCK_M), mask)
    mean, scale, shift = batch_norm_vectors(mean_ptr, scale_ptr, shift_ptr, c, c_ok)
    if RESIDUAL:  # a residual block's end: relu(bn(x) + residual), added in fp32
        z = normalize(x, mean, scale, shift, False) + load_tile(
            residual_ptr, block_offsets(start, c, H, W, C, residual_sn, residual_sh,
                                        residual_sw, residual_sc, DENSE_NHWC, BLOCK_M), mask)
        if RELU:
            z = tl.where(z < 0.0, 0.0, z)
    else:
        z = normalize(x, mean, scale, shift, RELU)
    store_tile(y_ptr, z,
               block_offsets(start, c, H, W, C, y_sn, y_sh, y_sw, y_sc, DENSE_NHWC, BLOCK_M),
               mask)


@triton.jit
def batch_norm_backward_partials_kernel(
    x_ptr, dy_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, partial_ptr,
    M, C, H, W, TILE_STEPS,
    x_sn, x_sh, x_sw, x_sc, dy_sn, dy_sh, dy_sw, dy_sc,
    RELU: tl.constexpr, DENSE_NHWC: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    c, c_ok = channel_block(C, EVEN_C, BLOCK_C)
    mean, scale, shift = batch_norm_vectors(mean_ptr, scale_ptr, shift_ptr, c, c_ok)
    invstd = channel_vector(invstd_ptr, c, c_ok)
    sum_dy = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    first = tile.to(tl.int64) * TILE_STEPS * BLOCK_M
    for step in range(TILE_STEPS):
        start = first + step * BLOCK_M
        ok = pixel_block(start, M, BLOCK_M)[:, None] & c_ok[None, :]
        x = load_tile(x_ptr, block_offsets(start, c, H, W, C, x_sn, x_sh, x_sw, x_sc,
                                           DENSE_NHWC, BLOCK_M), ok)
        dy = load_tile(dy_ptr, block_offsets(start, c, H, W, C, dy_sn, dy_sh, dy_sw, dy_sc,
                                             DENSE_NHWC, BLOCK_M), ok)
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
    # Lane t of the [BLOCK_T, BLOCK_C] block adds tiles t, t + BLOCK_T, ... in order (NUM_TILES
    # is a multiple of BLOCK_T), then the lanes are added.
    t = tl.arange(0, BLOCK_T)
    ptrs = partial_ptr + t.to(tl.int64)[:, None] * p_st + c[None, :]
    mask = tl.broadcast_to(c_ok[None, :], (BLOCK_T, BLOCK_C))
    blocks = NUM_TILES // BLOCK_T
    step = BLOCK_T * p_st
    sum_dy = tl.sum(sum_in_order(ptrs, mask, blocks, step), axis=0)
    sum_dy_xhat = tl.sum(sum_in_order(ptrs + p_sp, mask, blocks, step), axis=0)
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
    DENSE_NHWC: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    c, c_ok = channel_block(C, EVEN_C, BLOCK_C)
    mask = pixel_block(start, M, BLOCK_M)[:, None] & c_ok[None, :]
    scale = channel_vector(scale_ptr, c, c_ok)
    dy = load_tile(dy_ptr, block_offsets(start, c, H, W, C, dy_sn, dy_sh, dy_sw, dy_sc,
                                         DENSE_NHWC, BLOCK_M), mask)
    if READ_X:  # training or ReLU
        mean = channel_vector(mean_ptr, c, c_ok)
        x = load_tile(x_ptr, block_offsets(start, c, H, W, C, x_sn, x_sh, x_sw, x_sc,
                                           DENSE_NHWC, BLOCK_M), mask)
        if RELU:
            dy = _relu_grad(dy, x, mean, scale, channel_vector(shift_ptr, c, c_ok))
    if TRAINING:
        x_hat = (x - mean[None, :]) * channel_vector(invstd_ptr, c, c_ok)[None, :]
        mean_dy = channel_vector(sum_dy_ptr, c, c_ok) * inv_count
        mean_dy_xhat = channel_vector(sum_dy_xhat_ptr, c, c_ok) * inv_count
        dx = scale[None, :] * (dy - mean_dy[None, :] - x_hat * mean_dy_xhat[None, :])
    else:
        dx = scale[None, :] * dy
    store_tile(dx_ptr, dx, block_offsets(start, c, H, W, C, dx_sn, dx_sh, dx_sw, dx_sc,
                                         DENSE_NHWC, BLOCK_M), mask)


# ----------------------------------------------------------------------------- launches

def _name(kernel: str, tile: TileConfig, x: torch.Tensor, **flags: bool) -> str:
    """kernel[tile,dtype+flag...], the row name in ``python -m fastarch compile-report``."""
    dtype = str(x.dtype).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp")
    return f"{kernel}[{tile.name},{dtype}{''.join(f'+{k}' for k, on in flags.items() if on)}]"


def _statistics_extents(channels: int, *names: str) -> dict[str, Extent]:
    """The dense fp32 [C] vectors (statistics, sums) among a launch's arguments."""
    return {name: dense(channels, dtypes=FP32) for name in names}


def _normalization_args(stats: BatchNormStatistics) -> dict[str, torch.Tensor]:
    return {"mean_ptr": stats.mean, "scale_ptr": stats.scale, "shift_ptr": stats.shift}


def _all_statistics(stats: BatchNormStatistics) -> dict[str, torch.Tensor]:
    return {**_normalization_args(stats), "invstd_ptr": stats.invstd}


def _tile_constexprs(tile: TileConfig, **flags: bool) -> dict[str, int | bool]:
    return {**flags, "BLOCK_M": tile.block_m, "BLOCK_C": tile.block_n}


def _pixel_operands(tile: TileConfig, **tensors: torch.Tensor
                    ) -> tuple[dict[str, object], dict[str, Extent], dict[str, bool]]:
    """A per-pixel kernel's [N, C, H, W] operands ``name=tensor``: their ``<name>_ptr`` and
    stride arguments, their extents, and the layout constexprs (``nhwc.layout_constexprs``:
    the int32 offsets of a block reach its ``tile.block_m`` pixels)."""
    layout = layout_constexprs(tuple(tensors.values()), tile, tile.block_m)
    args, extents = {}, {}
    for name, t in tensors.items():
        args.update({f"{name}_ptr": t, **strided_args(name, t)})
        extents[f"{name}_ptr"] = strided_extent(name, tuple(t.shape),
                                                dense_nhwc=layout["DENSE_NHWC"])
    return args, extents, layout


def partials_launch(x: torch.Tensor, partials: torch.Tensor, tile_steps: int,
                    tile: TileConfig) -> Launch:
    """Welford partials of x [N, C, H, W] into ``partials`` [3, tiles, C] fp32, a tile being
    ``tile_steps`` blocks of ``tile.block_m`` pixels."""
    N, C, H, W = x.shape
    args, extents, layout = _pixel_operands(tile, x=x)
    return Launch(
        welford_partials_kernel, (partials.shape[1], triton.cdiv(C, tile.block_n)),
        args={**args, "partial_ptr": partials, "M": N * H * W, "C": C, "H": H, "W": W,
              "TILE_STEPS": tile_steps},
        extents={**extents, "partial_ptr": dense(3, partials.shape[1], C, dtypes=FP32)},
        constexprs=_tile_constexprs(tile, **layout),
        num_warps=tile.num_warps, name=_name("batch_norm_welford_partials", tile, x))


def finalize_launch(partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                    weight: torch.Tensor | None, bias: torch.Tensor | None,
                    running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    stats: BatchNormStatistics, momentum: float, eps: float,
                    tile: TileConfig) -> Launch:
    """Training (``partials`` given: (count, mean, M2), each [tiles, C] with equal strides)
    or eval mode (running statistics read, ``partials`` None); weight, bias and the running
    statistics are [C] vectors of any stride. ``tile``: [tiles x channels] read a step."""
    C = stats.mean.shape[0]
    training = partials is not None
    count, mean, m2 = partials if training else (stats.mean,) * 3
    placeholder = stats.mean
    vectors = {"w": weight, "b": bias, "rm": running_mean, "rv": running_var}
    return Launch(
        batch_norm_finalize_kernel, (triton.cdiv(C, tile.block_n),),
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
                    "BLOCK_T": tile.block_m, "BLOCK_C": tile.block_n},
        num_warps=tile.num_warps,
        name=f"batch_norm_finalize[{tile.name}{'' if training else '+eval'}]")


def apply_launch(x: torch.Tensor, y: torch.Tensor, stats: BatchNormStatistics, relu: bool,
                 tile: TileConfig, residual: torch.Tensor | None = None) -> Launch:
    """y = normalised x, + ``residual`` (x's shape, any strides) when given, then ReLU if
    ``relu``."""
    N, C, H, W = x.shape
    has_residual = residual is not None
    operands = {"x": x, "residual": residual, "y": y} if has_residual else {"x": x, "y": y}
    args, extents, layout = _pixel_operands(tile, **operands)
    if not has_residual:  # x stands in for the absent residual: never read
        args.update({"residual_ptr": x, **strided_args("residual", x)})
        extents["residual_ptr"] = UNUSED
    return Launch(
        batch_norm_apply_kernel, grid(N * H * W, C, tile),
        args={**args, **_normalization_args(stats), "M": N * H * W, "C": C, "H": H, "W": W},
        extents={**extents, **_statistics_extents(C, *_normalization_args(stats))},
        constexprs=_tile_constexprs(tile, RELU=relu, RESIDUAL=has_residual, **layout),
        num_warps=tile.num_warps,
        name=_name("batch_norm_apply", tile, x, relu=relu, residual=has_residual))


def backward_partials_launch(x: torch.Tensor, dy: torch.Tensor, stats: BatchNormStatistics,
                             relu: bool, partials: torch.Tensor, tile_steps: int,
                             tile: TileConfig) -> Launch:
    """Per-tile sums of dy and dy * x_hat into ``partials`` [2, tiles, C] fp32 (a tile past
    the last pixel writes zeros)."""
    N, C, H, W = x.shape
    args, extents, layout = _pixel_operands(tile, x=x, dy=dy)
    return Launch(
        batch_norm_backward_partials_kernel, (partials.shape[1], triton.cdiv(C, tile.block_n)),
        args={**args, **_all_statistics(stats), "partial_ptr": partials,
              "M": N * H * W, "C": C, "H": H, "W": W, "TILE_STEPS": tile_steps},
        extents={**extents, **_statistics_extents(C, *_all_statistics(stats)),
                 "partial_ptr": dense(2, partials.shape[1], C, dtypes=FP32)},
        constexprs=_tile_constexprs(tile, RELU=relu, **layout),
        num_warps=tile.num_warps,
        name=_name("batch_norm_backward_partials", tile, x, relu=relu))


def backward_reduce_launch(partials: torch.Tensor, sums: BackwardSums,
                           grad_weight: torch.Tensor | None, grad_bias: torch.Tensor | None,
                           tile: TileConfig) -> Launch:
    """The sums of [2, tiles, C] partials (channels dense), ``tile.block_m`` tiles a step:
    ``tiles`` must be a multiple of it (padded with zero tiles)."""
    _, tiles, C = partials.shape
    if tiles % tile.block_m:
        raise ValueError(f"batch_norm_backward_reduce: {tiles} tiles of partials are not a "
                         f"multiple of the {tile.block_m} the reduction adds a step")
    return Launch(
        batch_norm_backward_reduce_kernel, (triton.cdiv(C, tile.block_n),),
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
                    "BLOCK_T": tile.block_m, "BLOCK_C": tile.block_n},
        num_warps=tile.num_warps, name=f"batch_norm_backward_reduce[{tile.name}]")


def backward_input_launch(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                          stats: BatchNormStatistics, sums: BackwardSums | None, relu: bool,
                          tile: TileConfig) -> Launch:
    """dx in training (``sums`` given) or eval mode (``sums`` None)."""
    N, C, H, W = x.shape
    training = sums is not None
    args, extents, layout = _pixel_operands(tile, x=x, dy=dy, dx=dx)
    return Launch(
        batch_norm_backward_input_kernel, grid(N * H * W, C, tile),
        args={**args, **_all_statistics(stats),
              "sum_dy_ptr": sums.sum_dy if training else stats.mean,
              "sum_dy_xhat_ptr": sums.sum_dy_xhat if training else stats.mean,
              "inv_count": 1.0 / max(N * H * W, 1), "M": N * H * W, "C": C, "H": H, "W": W},
        extents={**extents, **_statistics_extents(C, *_all_statistics(stats)),
                 **(_statistics_extents(C, "sum_dy_ptr", "sum_dy_xhat_ptr") if training
                    else {"sum_dy_ptr": UNUSED, "sum_dy_xhat_ptr": UNUSED})},
        constexprs=_tile_constexprs(tile, TRAINING=training, RELU=relu,
                                    READ_X=training or relu, **layout),
        num_warps=tile.num_warps,
        name=_name("batch_norm_backward_input", tile, x, eval=not training, relu=relu))
