"""fastarch's kernels as PyTorch operators: ``torch.ops.fastarch.<name>``.

Every kernel family is a ``torch.library.custom_op`` in the ``fastarch`` namespace with a fake
(shape) function; the differentiable ones carry their autograd formula, whose backward runs
our backward kernels as further ops. Operators, rather than Python autograd Functions, are
what the rest of PyTorch understands: ``torch.compile(fullgraph=True)`` traces a model
through them without a graph break (each op stays opaque; at run time it launches our Triton
kernel, compiled or interpreted), autocast passes them through untouched (``functional``
casts the arguments as torch would), and the profiler names each one ``fastarch::<name>``.
Each backward formula runs inside the range ``fastarch::<name>.backward`` (``profiling``).

Operator schemas carry tensors, numbers, booleans and int lists only, so window geometry is
passed as int lists and a memory format as ``channels_last``; an output that was not asked
for is a 0-element placeholder (``absent``). Ops that write into an argument (running
statistics, in-place ReLU and dropout) are mutable and have no autograd formula: the
functional API calls them where no gradient flows through the written tensor, or (in-place
ReLU in eager mode) inside an autograd Function that marks the tensor dirty.
"""
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from fastarch import backend, profiling
from fastarch.ops.common import (ConvWindow, PoolWindow, absent, conv_geometry, conv_window,
                                 fake_empty, is_channels_last, memory_format_for,
                                 no_double_backward,
                                 no_grads, or_absent, pool_geometry, pool_window, pooled_shape)
from fastarch.kernels import avg_pool as avg_pool_kernels
from fastarch.kernels import batch_norm as bn_kernels
from fastarch.kernels import conv2d_dgrad, conv2d_wgrad
from fastarch.kernels import conv2d_forward as conv_kernels
from fastarch.kernels import linear as linear_kernels
from fastarch.kernels import max_pool as max_pool_kernels
from fastarch.kernels import relu as relu_kernels
from fastarch.kernels import tensor_cores
from fastarch.kernels.batch_norm import BackwardSums, BatchNormStatistics
from fastarch.kernels.conv_geometry import ConvGeometry
from fastarch.kernels.pool_tile import PoolGeometry



# ----------------------------------------------------------------------------- max pool

@torch.library.custom_op("fastarch::max_pool2d", mutates_args=())
def max_pool2d(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
               dilation: list[int], ceil_mode: bool, keep_offsets: bool,
               return_indices: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Max pool of a 4-D x: (y, window offsets for backward if ``keep_offsets``, torch's
    int64 indices if ``return_indices``)."""
    geometry = pool_geometry(kernel_size, stride, padding, dilation, ceil_mode)
    y, offsets, indices = max_pool_kernels.max_pool2d_forward(x, geometry, keep_offsets,
                                                              return_indices)
    return y, or_absent(offsets, x), or_absent(indices, x)


@max_pool2d.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode, keep_offsets, return_indices):
    geometry = pool_geometry(kernel_size, stride, padding, dilation, ceil_mode)
    shape, fmt = pooled_shape(x.shape, geometry), backend.memory_format_of(x)
    offset_dtype = max_pool_kernels.window_offset_dtype(geometry)
    return (fake_empty(shape, x.dtype, x, fmt),
            fake_empty(shape, offset_dtype, x, fmt) if keep_offsets else absent(x),
            fake_empty(shape, torch.int64, x, fmt) if return_indices else absent(x))


def _max_pool2d_setup(ctx, inputs, output) -> None:
    x, *window, _, _ = inputs
    ctx.window = window
    ctx.input_shape, ctx.channels_last = list(x.shape), is_channels_last(x)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1])


@profiling.op_range("max_pool2d.backward")
def _max_pool2d_grads(ctx, dy: Tensor, *unused_grads):
    (offsets,) = ctx.saved_tensors
    dx = max_pool2d_backward(dy, offsets, ctx.input_shape, ctx.channels_last, *ctx.window)
    return dx, *no_grads(7)


max_pool2d.register_autograd(_max_pool2d_grads, setup_context=_max_pool2d_setup)


@torch.library.custom_op("fastarch::max_pool2d_backward", mutates_args=())
def max_pool2d_backward(dy: Tensor, offsets: Tensor, input_shape: list[int],
                        channels_last: bool, kernel_size: list[int], stride: list[int],
                        padding: list[int], dilation: list[int], ceil_mode: bool) -> Tensor:
    """dx of a max pool from the window offsets its forward kept: a gather, no atomics."""
    geometry = pool_geometry(kernel_size, stride, padding, dilation, ceil_mode)
    return max_pool_kernels.max_pool2d_backward(dy, offsets, torch.Size(input_shape),
                                                memory_format_for(channels_last), geometry)


@max_pool2d_backward.register_fake
def _(dy, offsets, input_shape, channels_last, kernel_size, stride, padding, dilation,
      ceil_mode):
    return fake_empty(input_shape, dy.dtype, dy, memory_format_for(channels_last))


max_pool2d_backward.register_autograd(no_double_backward("max_pool2d"))


# ----------------------------------------------------------------------------- avg pool

@torch.library.custom_op("fastarch::avg_pool2d", mutates_args=())
def avg_pool2d(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
               ceil_mode: bool, count_include_pad: bool,
               divisor_override: Optional[int]) -> Tensor:
    """Average pool of a 4-D x (fp32 sums)."""
    geometry = pool_geometry(kernel_size, stride, padding, [1, 1], ceil_mode)
    return avg_pool_kernels.avg_pool2d_forward(x, geometry, count_include_pad,
                                               divisor_override)


@avg_pool2d.register_fake
def _(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    geometry = pool_geometry(kernel_size, stride, padding, [1, 1], ceil_mode)
    return fake_empty(pooled_shape(x.shape, geometry), x.dtype, x, backend.memory_format_of(x))


def _avg_pool2d_setup(ctx, inputs, output) -> None:
    x, *window = inputs
    ctx.window = window
    ctx.input_shape, ctx.channels_last = list(x.shape), is_channels_last(x)


@profiling.op_range("avg_pool2d.backward")
def _avg_pool2d_grads(ctx, dy: Tensor):
    dx = avg_pool2d_backward(dy, ctx.input_shape, ctx.channels_last, *ctx.window)
    return dx, *no_grads(6)


avg_pool2d.register_autograd(_avg_pool2d_grads, setup_context=_avg_pool2d_setup)


@torch.library.custom_op("fastarch::avg_pool2d_backward", mutates_args=())
def avg_pool2d_backward(dy: Tensor, input_shape: list[int], channels_last: bool,
                        kernel_size: list[int], stride: list[int], padding: list[int],
                        ceil_mode: bool, count_include_pad: bool,
                        divisor_override: Optional[int]) -> Tensor:
    geometry = pool_geometry(kernel_size, stride, padding, [1, 1], ceil_mode)
    return avg_pool_kernels.avg_pool2d_backward(dy, torch.Size(input_shape),
                                                memory_format_for(channels_last), geometry,
                                                count_include_pad, divisor_override)


@avg_pool2d_backward.register_fake
def _(dy, input_shape, channels_last, kernel_size, stride, padding, ceil_mode,
      count_include_pad, divisor_override):
    return fake_empty(input_shape, dy.dtype, dy, memory_format_for(channels_last))


avg_pool2d_backward.register_autograd(no_double_backward("avg_pool2d"))


# ----------------------------------------------------------------------------- adaptive pool

@torch.library.custom_op("fastarch::adaptive_avg_pool2d", mutates_args=())
def adaptive_avg_pool2d(x: Tensor, output_size: list[int]) -> Tensor:
    return avg_pool_kernels.adaptive_avg_pool2d_forward(x, tuple(output_size))


@adaptive_avg_pool2d.register_fake
def _(x, output_size):
    return fake_empty((*x.shape[:2], *output_size), x.dtype, x, backend.memory_format_of(x))


def _adaptive_avg_pool2d_setup(ctx, inputs, output) -> None:
    x, _ = inputs
    ctx.input_shape, ctx.channels_last = list(x.shape), is_channels_last(x)


@profiling.op_range("adaptive_avg_pool2d.backward")
def _adaptive_avg_pool2d_grads(ctx, dy: Tensor):
    return adaptive_avg_pool2d_backward(dy, ctx.input_shape, ctx.channels_last), None


adaptive_avg_pool2d.register_autograd(_adaptive_avg_pool2d_grads,
                                      setup_context=_adaptive_avg_pool2d_setup)


@torch.library.custom_op("fastarch::adaptive_avg_pool2d_backward", mutates_args=())
def adaptive_avg_pool2d_backward(dy: Tensor, input_shape: list[int],
                                 channels_last: bool) -> Tensor:
    return avg_pool_kernels.adaptive_avg_pool2d_backward(dy, torch.Size(input_shape),
                                                         memory_format_for(channels_last))


@adaptive_avg_pool2d_backward.register_fake
def _(dy, input_shape, channels_last):
    return fake_empty(input_shape, dy.dtype, dy, memory_format_for(channels_last))


adaptive_avg_pool2d_backward.register_autograd(no_double_backward("adaptive_avg_pool2d"))


# ----------------------------------------------------------------------------- batch norm stats

@torch.library.custom_op("fastarch::batch_norm_welford_partials", mutates_args=())
def batch_norm_welford_partials(x: Tensor) -> Tensor:
    """(count, mean, M2) per pixel tile and channel of a 4-D x (N*H*W > 0) as one
    [3, tiles, C] fp32 buffer."""
    return bn_kernels.welford_partial_buffer(x)


@batch_norm_welford_partials.register_fake
def _(x):
    return fake_empty((3, bn_kernels.partial_tiles(x), x.shape[1]), torch.float32, x)


def _statistics_fake(channels: int, like: Tensor) -> tuple[Tensor, ...]:
    return tuple(fake_empty((channels,), torch.float32, like) for _ in BatchNormStatistics._fields)


@torch.library.custom_op("fastarch::batch_norm_finalize",
                         mutates_args=("running_mean", "running_var"))
def batch_norm_finalize(count: Tensor, mean: Tensor, m2: Tensor, weight: Optional[Tensor],
                        bias: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], momentum: float,
                        eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch statistics (mean, invstd, scale, shift: fp32 [C]) from Welford partials
    ([tiles, C] each), updating the running statistics in place when given. weight and
    bias are values here (no gradient flows through this op)."""
    return tuple(bn_kernels.batch_norm_finalize(count, mean, m2, weight, bias, running_mean,
                                                running_var, momentum, eps))


@batch_norm_finalize.register_fake
def _(count, mean, m2, weight, bias, running_mean, running_var, momentum, eps):
    return _statistics_fake(count.shape[1], count)


@torch.library.custom_op("fastarch::batch_norm_running_statistics", mutates_args=())
def batch_norm_running_statistics(running_mean: Tensor, running_var: Tensor,
                                  weight: Optional[Tensor], bias: Optional[Tensor],
                                  eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eval mode: the (mean, invstd, scale, shift) that normalise with running statistics."""
    return tuple(bn_kernels.batch_norm_running_statistics(running_mean, running_var, weight,
                                                          bias, eps))


@batch_norm_running_statistics.register_fake
def _(running_mean, running_var, weight, bias, eps):
    return _statistics_fake(running_mean.shape[0], running_mean)


# ----------------------------------------------------------------------------- batch norm apply
#
# The normalising ops take the statistics as inputs; weight and bias are inputs only for their
# gradients (their values are already in scale and shift). Backward recomputes x_hat from x.

def _batch_norm_setup(ctx, inputs, output, offsets: Optional[Tensor] = None) -> None:
    x, weight, bias, mean, invstd, scale, shift, training, relu = inputs[:9]
    ctx.training, ctx.relu = training, relu
    ctx.grad_dtypes = (None if weight is None else weight.dtype,
                       None if bias is None else bias.dtype)
    ctx.save_for_backward(x, mean, invstd, scale, shift, offsets)


def _batch_norm_grads(ctx, dy: Tensor) -> tuple[Optional[Tensor], ...]:
    """(dx, dweight, dbias) of a normalising op from dy, the gradient of its normalised
    (and ReLU'd) output."""
    x, mean, invstd, scale, shift, _ = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    sums = dw = db = None
    if (need_dx and ctx.training) or need_dw or need_db:
        sum_dy, sum_dy_xhat, dw, db = batch_norm_backward_reduce(
            x, dy, mean, invstd, scale, shift, ctx.relu,
            ctx.grad_dtypes[0] if need_dw else None, ctx.grad_dtypes[1] if need_db else None)
        sums = (sum_dy, sum_dy_xhat)
    dx = None
    if need_dx:
        dx = batch_norm_backward_input(x, dy, mean, invstd, scale, shift,
                                       *(sums if ctx.training else (None, None)), ctx.relu)
    return dx, dw if need_dw else None, db if need_db else None


@torch.library.custom_op("fastarch::batch_norm", mutates_args=())
def batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
               invstd: Tensor, scale: Tensor, shift: Tensor, training: bool,
               relu: bool) -> Tensor:
    """y = (x - mean) * scale + shift, then ReLU if ``relu``, for a 4-D x; ``training``: the
    statistics are the batch's (backward differentiates through them)."""
    stats = BatchNormStatistics(mean, invstd, scale, shift)
    return bn_kernels.batch_norm_apply(x, stats, relu)


@batch_norm.register_fake
def _(x, weight, bias, mean, invstd, scale, shift, training, relu):
    return fake_empty(x.shape, x.dtype, x, backend.memory_format_of(x))


@profiling.op_range("batch_norm.backward")
def _batch_norm_apply_grads(ctx, dy: Tensor):
    return *_batch_norm_grads(ctx, dy), *no_grads(6)


batch_norm.register_autograd(_batch_norm_apply_grads, setup_context=_batch_norm_setup)


@torch.library.custom_op("fastarch::batch_norm_max_pool2d", mutates_args=())
def batch_norm_max_pool2d(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor,
                          training: bool, relu: bool, kernel_size: list[int],
                          stride: list[int], padding: list[int], dilation: list[int],
                          ceil_mode: bool, keep_offsets: bool) -> tuple[Tensor, Tensor]:
    """max_pool2d of ``batch_norm``'s output without writing it: (y, window offsets for
    backward if ``keep_offsets``)."""
    stats = BatchNormStatistics(mean, invstd, scale, shift)
    geometry = pool_geometry(kernel_size, stride, padding, dilation, ceil_mode)
    y, offsets = bn_kernels.batch_norm_max_pool2d_forward(x, stats, relu, geometry,
                                                          keep_offsets)
    return y, or_absent(offsets, x)


@batch_norm_max_pool2d.register_fake
def _(x, weight, bias, mean, invstd, scale, shift, training, relu, kernel_size, stride,
      padding, dilation, ceil_mode, keep_offsets):
    geometry = pool_geometry(kernel_size, stride, padding, dilation, ceil_mode)
    shape, fmt = pooled_shape(x.shape, geometry), backend.memory_format_of(x)
    offset_dtype = max_pool_kernels.window_offset_dtype(geometry)
    return (fake_empty(shape, x.dtype, x, fmt),
            fake_empty(shape, offset_dtype, x, fmt) if keep_offsets else absent(x))


def _batch_norm_max_pool2d_setup(ctx, inputs, output) -> None:
    _batch_norm_setup(ctx, inputs, output, offsets=output[1])
    ctx.window = inputs[9:14]
    ctx.mark_non_differentiable(output[1])


@profiling.op_range("batch_norm_max_pool2d.backward")
def _batch_norm_max_pool2d_grads(ctx, dy: Tensor, unused_offsets_grad):
    x, offsets = ctx.saved_tensors[0], ctx.saved_tensors[5]
    dz = max_pool2d_backward(dy, offsets, list(x.shape), is_channels_last(x), *ctx.window)
    return *_batch_norm_grads(ctx, dz), *no_grads(12)


batch_norm_max_pool2d.register_autograd(_batch_norm_max_pool2d_grads,
                                        setup_context=_batch_norm_max_pool2d_setup)


@torch.library.custom_op("fastarch::batch_norm_avg_pool2d", mutates_args=())
def batch_norm_avg_pool2d(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor,
                          training: bool, relu: bool, kernel_size: list[int],
                          stride: list[int], padding: list[int], ceil_mode: bool,
                          count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    """avg_pool2d of ``batch_norm``'s output without writing it."""
    stats = BatchNormStatistics(mean, invstd, scale, shift)
    geometry = pool_geometry(kernel_size, stride, padding, [1, 1], ceil_mode)
    return bn_kernels.batch_norm_avg_pool2d_forward(x, stats, relu, geometry,
                                                    count_include_pad, divisor_override)


@batch_norm_avg_pool2d.register_fake
def _(x, weight, bias, mean, invstd, scale, shift, training, relu, kernel_size, stride,
      padding, ceil_mode, count_include_pad, divisor_override):
    geometry = pool_geometry(kernel_size, stride, padding, [1, 1], ceil_mode)
    return fake_empty(pooled_shape(x.shape, geometry), x.dtype, x, backend.memory_format_of(x))


def _batch_norm_avg_pool2d_setup(ctx, inputs, output) -> None:
    _batch_norm_setup(ctx, inputs, output)
    ctx.window = inputs[9:15]


@profiling.op_range("batch_norm_avg_pool2d.backward")
def _batch_norm_avg_pool2d_grads(ctx, dy: Tensor):
    x = ctx.saved_tensors[0]
    dz = avg_pool2d_backward(dy, list(x.shape), is_channels_last(x), *ctx.window)
    return *_batch_norm_grads(ctx, dz), *no_grads(12)


batch_norm_avg_pool2d.register_autograd(_batch_norm_avg_pool2d_grads,
                                        setup_context=_batch_norm_avg_pool2d_setup)


# ----------------------------------------------------------------------------- batch norm grads

@torch.library.custom_op("fastarch::batch_norm_backward_reduce", mutates_args=())
def batch_norm_backward_reduce(x: Tensor, dy: Tensor, mean: Tensor, invstd: Tensor,
                               scale: Tensor, shift: Tensor, relu: bool,
                               weight_grad_dtype: Optional[torch.dtype],
                               bias_grad_dtype: Optional[torch.dtype]
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass over x and dy (ReLU-masked): fp32 sum dy and sum dy * x_hat per channel, and
    dweight (sum dy * x_hat) / dbias (sum dy) in the given dtypes (placeholders if None)."""
    stats = BatchNormStatistics(mean, invstd, scale, shift)
    sums, dw, db = bn_kernels.batch_norm_backward_sums(x, dy, stats, relu, weight_grad_dtype,
                                                       bias_grad_dtype)
    return sums.sum_dy, sums.sum_dy_xhat, or_absent(dw, x), or_absent(db, x)


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
    """dx: training (batch statistics) when the sums over the N*H*W pixels of x are given,
    eval mode (constant statistics) when they are None."""
    stats = BatchNormStatistics(mean, invstd, scale, shift)
    sums = None if sum_dy is None else BackwardSums(sum_dy, sum_dy_xhat)
    return bn_kernels.batch_norm_backward_input(x, dy, stats, sums, relu)


@batch_norm_backward_input.register_fake
def _(x, dy, mean, invstd, scale, shift, sum_dy, sum_dy_xhat, relu):
    return fake_empty(x.shape, dy.dtype, x, backend.memory_format_of(x))


batch_norm_backward_input.register_autograd(no_double_backward("batch_norm"))


# ----------------------------------------------------------------------------- relu

@torch.library.custom_op("fastarch::relu", mutates_args=())
def relu(x: Tensor) -> Tensor:
    """ReLU of a dense x (contiguous or channels_last)."""
    return relu_kernels.relu_forward(x, inplace=False)


@relu.register_fake
def _(x):
    return fake_empty(x.shape, x.dtype, x, relu_kernels.dense_format(x))


def _relu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


@profiling.op_range("relu.backward")
def relu_grads(ctx, dy: Tensor) -> Tensor:
    """The ReLU backward formula from the saved output (also the in-place ReLU's)."""
    (y,) = ctx.saved_tensors
    return relu_backward(y, dy)


relu.register_autograd(relu_grads, setup_context=_relu_setup)


@torch.library.custom_op("fastarch::relu_", mutates_args=("x",))
def relu_(x: Tensor) -> None:
    """ReLU of a dense x in place."""
    relu_kernels.relu_forward(x, inplace=True)


@relu_.register_fake
def _(x):
    return None


@torch.library.custom_op("fastarch::relu_backward", mutates_args=())
def relu_backward(y: Tensor, dy: Tensor) -> Tensor:
    """dy where the ReLU output y is > 0 (or NaN), else 0."""
    return relu_kernels.relu_backward(y, dy)


@relu_backward.register_fake
def _(y, dy):
    return fake_empty(y.shape, dy.dtype, y, relu_kernels.dense_format(y))


relu_backward.register_autograd(no_double_backward("relu"))


# ----------------------------------------------------------------------------- conv2d

@torch.library.custom_op("fastarch::conv2d", mutates_args=())
def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
           shift: Optional[Tensor], stride: list[int], padding: list[int],
           dilation: list[int], padding_end: list[int], relu: bool,
           stats: bool) -> tuple[Tensor, Tensor]:
    """conv2d (groups=1) of a 4-D x with the fused epilogue: y = relu?((conv + bias) * scale +
    shift); with ``stats`` also the Welford partials of conv + bias ([3, tiles, K_out] fp32,
    not differentiable)."""
    geometry = conv_geometry(weight.shape, stride, padding, dilation, padding_end)
    y, partials = conv_kernels.conv2d_forward(x, weight, bias, geometry, scale, shift, relu,
                                              stats)
    return y, or_absent(partials, x)


@conv2d.register_fake
def _(x, weight, bias, scale, shift, stride, padding, dilation, padding_end, relu, stats):
    geometry = conv_geometry(weight.shape, stride, padding, dilation, padding_end)
    shape = (x.shape[0], weight.shape[0], *geometry.output_size(*x.shape[2:]))
    y = fake_empty(shape, x.dtype, x, backend.memory_format_of(x))
    if not stats:
        return y, absent(x)
    tiles = conv_kernels.stats_tiles(x, weight, geometry)
    return y, fake_empty((3, tiles, weight.shape[0]), torch.float32, x)


def _conv2d_setup(ctx, inputs, output) -> None:
    x, weight, _, scale, _, *window, relu, _ = inputs
    ctx.window = window
    ctx.input_shape, ctx.channels_last = list(x.shape), is_channels_last(x)
    ctx.weight_shape = list(weight.shape)
    ctx.mark_non_differentiable(output[1])
    need_dx, need_dw = ctx.needs_input_grad[:2]
    ctx.save_for_backward(x if need_dw else None, weight if need_dx else None, scale,
                          output[0] if relu else None)


@profiling.op_range("conv2d.backward")
def _conv2d_grads(ctx, dy: Tensor, unused_partials_grad):
    x, weight, scale, y = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = conv2d_backward(dy, x, weight, scale, y, ctx.input_shape, ctx.channels_last,
                                 ctx.weight_shape, *ctx.window, need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            *no_grads(8))


conv2d.register_autograd(_conv2d_grads, setup_context=_conv2d_setup)


@torch.library.custom_op("fastarch::conv2d_backward", mutates_args=())
def conv2d_backward(dy: Tensor, x: Optional[Tensor], weight: Optional[Tensor],
                    scale: Optional[Tensor], y: Optional[Tensor], input_shape: list[int],
                    channels_last: bool, weight_shape: list[int], stride: list[int],
                    padding: list[int], dilation: list[int], padding_end: list[int],
                    input_grad: bool, weight_grad: bool,
                    bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of ``conv2d``, each a placeholder unless asked for; dy goes back
    through the ReLU (``y``, the output, given when it ran) and the constant ``scale``. dx
    needs ``weight``, dweight needs ``x``."""
    if y is not None:
        dy = dy.masked_fill(y <= 0, 0)  # ReLU: torch's threshold_backward (NaN passes)
    if scale is not None:
        dy = (dy.float() * scale.view(1, -1, 1, 1)).to(dy.dtype)
    geometry = conv_geometry(weight_shape, stride, padding, dilation, padding_end)
    allow_tf32 = tensor_cores.cudnn_conv_allows_tf32()
    dx = dw = db = None
    if input_grad:
        dx = conv2d_dgrad.conv2d_input_grad(dy, weight, torch.Size(input_shape),
                                            memory_format_for(channels_last), geometry, allow_tf32)
    if weight_grad:
        dw, db = conv2d_wgrad.conv2d_weight_grad(x, dy, torch.Size(weight_shape), geometry,
                                                 bias_grad, allow_tf32)
    elif bias_grad:
        db = dy.sum((0, 2, 3), dtype=torch.float32).to(dy.dtype)
    return or_absent(dx, dy), or_absent(dw, dy), or_absent(db, dy)


@conv2d_backward.register_fake
def _(dy, x, weight, scale, y, input_shape, channels_last, weight_shape, stride, padding,
      dilation, padding_end, input_grad, weight_grad, bias_grad):
    return (fake_empty(input_shape, dy.dtype, dy, memory_format_for(channels_last)) if input_grad
            else absent(dy),
            fake_empty(weight_shape, dy.dtype, dy) if weight_grad else absent(dy),
            fake_empty(weight_shape[:1], dy.dtype, dy) if bias_grad else absent(dy))


conv2d_backward.register_autograd(no_double_backward("conv2d"))


# ----------------------------------------------------------------------------- linear

@torch.library.custom_op("fastarch::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], relu: bool, p: float,
           seed: Optional[Tensor]) -> Tensor:
    """dropout(relu(x @ weight^T + bias)) of a 2-D x in one GEMM; dropout when p > 0, its
    mask drawn from ``seed``."""
    return linear_kernels.linear_forward(x, weight, bias, relu, p, seed,
                                         tensor_cores.matmul_allows_tf32())


@linear.register_fake
def _(x, weight, bias, relu, p, seed):
    return fake_empty((x.shape[0], weight.shape[0]), x.dtype, x)


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, relu, p, seed = inputs
    ctx.relu, ctx.p = relu, p
    ctx.bias_dtype = None if bias is None else bias.dtype
    need_dx, need_dw = ctx.needs_input_grad[:2]
    ctx.save_for_backward(x if need_dw else None, weight if need_dx else None,
                          output if relu else None, seed)


@profiling.op_range("linear.backward")
def _linear_grads(ctx, dy: Tensor):
    x, weight, y, seed = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = linear_backward(dy, x, weight, y, seed, ctx.relu, ctx.p,
                                 ctx.bias_dtype if need_db else None)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            None, None, None)


linear.register_autograd(_linear_grads, setup_context=_linear_setup)


@torch.library.custom_op("fastarch::linear_backward", mutates_args=())
def linear_backward(dy: Tensor, x: Optional[Tensor], weight: Optional[Tensor],
                    y: Optional[Tensor], seed: Optional[Tensor], relu: bool, p: float,
                    bias_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of ``linear`` for a 2-D dy: dx when ``weight`` is given, dweight
    when ``x`` is, dbias when ``bias_dtype`` is (placeholders otherwise)."""
    dx, dw, db = linear_kernels.linear_backward(dy, x, weight, y, seed, relu, p, bias_dtype,
                                                tensor_cores.matmul_allows_tf32())
    return or_absent(dx, dy), or_absent(dw, dy), or_absent(db, dy)


@linear_backward.register_fake
def _(dy, x, weight, y, seed, relu, p, bias_dtype):
    return (absent(dy) if weight is None else fake_empty((dy.shape[0], weight.shape[1]),
                                                     dy.dtype, dy),
            absent(dy) if x is None else fake_empty((dy.shape[1], x.shape[1]), x.dtype, dy),
            absent(dy) if bias_dtype is None else fake_empty((dy.shape[1],), bias_dtype, dy))


linear_backward.register_autograd(no_double_backward("linear"))


# ----------------------------------------------------------------------------- dropout

@torch.library.custom_op("fastarch::dropout", mutates_args=())
def dropout(x: Tensor, p: float, seed: Tensor) -> Tensor:
    """x * mask / (1 - p) of a dense x, the mask keyed on memory order and drawn from
    ``seed``; the same call on dy is the backward."""
    return linear_kernels.dropout_forward(x, p, seed)


@dropout.register_fake
def _(x, p, seed):
    return fake_empty(x.shape, x.dtype, x, backend.memory_format_of(x))


def _dropout_setup(ctx, inputs, output) -> None:
    x, p, seed = inputs
    ctx.p, ctx.memory_format = p, backend.memory_format_of(x)
    ctx.save_for_backward(seed)


@profiling.op_range("dropout.backward")
def _dropout_grads(ctx, dy: Tensor):
    (seed,) = ctx.saved_tensors
    dy = dy.contiguous(memory_format=ctx.memory_format)  # the mask follows memory order
    return dropout(dy, ctx.p, seed), None, None


dropout.register_autograd(_dropout_grads, setup_context=_dropout_setup)


@torch.library.custom_op("fastarch::dropout_", mutates_args=("x",))
def dropout_(x: Tensor, p: float, seed: Tensor) -> None:
    """``dropout`` in place."""
    linear_kernels.dropout_forward(x, p, seed, out=x)


@dropout_.register_fake
def _(x, p, seed):
    return None
