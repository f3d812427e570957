"""Average pooling's operators and host side: ``fastarch::avg_pool2d`` and
``fastarch::adaptive_avg_pool2d`` with their backward gathers (``avg_pool2d_backward`` is
also the backward of BatchNorm fused into an average pool), output allocation and the
[pixels x channels] tile."""
from typing import Optional

import torch
from torch import Tensor

from fastarch import profiling
from fastarch.kernels.avg_pool import (adaptive_backward_launch, adaptive_forward_launch,
                                       avg_backward_launch, avg_forward_launch)
from fastarch.kernels.pool_geometry import PoolGeometry
from fastarch.kernels.runtime import empty, memory_format_of
from fastarch.ops.common import (fake_empty, is_channels_last, memory_format_for,
                                 no_double_backward, no_grads, run_nhwc, pool_geometry,
                                 pool_window, pooled_shape)

AvgWindow = tuple[list[int], list[int], list[int], bool]


def avg_window(geometry: PoolGeometry) -> AvgWindow:
    """An average pool's window as op arguments: kernel, stride, padding, ceil_mode (no
    dilation)."""
    kernel, stride, padding, _, ceil_mode = pool_window(geometry)
    return kernel, stride, padding, ceil_mode


def _avg_geometry(kernel_size: list[int], stride: list[int], padding: list[int],
                  ceil_mode: bool) -> PoolGeometry:
    return pool_geometry(kernel_size, stride, padding, [1, 1], ceil_mode)


# ----------------------------------------------------------------------------- avg pool

@torch.library.custom_op("fastarch::avg_pool2d", mutates_args=())
def avg_pool2d(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
               ceil_mode: bool, count_include_pad: bool,
               divisor_override: Optional[int]) -> Tensor:
    """Average pool of a 4-D x (fp32 sums), in x's memory format."""
    geometry = _avg_geometry(kernel_size, stride, padding, ceil_mode)
    y = empty(pooled_shape(x.shape, geometry), x.dtype, x.device, memory_format_of(x))
    N, C, P, Q = y.shape
    run_nhwc("avg_pool2d_forward", x, C, N * P * Q,
             lambda tile: avg_forward_launch(x, y, geometry, count_include_pad,
                                             divisor_override, tile), (y,), window=kernel_size)
    return y


@avg_pool2d.register_fake
def _(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    geometry = _avg_geometry(kernel_size, stride, padding, ceil_mode)
    return fake_empty(pooled_shape(x.shape, geometry), x.dtype, x, memory_format_of(x))


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
    """dx of an average pool: each input element gathers dy / divisor over its windows."""
    geometry = _avg_geometry(kernel_size, stride, padding, ceil_mode)
    N, C, H, W = input_shape
    dx = empty(input_shape, dy.dtype, dy.device, memory_format_for(channels_last))
    run_nhwc("avg_pool2d_backward", dy, C, N * H * W,
             lambda tile: avg_backward_launch(dy, dx, geometry, count_include_pad,
                                              divisor_override, tile), (dx,),
             window=kernel_size)
    return dx


@avg_pool2d_backward.register_fake
def _(dy, input_shape, channels_last, kernel_size, stride, padding, ceil_mode,
      count_include_pad, divisor_override):
    return fake_empty(input_shape, dy.dtype, dy, memory_format_for(channels_last))


avg_pool2d_backward.register_autograd(no_double_backward("avg_pool2d"))


# ----------------------------------------------------------------------------- adaptive pool

@torch.library.custom_op("fastarch::adaptive_avg_pool2d", mutates_args=())
def adaptive_avg_pool2d(x: Tensor, output_size: list[int]) -> Tensor:
    """Adaptive average pool of a 4-D x to ``output_size`` (fp32 sums), in x's memory
    format."""
    N, C = x.shape[:2]
    y = empty((N, C, *output_size), x.dtype, x.device, memory_format_of(x))
    run_nhwc("adaptive_avg_pool2d_forward", x, C, N * output_size[0] * output_size[1],
             lambda tile: adaptive_forward_launch(x, y, tile), (y,),
             window=[*x.shape[2:], *output_size])
    return y


@adaptive_avg_pool2d.register_fake
def _(x, output_size):
    return fake_empty((*x.shape[:2], *output_size), x.dtype, x, memory_format_of(x))


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
    """dx of an adaptive average pool: each input element gathers dy / area over the
    windows that contain it."""
    N, C, H, W = input_shape
    dx = empty(input_shape, dy.dtype, dy.device, memory_format_for(channels_last))
    run_nhwc("adaptive_avg_pool2d_backward", dy, C, N * H * W,
             lambda tile: adaptive_backward_launch(dy, dx, tile), (dx,),
             window=[H, W, *dy.shape[2:]])
    return dx


@adaptive_avg_pool2d_backward.register_fake
def _(dy, input_shape, channels_last):
    return fake_empty(input_shape, dy.dtype, dy, memory_format_for(channels_last))


adaptive_avg_pool2d_backward.register_autograd(no_double_backward("adaptive_avg_pool2d"))
