"""BatchNorm's operators and host side: BatchNorm (+ ReLU), BatchNorm + a residual + ReLU
(a ResNet block's end) and BatchNorm fused into a following max or average pool
(SyncBatchNorm, built on them: ``ops.sync_batch_norm``); the statistics flow, output
allocation and the tiles of ``kernels.batch_norm``.

Training runs two steps. The statistics: Welford partials of x (``batch_norm_welford_partials``,
or the conv epilogue's), merged by ``batch_norm_finalize``, which also updates the running
statistics in place (a mutable op: no autograd formula; it reads detached values). Then a
normalising op (``batch_norm``, ``batch_norm_max_pool2d``, ``batch_norm_avg_pool2d``,
``sync_batch_norm``, ``batch_norm_conv2d``: the next conv normalising its input tiles,
``ops.batch_norm_conv2d``) takes the statistics as inputs and differentiates through them itself:
weight and bias are its inputs only for their gradients (their values are in scale and
shift), and its backward recomputes x_hat from x (``batch_norm_backward_reduce``, then
``batch_norm_backward_input``; SyncBatchNorm all-reduces the sums in between).

Folded (a chain link's output, ``ops.conv2d_chain``): the link finalizes the statistics and
returns mean and invstd as differentiable outputs; ``batch_norm_max_pool2d`` with ``folded``
takes them as differentiable inputs, and its backward is one gather writing x's gradient at
fixed statistics and the sums that give theirs (``folded_statistics_grads``): the
statistics' own term reaches x through the link's backward, no pass of BatchNorm's own.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from fastarch import profiling
from fastarch.arguments import records_grad
from fastarch.kernels import avg_pool as avg_pool_kernels
from fastarch.kernels import batch_norm as kernels
from fastarch.kernels import max_pool as max_pool_kernels
from fastarch.kernels.batch_norm import BackwardSums, BatchNormStatistics
from fastarch.kernels.launch import Launch, TileConfig, interpreter_tile
from fastarch.kernels.nhwc import Normalization
from fastarch.kernels.pool_geometry import PoolGeometry
from fastarch.kernels.runtime import INTERPRETER, empty, memory_format_of
from fastarch.kernels.welford import WelfordPartials
from fastarch.ops.avg_pool import avg_pool2d_backward, avg_window
from fastarch.ops.common import (absent, fake_empty, is_channels_last, nhwc_tile, no_grads,
                                 no_double_backward, or_absent, pool_geometry, pool_window,
                                 pooled_shape, run_nhwc)
from fastarch.ops.conv2d import sum_rows
from fastarch.ops.max_pool import max_pool2d_backward, max_pool_outputs, output_empty
from fastarch.ops.relu import relu_backward

# ----------------------------------------------------------------------------- tiles
# The elementwise passes (normalise, dx, the pools that normalise their taps) take the NHWC
# tile of their channel count (``ops.common.nhwc_tile``). The reductions (Welford statistics,
# backward sums) step a program of that tile through several pixel blocks, one tile of fp32
# partials per program, and aim at about REDUCTION_PROGRAMS programs (several waves of 132
# SMs; a function of the shape only, so results do not depend on the card), each covering at
# least MIN_TILE_STEPS blocks, so the partials stay small. The merges of the partials read
# [MERGE_TILE.block_m tiles x block_n channels] a step. The interpreter steps a program
# through INTERPRETER_TILE_STEPS blocks of at most INTERPRETER_REDUCTION_BLOCK pixels and
# merges INTERPRETER_MERGE_TILES tiles a step, so small test shapes still make several tiles
# and run every level of every merge.
REDUCTION_PROGRAMS = 1024
MIN_TILE_STEPS = 4
MERGE_TILE = TileConfig("merge", block_m=64, block_n=32, num_warps=4)
INTERPRETER_REDUCTION_BLOCK = 64
INTERPRETER_TILE_STEPS = 2
INTERPRETER_MERGE_TILES = 2


class ReductionPlan(NamedTuple):
    """How a reduction over the pixels runs: ``tiles`` programs along the pixels (the
    partials' tile dimension), each stepping ``steps`` blocks of ``tile.block_m`` pixels."""
    tile: TileConfig
    steps: int
    tiles: int


def gpu_tile_steps(pixels: int, channels: int, tile: TileConfig) -> int:
    """The pixel blocks a reduction program covers on a GPU."""
    blocks = max(1, triton.cdiv(pixels, tile.block_m))
    wanted_tiles = max(1, REDUCTION_PROGRAMS // triton.cdiv(channels, tile.block_n))
    return min(blocks, max(MIN_TILE_STEPS, triton.cdiv(blocks, wanted_tiles)))


def reduction_plan(pixels: int, channels: int) -> ReductionPlan:
    """The static plan: not autotuned, since its tile count is the shape of the partials
    an operator returns (and its shape function must know without running)."""
    if INTERPRETER:
        tile = interpreter_tile(pixels, channels, max_long=INTERPRETER_REDUCTION_BLOCK)
        steps = min(triton.cdiv(pixels, tile.block_m), INTERPRETER_TILE_STEPS)
    else:
        tile = nhwc_tile(channels, pixels)
        steps = gpu_tile_steps(pixels, channels, tile)
    return ReductionPlan(tile, steps, max(1, triton.cdiv(pixels, steps * tile.block_m)))


def merge_tile(channels: int) -> TileConfig:
    if INTERPRETER:
        return TileConfig("interpreter_merge", block_m=INTERPRETER_MERGE_TILES,
                          block_n=interpreter_tile(1, channels).block_n)
    return MERGE_TILE


def whole_merge_steps(tiles: int, merge: TileConfig) -> int:
    """The backward sums' tiles of partials: ``tiles`` padded with zero tiles (past the
    last pixel) to whole steps of the ordered sum that adds them."""
    return triton.cdiv(tiles, merge.block_m) * merge.block_m


def _pixels(x: Tensor) -> int:
    return x.shape[0] * x.shape[2] * x.shape[3]


def pool_normalization(stats: BatchNormStatistics) -> Normalization:
    """What a pool kernel takes to pool the normalised tensor without writing it."""
    return stats.mean, stats.scale, stats.shift


# ----------------------------------------------------------------------------- statistics

@torch.library.custom_op("fastarch::batch_norm_welford_partials", mutates_args=())
def batch_norm_welford_partials(x: Tensor) -> Tensor:
    """(count, mean, M2) per pixel tile and channel of a 4-D x (N*H*W > 0) as one
    [3, tiles, C] fp32 buffer."""
    plan = reduction_plan(_pixels(x), x.shape[1])
    partials = empty((3, plan.tiles, x.shape[1]), torch.float32, x.device)
    kernels.partials_launch(x, partials, plan.steps, plan.tile)()
    return partials


@batch_norm_welford_partials.register_fake
def _(x):
    tiles = reduction_plan(_pixels(x), x.shape[1]).tiles
    return fake_empty((3, tiles, x.shape[1]), torch.float32, x)


def _statistics_outputs(channels: int, like: Tensor, fake: bool = False) -> BatchNormStatistics:
    if fake:
        return BatchNormStatistics(*(fake_empty((channels,), torch.float32, like)
                                     for _ in BatchNormStatistics._fields))
    return BatchNormStatistics(*(empty((channels,), torch.float32, like.device)
                                 for _ in BatchNormStatistics._fields))


def _vector(t: Optional[Tensor]) -> Optional[Tensor]:
    """weight or bias (C elements, any shape torch takes) as a [C] vector: a view when its
    strides allow, since the finalize takes any stride."""
    return None if t is None else t.reshape(-1)


@torch.library.custom_op("fastarch::batch_norm_finalize",
                         mutates_args=("running_mean", "running_var"))
def batch_norm_finalize(count: Tensor, mean: Tensor, m2: Tensor, weight: Optional[Tensor],
                        bias: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], momentum: float,
                        eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch statistics (mean, invstd, scale, shift: fp32 [C]) from Welford partials (ours
    or the conv epilogue's: [tiles, C] fp32 each, equal strides), updating the running
    statistics in place when given with ``momentum`` (the exponential-average factor:
    1/num_batches_tracked for a cumulative average) and the unbiased variance. weight and
    bias are values here (no gradient flows through this op)."""
    if not count.stride() == mean.stride() == m2.stride():
        raise ValueError("batch_norm_finalize: count, mean and m2 must share their strides")
    stats = _statistics_outputs(count.shape[1], count)
    kernels.finalize_launch((count, mean, m2), _vector(weight), _vector(bias), running_mean,
                            running_var, stats, momentum, eps, merge_tile(count.shape[1]))()
    return tuple(stats)


@batch_norm_finalize.register_fake
def _(count, mean, m2, weight, bias, running_mean, running_var, momentum, eps):
    return tuple(_statistics_outputs(count.shape[1], count, fake=True))


@torch.library.custom_op("fastarch::batch_norm_running_statistics", mutates_args=())
def batch_norm_running_statistics(running_mean: Tensor, running_var: Tensor,
                                  weight: Optional[Tensor], bias: Optional[Tensor],
                                  eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eval mode: the (mean, invstd, scale, shift) that normalise with running statistics."""
    stats = _statistics_outputs(running_mean.shape[0], running_mean)
    kernels.finalize_launch(None, _vector(weight), _vector(bias), running_mean, running_var,
                            stats, 0.0, eps, merge_tile(running_mean.shape[0]))()
    return tuple(stats)


@batch_norm_running_statistics.register_fake
def _(running_mean, running_var, weight, bias, eps):
    return tuple(_statistics_outputs(running_mean.shape[0], running_mean, fake=True))


# ----------------------------------------------------------------------------- normalising ops

def normalized(x: Tensor, stats: BatchNormStatistics, relu: bool) -> Tensor:
    """(x - mean) * scale + shift [ReLU] in x's dtype and memory format."""
    y = empty(x.shape, x.dtype, x.device, memory_format_of(x))
    run_nhwc("batch_norm_apply", x, x.shape[1], _pixels(x),
             lambda tile: kernels.apply_launch(x, y, stats, relu, tile), (y,))
    return y


def batch_norm_setup(ctx, inputs, output, offsets: Optional[Tensor] = None,
                     kept: tuple[Optional[Tensor], ...] = ()) -> None:
    """Saves what ``batch_norm_grads`` reads (``ctx.saved_tensors[:5]``), then ``offsets``
    and ``kept``: what the fused op's own formula reads."""
    x, weight, bias, mean, invstd, scale, shift, training, relu = inputs[:9]
    ctx.training, ctx.relu, ctx.group_name = training, relu, None
    ctx.grad_dtypes = (None if weight is None else weight.dtype,
                       None if bias is None else bias.dtype)
    ctx.save_for_backward(x, mean, invstd, scale, shift, offsets, *kept)


def batch_norm_grads(ctx, dy: Tensor) -> tuple[Optional[Tensor], ...]:
    """(dx, dweight, dbias) of a normalising op from dy, the gradient of its normalised
    (and ReLU'd) output; SyncBatchNorm's dx from the sums over the global batch."""
    x, mean, invstd, scale, shift = ctx.saved_tensors[:5]
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    sums = dw = db = None
    if (need_dx and ctx.training) or need_dw or need_db:
        sum_dy, sum_dy_xhat, dw, db = batch_norm_backward_reduce(
            x, dy, mean, invstd, scale, shift, ctx.relu,
            ctx.grad_dtypes[0] if need_dw else None, ctx.grad_dtypes[1] if need_db else None)
        sums = (sum_dy, sum_dy_xhat)
    dx = None
    if need_dx:
        if ctx.group_name is not None:  # every process takes part: each one's need_dx is the same
            sums = _global_sums(x, *sums, ctx.group_name)
        dx = batch_norm_backward_input(x, dy, mean, invstd, scale, shift,
                                       *(sums if ctx.training else (None, None)), ctx.relu)
    return dx, dw if need_dw else None, db if need_db else None


@torch.library.custom_op("fastarch::batch_norm", mutates_args=())
def batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
               invstd: Tensor, scale: Tensor, shift: Tensor, training: bool,
               relu: bool) -> Tensor:
    """y = (x - mean) * scale + shift, then ReLU if ``relu``, for a 4-D x, in x's dtype and
    memory format; ``training``: the statistics are the batch's (backward differentiates
    through them)."""
    return normalized(x, BatchNormStatistics(mean, invstd, scale, shift), relu)


@batch_norm.register_fake
def _(x, weight, bias, mean, invstd, scale, shift, training, relu):
    return fake_empty(x.shape, x.dtype, x, memory_format_of(x))


@profiling.op_range("batch_norm.backward")
def _batch_norm_apply_grads(ctx, dy: Tensor):
    return *batch_norm_grads(ctx, dy), *no_grads(6)


batch_norm.register_autograd(_batch_norm_apply_grads, setup_context=batch_norm_setup)


@torch.library.custom_op("fastarch::batch_norm_add_relu", mutates_args=())
def batch_norm_add_relu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor,
                        training: bool, residual: Tensor) -> Tensor:
    """relu(``batch_norm``'s output + residual) in one pass (a ResNet block's end): the sum
    in fp32, y in x's dtype and memory format; residual has x's shape and dtype, any
    strides."""
    y = empty(x.shape, x.dtype, x.device, memory_format_of(x))
    stats = BatchNormStatistics(mean, invstd, scale, shift)
    run_nhwc("batch_norm_add_relu", x, x.shape[1], _pixels(x),
             lambda tile: kernels.apply_launch(x, y, stats, True, tile, residual), (y,))
    return y


@batch_norm_add_relu.register_fake
def _(x, weight, bias, mean, invstd, scale, shift, training, residual):
    return fake_empty(x.shape, x.dtype, x, memory_format_of(x))


def _batch_norm_add_relu_setup(ctx, inputs, output) -> None:
    # The BatchNorm itself runs without ReLU; the slot of a max pool's offsets keeps y, whose
    # sign is the ReLU's mask.
    batch_norm_setup(ctx, (*inputs[:8], False), output, offsets=output)


@profiling.op_range("batch_norm_add_relu.backward")
def _batch_norm_add_relu_grads(ctx, dy: Tensor):
    dz = relu_backward(ctx.saved_tensors[5], dy)  # the gradient of bn(x) + residual
    return *batch_norm_grads(ctx, dz), *no_grads(5), dz if ctx.needs_input_grad[8] else None


batch_norm_add_relu.register_autograd(_batch_norm_add_relu_grads,
                                      setup_context=_batch_norm_add_relu_setup)


def folded_statistics_grads(sums: Tensor, invstd: Tensor, weight: Optional[Tensor],
                            bias: Optional[Tensor], needs: tuple[bool, ...]
                            ) -> tuple[Optional[Tensor], ...]:
    """The gradients of a BatchNorm's (mean, invstd, weight, bias), where ``needs`` says, from
    the sums [2, C] fp32 of du and du * (x - mean) (du: the gradient of the normalised input,
    ReLU-masked) that a folded backward's kernel wrote: -scale * sum(du), weight * sum(du *
    (x - mean)), invstd * sum(du * (x - mean)), sum(du), scale = invstd * weight."""
    sum_du, sum_du_centred = sums.unbind(0)
    gamma = None if weight is None else weight.float()
    scale = invstd if gamma is None else invstd * gamma
    grads = (-scale * sum_du,
             sum_du_centred if gamma is None else gamma * sum_du_centred,
             None if weight is None else (invstd * sum_du_centred).to(weight.dtype),
             None if bias is None else sum_du.to(bias.dtype))
    return tuple(grad if need else None for grad, need in zip(grads, needs))


def _pooled_grads(op: str, pool_input_grad):
    """The autograd formula of BatchNorm fused into a pool: dy back through the pool
    (``pool_input_grad(ctx, dy)``), then through the BatchNorm."""
    @profiling.op_range(f"{op}.backward")
    def grads(ctx, dy: Tensor, *unused_offsets_grad):
        return *batch_norm_grads(ctx, pool_input_grad(ctx, dy)), *no_grads(12)
    return grads


@torch.library.custom_op("fastarch::batch_norm_max_pool2d", mutates_args=())
def batch_norm_max_pool2d(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor,
                          training: bool, relu: bool, kernel_size: list[int],
                          stride: list[int], padding: list[int], dilation: list[int],
                          ceil_mode: bool, keep_offsets: bool,
                          folded: bool) -> tuple[Tensor, Tensor]:
    """max_pool2d of ``batch_norm``'s output without writing it: (y, window offsets for
    backward if ``keep_offsets``). ``folded``: mean and invstd are differentiable inputs (a
    chain link's batch statistics, ``ops.conv2d_chain``), and backward returns x's gradient
    at fixed statistics and theirs, BatchNorm's backward folded into the pool's gather
    (``batch_norm_max_pool2d_backward``); else it differentiates through the batch
    statistics itself."""
    geometry = pool_geometry(kernel_size, stride, padding, dilation, ceil_mode)
    y, offsets, _ = max_pool_outputs(x, geometry, keep_offsets, False, output_empty)
    N, C, P, Q = y.shape
    stats = BatchNormStatistics(mean, invstd, scale, shift)
    kept = offsets if keep_offsets else None
    run_nhwc("batch_norm_max_pool2d", x, C, N * P * Q,
             lambda tile: max_pool_kernels.forward_launch(
                 x, y, kept, None, geometry, tile, pool_normalization(stats), relu),
             (y, kept), window=kernel_size)
    return y, offsets


@batch_norm_max_pool2d.register_fake
def _(x, weight, bias, mean, invstd, scale, shift, training, relu, kernel_size, stride,
      padding, dilation, ceil_mode, keep_offsets, folded):
    geometry = pool_geometry(kernel_size, stride, padding, dilation, ceil_mode)
    return max_pool_outputs(x, geometry, keep_offsets, False, fake_empty)[:2]


def _batch_norm_max_pool2d_setup(ctx, inputs, output) -> None:
    folded = inputs[15]
    batch_norm_setup(ctx, inputs, output, offsets=output[1],
                     kept=inputs[1:3] if folded else ())
    ctx.window, ctx.folded = inputs[9:14], folded
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero gradient written for the offsets


def _max_pool_input_grad(ctx, dy: Tensor) -> Tensor:
    x, offsets = ctx.saved_tensors[0], ctx.saved_tensors[5]
    return max_pool2d_backward(dy, offsets, list(x.shape), is_channels_last(x), *ctx.window)


@profiling.op_range("batch_norm_max_pool2d.backward")
def _batch_norm_max_pool2d_grads(ctx, dy: Tensor, unused_offsets_grad):
    if not ctx.folded:
        return *batch_norm_grads(ctx, _max_pool_input_grad(ctx, dy)), *no_grads(13)
    x, mean, invstd, scale, shift, offsets, weight, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, sums = batch_norm_max_pool2d_backward(dy, offsets, x, mean, scale, shift, ctx.relu,
                                              *ctx.window)
    mean_grad, invstd_grad, weight_grad, bias_grad = folded_statistics_grads(
        sums, invstd, weight, bias, (needs[3], needs[4], needs[1], needs[2]))
    return (dx if needs[0] else None, weight_grad, bias_grad, mean_grad, invstd_grad,
            *no_grads(11))


batch_norm_max_pool2d.register_autograd(_batch_norm_max_pool2d_grads,
                                        setup_context=_batch_norm_max_pool2d_setup)


@torch.library.custom_op("fastarch::batch_norm_max_pool2d_backward", mutates_args=())
def batch_norm_max_pool2d_backward(dy: Tensor, offsets: Tensor, x: Tensor, mean: Tensor,
                                   scale: Tensor, shift: Tensor, relu: bool,
                                   kernel_size: list[int], stride: list[int],
                                   padding: list[int], dilation: list[int],
                                   ceil_mode: bool) -> tuple[Tensor, Tensor]:
    """The folded backward of ``batch_norm_max_pool2d``: (x's gradient at fixed statistics,
    du * scale in x's memory format; the sums [2, C] fp32 of du and du * (x - mean)), du
    the pool's gradient of the normalised tensor, ReLU-masked: one gather, whose sums
    (per-program rows) are added in order."""
    geometry = pool_geometry(kernel_size, stride, padding, dilation, ceil_mode)
    N, C, H, W = x.shape
    dx = empty(x.shape, dy.dtype, dy.device, memory_format_of(x))
    rows: dict[str, Tensor] = {}  # the sums of the tile launched last

    def launch(tile: TileConfig) -> Launch:
        rows["sums"] = empty((max_pool_kernels.backward_sum_rows(x.shape, tile), 2, C),
                             torch.float32, dy.device)
        fold = max_pool_kernels.PoolGradFold(x, (mean, scale, shift), relu, rows["sums"])
        return max_pool_kernels.backward_launch(dy, offsets, dx, geometry, tile, fold=fold)

    run_nhwc("batch_norm_max_pool2d_backward", dy, C, N * H * W, launch, (dx,),
             window=kernel_size)
    return dx, sum_rows(rows["sums"])


@batch_norm_max_pool2d_backward.register_fake
def _(dy, offsets, x, mean, scale, shift, relu, kernel_size, stride, padding, dilation,
      ceil_mode):
    return (fake_empty(x.shape, dy.dtype, dy, memory_format_of(x)),
            fake_empty((2, x.shape[1]), torch.float32, dy))


batch_norm_max_pool2d_backward.register_autograd(no_double_backward("batch_norm_max_pool2d"))


@torch.library.custom_op("fastarch::batch_norm_avg_pool2d", mutates_args=())
def batch_norm_avg_pool2d(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor,
                          training: bool, relu: bool, kernel_size: list[int],
                          stride: list[int], padding: list[int], ceil_mode: bool,
                          count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    """avg_pool2d of ``batch_norm``'s output without writing it."""
    geometry = pool_geometry(kernel_size, stride, padding, [1, 1], ceil_mode)
    y = empty(pooled_shape(x.shape, geometry), x.dtype, x.device, memory_format_of(x))
    N, C, P, Q = y.shape
    stats = BatchNormStatistics(mean, invstd, scale, shift)
    run_nhwc("batch_norm_avg_pool2d", x, C, N * P * Q,
             lambda tile: avg_pool_kernels.avg_forward_launch(
                 x, y, geometry, count_include_pad, divisor_override, tile,
                 pool_normalization(stats), relu),
             (y,), window=kernel_size)
    return y


@batch_norm_avg_pool2d.register_fake
def _(x, weight, bias, mean, invstd, scale, shift, training, relu, kernel_size, stride,
      padding, ceil_mode, count_include_pad, divisor_override):
    geometry = pool_geometry(kernel_size, stride, padding, [1, 1], ceil_mode)
    return fake_empty(pooled_shape(x.shape, geometry), x.dtype, x, memory_format_of(x))


def _batch_norm_avg_pool2d_setup(ctx, inputs, output) -> None:
    batch_norm_setup(ctx, inputs, output)
    ctx.window = inputs[9:15]


def _avg_pool_input_grad(ctx, dy: Tensor) -> Tensor:
    x = ctx.saved_tensors[0]
    return avg_pool2d_backward(dy, list(x.shape), is_channels_last(x), *ctx.window)


batch_norm_avg_pool2d.register_autograd(
    _pooled_grads("batch_norm_avg_pool2d", _avg_pool_input_grad),
    setup_context=_batch_norm_avg_pool2d_setup)


def all_reduce_sum(t: Tensor, group_name: str) -> Tensor:
    """The sum of ``t`` over the processes of the group named ``group_name``: torch's
    functional collective, an operator that names its group (and that torch.compile traces)."""
    return torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_reduce(t, "sum", group_name))


def _global_sums(x: Tensor, sum_dy: Tensor, sum_dy_xhat: Tensor,
                 group_name: str) -> tuple[Tensor, Tensor]:
    """The sums over the group's global batch, scaled by x's share of its pixels: the dx
    kernel averages them over x's own N*H*W."""
    local = torch.stack([sum_dy, sum_dy_xhat, torch.full_like(sum_dy, _pixels(x))])
    total = all_reduce_sum(local, group_name)
    sums = total[:2] * (_pixels(x) / total[2])
    return sums[0], sums[1]


# ----------------------------------------------------------------------------- backward ops

@torch.library.custom_op("fastarch::batch_norm_backward_reduce", mutates_args=())
def batch_norm_backward_reduce(x: Tensor, dy: Tensor, mean: Tensor, invstd: Tensor,
                               scale: Tensor, shift: Tensor, relu: bool,
                               weight_grad_dtype: Optional[torch.dtype],
                               bias_grad_dtype: Optional[torch.dtype]
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass over x and dy (ReLU-masked): fp32 sum dy and sum dy * x_hat per channel, and
    dweight (sum dy * x_hat) / dbias (sum dy) in the given dtypes (placeholders if None)."""
    C = x.shape[1]
    plan, merge = reduction_plan(_pixels(x), C), merge_tile(C)
    partials = empty((2, whole_merge_steps(plan.tiles, merge), C), torch.float32, x.device)
    stats = BatchNormStatistics(mean, invstd, scale, shift)
    kernels.backward_partials_launch(x, dy, stats, relu, partials, plan.steps, plan.tile)()
    sums = BackwardSums(*(empty((C,), torch.float32, x.device) for _ in range(2)))
    grad_weight, grad_bias = (None if dtype is None else empty((C,), dtype, x.device)
                              for dtype in (weight_grad_dtype, bias_grad_dtype))
    kernels.backward_reduce_launch(partials, sums, grad_weight, grad_bias, merge)()
    return sums.sum_dy, sums.sum_dy_xhat, or_absent(grad_weight, x), or_absent(grad_bias, x)


@batch_norm_backward_reduce.register_fake
def _(x, dy, mean, invstd, scale, shift, relu, weight_grad_dtype, bias_grad_dtype):
    channels = (x.shape[1],)
    return (fake_empty(channels, torch.float32, x), fake_empty(channels, torch.float32, x),
            absent(x) if weight_grad_dtype is None else fake_empty(channels, weight_grad_dtype, x),
            absent(x) if bias_grad_dtype is None else fake_empty(channels, bias_grad_dtype, x))


batch_norm_backward_reduce.register_autograd(no_double_backward("batch_norm"))


@torch.library.custom_op("fastarch::batch_norm_backward_input", mutates_args=())
def batch_norm_backward_input(x: Tensor, dy: Tensor, mean: Tensor, invstd: Tensor,
                              scale: Tensor, shift: Tensor, sum_dy: Optional[Tensor],
                              sum_dy_xhat: Optional[Tensor], relu: bool) -> Tensor:
    """dx in x's memory format: training (batch statistics) when the sums over the N*H*W
    pixels of x are given, eval mode (constant statistics) when they are None."""
    dx = empty(x.shape, dy.dtype, x.device, memory_format_of(x))
    stats = BatchNormStatistics(mean, invstd, scale, shift)
    sums = None if sum_dy is None else BackwardSums(sum_dy, sum_dy_xhat)
    run_nhwc("batch_norm_backward_input", x, x.shape[1], _pixels(x),
             lambda tile: kernels.backward_input_launch(x, dy, dx, stats, sums, relu, tile),
             (dx,))
    return dx


@batch_norm_backward_input.register_fake
def _(x, dy, mean, invstd, scale, shift, sum_dy, sum_dy_xhat, relu):
    return fake_empty(x.shape, dy.dtype, x, memory_format_of(x))


batch_norm_backward_input.register_autograd(no_double_backward("batch_norm"))


# ----------------------------------------------------------------------------- the flow

@dataclass(frozen=True)
class FusedPool:
    """The pool a BatchNorm (+ ReLU) runs fused into: max, or avg with its divisor rules."""
    geometry: PoolGeometry
    is_max: bool
    count_include_pad: bool = True
    divisor_override: Optional[int] = None


def detached(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def statistics(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
               momentum: float, eps: float, partials: Optional[WelfordPartials]
               ) -> BatchNormStatistics:
    """What the normalising op takes: in training the batch's statistics, from ``partials``
    (the conv epilogue's) or a statistics pass over the 4-D x, updating the running ones in
    place when given; in eval the running statistics. Computed from detached values (the
    normalising op differentiates through the batch statistics itself)."""
    weight, bias = detached(weight), detached(bias)
    if not training:
        return BatchNormStatistics(*batch_norm_running_statistics(running_mean, running_var,
                                                                  weight, bias, eps))
    if partials is None:
        partials = WelfordPartials(*batch_norm_welford_partials(x.detach()).unbind(0))
    return BatchNormStatistics(*batch_norm_finalize(*partials, weight, bias, running_mean,
                                                    running_var, momentum, eps))


def normalize(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              stats: BatchNormStatistics, training: bool, relu: bool,
              pool: Optional[FusedPool], folded: bool = False) -> Tensor:
    """(x - mean) * scale + shift of a 4-D x, then ReLU (``relu``), then ``pool`` (whose
    input, the normalised tensor, is never written); ``folded`` as ``batch_norm_max_pool2d``
    (a max pool only)."""
    if pool is None:
        return batch_norm(x, weight, bias, *stats, training, relu)
    if pool.is_max:
        keep_offsets = any(records_grad(t) for t in (x, weight, bias, stats.mean, stats.invstd)
                           if t is not None)
        return batch_norm_max_pool2d(x, weight, bias, *stats, training, relu,
                                     *pool_window(pool.geometry), keep_offsets, folded)[0]
    return batch_norm_avg_pool2d(x, weight, bias, *stats, training, relu,
                                 *avg_window(pool.geometry), pool.count_include_pad,
                                 pool.divisor_override)


def forward(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
            weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
            momentum: float, eps: float, relu: bool, pool: Optional[FusedPool],
            partials: Optional[WelfordPartials]) -> Tensor:
    """BatchNorm (+ ReLU, + ``pool``) of a 4-D x on our kernels: statistics, then the
    normalising op."""
    stats = statistics(x, running_mean, running_var, weight, bias, training, momentum, eps,
                       partials)
    return normalize(x, weight, bias, stats, training, relu, pool)


def normalize_folded(x: Tensor, batch_statistics: tuple[Tensor, Tensor],
                     weight: Optional[Tensor], bias: Optional[Tensor], relu: bool,
                     pool: FusedPool) -> Tensor:
    """Training BatchNorm (+ ReLU) fused into a max ``pool`` of a chain link's output x,
    normalising with its differentiable ``batch_statistics`` (mean, invstd), so that the
    backward folds (``batch_norm_max_pool2d``'s ``folded``); the link ran the rest of the
    BatchNorm's forward (``ops.conv2d_chain``)."""
    mean, invstd = batch_statistics
    # scale and shift are values here: the op differentiates through mean, invstd, weight, bias
    scale = invstd.detach() if weight is None else invstd.detach() * weight.detach().float()
    shift = torch.zeros_like(invstd) if bias is None else bias.detach().float()
    return normalize(x, weight, bias, BatchNormStatistics(mean, invstd, scale, shift), True,
                     relu, pool, folded=True)


def forward_add_relu(x: Tensor, residual: Tensor, running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], weight: Optional[Tensor],
                     bias: Optional[Tensor], training: bool, momentum: float, eps: float,
                     partials: Optional[WelfordPartials]) -> Tensor:
    """relu(BatchNorm(x) + residual) of a 4-D x on our kernels: statistics, then one pass."""
    stats = statistics(x, running_mean, running_var, weight, bias, training, momentum, eps,
                       partials)
    return batch_norm_add_relu(x, weight, bias, *stats, training, residual)


def torch_forward(input: Tensor, running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], weight: Optional[Tensor],
                  bias: Optional[Tensor], training: bool, momentum: float, eps: float,
                  relu: bool, pool: Optional[FusedPool]) -> Tensor:
    """The same with torch's operators: the fallback."""
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if relu:
        y = F.relu(y)
    if pool is None:
        return y
    g = pool.geometry
    if pool.is_max:
        return F.max_pool2d(y, g.kernel, g.stride, g.padding, g.dilation, g.ceil_mode)
    return F.avg_pool2d(y, g.kernel, g.stride, g.padding, g.ceil_mode, pool.count_include_pad,
                        pool.divisor_override)
