"""Max pooling's operators and host side: ``fastarch::max_pool2d`` (y, the window offsets its
backward gathers through, torch's int64 indices when asked for) and its backward,
``fastarch::max_pool2d_backward`` (also the backward of BatchNorm fused into a max pool),
with output allocation and the [pixels x channels] tile."""
from collections.abc import Callable

import torch
from torch import Tensor

from fastarch import profiling
from fastarch.kernels.max_pool import backward_launch, forward_launch, window_offset_dtype
from fastarch.kernels.pool_geometry import PoolGeometry
from fastarch.kernels.runtime import empty, memory_format_of
from fastarch.ops.common import (absent, fake_empty, is_channels_last, memory_format_for,
                                 no_double_backward, no_grads, run_nhwc,
                                 pool_geometry, pooled_shape)


def max_pool_outputs(x: Tensor, geometry: PoolGeometry, keep_offsets: bool,
                     return_indices: bool, allocate: Callable[..., Tensor]
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(y, window offsets, int64 indices) of a max pool of x, in x's memory format, each
    allocated by ``allocate(shape, dtype, like, memory_format)`` (``output_empty``, or
    ``fake_empty`` in a shape function); the last two ``absent`` unless asked for."""
    shape, fmt = pooled_shape(x.shape, geometry), memory_format_of(x)
    return (allocate(shape, x.dtype, x, fmt),
            allocate(shape, window_offset_dtype(geometry), x, fmt) if keep_offsets
            else absent(x),
            allocate(shape, torch.int64, x, fmt) if return_indices else absent(x))


def output_empty(shape, dtype: torch.dtype, like: Tensor, memory_format: torch.memory_format
                 ) -> Tensor:
    """A kernel output on ``like``'s device: the real op's ``fake_empty``."""
    return empty(shape, dtype, like.device, memory_format)


@torch.library.custom_op("fastarch::max_pool2d", mutates_args=())
def max_pool2d(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
               dilation: list[int], ceil_mode: bool, keep_offsets: bool,
               return_indices: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Max pool of a 4-D x: (y, window offsets for backward if ``keep_offsets``, torch's
    int64 indices if ``return_indices``)."""
    geometry = pool_geometry(kernel_size, stride, padding, dilation, ceil_mode)
    y, offsets, indices = max_pool_outputs(x, geometry, keep_offsets, return_indices,
                                           output_empty)
    N, C, P, Q = y.shape
    kept = (offsets if keep_offsets else None, indices if return_indices else None)
    run_nhwc("max_pool2d_forward", x, C, N * P * Q,
             lambda tile: forward_launch(x, y, *kept, geometry, tile), (y, *kept),
             window=kernel_size)
    return y, offsets, indices


@max_pool2d.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode, keep_offsets, return_indices):
    geometry = pool_geometry(kernel_size, stride, padding, dilation, ceil_mode)
    return max_pool_outputs(x, geometry, keep_offsets, return_indices, fake_empty)


def _max_pool2d_setup(ctx, inputs, output) -> None:
    x, *window, _, _ = inputs
    ctx.window = window
    ctx.input_shape, ctx.channels_last = list(x.shape), is_channels_last(x)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero gradients written for the offsets, indices
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
    N, C, H, W = input_shape
    dx = empty(input_shape, dy.dtype, dy.device, memory_format_for(channels_last))
    run_nhwc("max_pool2d_backward", dy, C, N * H * W,
             lambda tile: backward_launch(dy, offsets, dx, geometry, tile), (dx,),
             window=kernel_size)
    return dx


@max_pool2d_backward.register_fake
def _(dy, offsets, input_shape, channels_last, kernel_size, stride, padding, dilation,
      ceil_mode):
    return fake_empty(input_shape, dy.dtype, dy, memory_format_for(channels_last))


max_pool2d_backward.register_autograd(no_double_backward("max_pool2d"))
