"""BatchNorm (+ ReLU) fused into the convolution that follows it: ``fastarch::batch_norm_conv2d``
is ``fastarch::conv2d`` (its epilogue included) of z = relu?(batch_norm(x)), the conv applying
the normalisation to its input tiles as it loads them (an input prologue,
``kernels.conv2d.InputNormalization``), so z is never written. Its backward never writes z
either: dz is the conv's input gradient, the weight gradient reads x through the same
prologue, and dz goes back through the BatchNorm with ``ops.batch_norm``'s own formula
(``batch_norm_grads``: x_hat and the ReLU mask recomputed from x).

A module of its own, as ``ops.sync_batch_norm``: the op is one of BatchNorm's normalising ops
(statistics from ``ops.batch_norm.statistics``, autograd ending in ``batch_norm_grads``, like
the pools that normalise their taps), and its consumer is a convolution on ``ops.conv2d``'s
host side (``conv2d_forward`` and ``conv_grads`` with the prologue).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastarch import arguments, backend, profiling
from fastarch.arguments import ConvPadding, IntOrPair
from fastarch.kernels.conv2d import ConvGeometry, InputNormalization
from fastarch.kernels.runtime import memory_format_of
from fastarch.kernels.welford import WelfordPartials
from fastarch.ops.batch_norm import batch_norm_grads, batch_norm_setup, statistics
from fastarch.ops.common import (absent, conv_geometry, conv_window, fake_empty,
                                 is_channels_last, no_double_backward, no_grads, or_absent,
                                 weight_grad_format)
from fastarch.ops.conv2d import (conv2d_forward, conv2d_fused_torch, conv_grads,
                                 fake_conv2d_outputs)


def input_normalization(mean: Tensor, scale: Tensor, shift: Tensor,
                        relu: bool) -> InputNormalization:
    """The prologue computing ``batch_norm``'s (x - mean) * scale + shift as x * scale +
    (shift - mean * scale), fp32 [C]; forward and backward build it alike (bitwise)."""
    return InputNormalization(scale, torch.addcmul(shift, mean, scale, value=-1), relu)


# ----------------------------------------------------------------------------- operators

@torch.library.custom_op("fastarch::batch_norm_conv2d", mutates_args=())
def batch_norm_conv2d(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      mean: Tensor, invstd: Tensor, bn_scale: Tensor, bn_shift: Tensor,
                      training: bool, bn_relu: bool, weight: Tensor, bias: Optional[Tensor],
                      scale: Optional[Tensor], shift: Optional[Tensor], stride: list[int],
                      padding: list[int], dilation: list[int], padding_end: list[int],
                      relu: bool, stats: bool) -> tuple[Tensor, Tensor]:
    """``conv2d`` of z = relu?((x - mean) * bn_scale + bn_shift) (``batch_norm``'s output,
    ReLU'd if ``bn_relu``) for a 4-D x, z never written: (y, Welford partials of conv + bias
    with ``stats``). The arguments are ``batch_norm``'s (bn_weight, bn_bias only for their
    gradients), then ``conv2d``'s."""
    geometry = conv_geometry(weight.shape, stride, padding, dilation, padding_end)
    prologue = input_normalization(mean, bn_scale, bn_shift, bn_relu)
    y, partials = conv2d_forward(x, weight, bias, geometry, scale, shift, relu, stats,
                                  prologue=prologue)
    return y, or_absent(partials, x)


@batch_norm_conv2d.register_fake
def _(x, bn_weight, bn_bias, mean, invstd, bn_scale, bn_shift, training, bn_relu, weight, bias,
      scale, shift, stride, padding, dilation, padding_end, relu, stats):
    return fake_conv2d_outputs(x, weight, [stride, padding, dilation, padding_end], stats)


# The op's conv arguments follow batch_norm's nine (x .. bn_relu): weight, then bias.
_WEIGHT, _BIAS = 9, 10


def _batch_norm_conv2d_setup(ctx, inputs, output) -> None:
    weight, _, scale, _, *window, relu, _ = inputs[_WEIGHT:]
    ctx.window, ctx.weight_shape = window, list(weight.shape)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero gradient written for the partials
    need_dz, need_dw = any(ctx.needs_input_grad[:3]), ctx.needs_input_grad[_WEIGHT]
    batch_norm_setup(ctx, inputs, output,
                     kept=(weight if need_dz or need_dw else None, scale,
                           output[0] if relu else None))


@profiling.op_range("batch_norm_conv2d.backward")
def _batch_norm_conv2d_grads(ctx, dy: Tensor, unused_partials_grad):
    x, mean, _, bn_scale, bn_shift, _, weight, scale, y = ctx.saved_tensors
    need_dz = any(ctx.needs_input_grad[:3])
    need_dw, need_db = ctx.needs_input_grad[_WEIGHT], ctx.needs_input_grad[_BIAS]
    dz, dw, db = batch_norm_conv2d_backward(dy, x, weight, scale, y, mean, bn_scale, bn_shift,
                                            ctx.relu, ctx.weight_shape, *ctx.window, need_dz,
                                            need_dw, need_db)
    bn_grads = batch_norm_grads(ctx, dz) if need_dz else no_grads(3)
    return (*bn_grads, *no_grads(6), dw if need_dw else None, db if need_db else None,
            *no_grads(8))


batch_norm_conv2d.register_autograd(_batch_norm_conv2d_grads,
                                    setup_context=_batch_norm_conv2d_setup)


@torch.library.custom_op("fastarch::batch_norm_conv2d_backward", mutates_args=())
def batch_norm_conv2d_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor],
                               scale: Optional[Tensor], y: Optional[Tensor], mean: Tensor,
                               bn_scale: Tensor, bn_shift: Tensor, bn_relu: bool,
                               weight_shape: list[int], stride: list[int], padding: list[int],
                               dilation: list[int], padding_end: list[int], input_grad: bool,
                               weight_grad: bool, bias_grad: bool
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """(dz, dweight, dbias) of ``batch_norm_conv2d``'s conv, each a placeholder unless asked
    for: dz (the gradient of the normalised input, x's shape and memory format) needs
    ``weight``; dweight reads x through the forward's prologue (z recomputed, not stored)."""
    prologue = input_normalization(mean, bn_scale, bn_shift, bn_relu)
    grads = conv_grads(dy, x, weight, scale, y, list(x.shape), is_channels_last(x),
                       weight_shape, (stride, padding, dilation, padding_end), input_grad,
                       weight_grad, bias_grad, prologue)
    return tuple(or_absent(grad, dy) for grad in grads)


@batch_norm_conv2d_backward.register_fake
def _(dy, x, weight, scale, y, mean, bn_scale, bn_shift, bn_relu, weight_shape, stride,
      padding, dilation, padding_end, input_grad, weight_grad, bias_grad):
    return (fake_empty(x.shape, dy.dtype, dy, memory_format_of(x)) if input_grad
            else absent(dy),
            fake_empty(weight_shape, dy.dtype, dy, weight_grad_format(weight)) if weight_grad
            else absent(dy),
            fake_empty(weight_shape[:1], dy.dtype, dy) if bias_grad else absent(dy))


batch_norm_conv2d_backward.register_autograd(no_double_backward("conv2d"))


# ----------------------------------------------------------------------------- the flow

def forward(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], training: bool,
            momentum: float, eps: float, bn_relu: bool, bn_partials: Optional[WelfordPartials],
            weight: Tensor, bias: Optional[Tensor], geometry: ConvGeometry,
            scale: Optional[Tensor], shift: Optional[Tensor], relu: bool,
            stats: bool) -> tuple[Tensor, Optional[WelfordPartials]]:
    """BatchNorm (+ ReLU) then the fused conv of a 4-D x on our kernels: the BatchNorm's
    statistics (running ones updated in training), then the op; the conv's partials as
    ``WelfordPartials`` (None without ``stats``)."""
    bn_stats = statistics(x, running_mean, running_var, bn_weight, bn_bias, training, momentum,
                          eps, bn_partials)
    y, partials = batch_norm_conv2d(x, bn_weight, bn_bias, *bn_stats, training, bn_relu, weight,
                                    bias, scale, shift, *conv_window(geometry), relu, stats)
    return y, WelfordPartials(*partials.unbind(0)) if stats else None


def torch_forward(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], training: bool,
                  momentum: float, eps: float, bn_relu: bool, weight: Tensor,
                  bias: Optional[Tensor], stride: IntOrPair, padding: ConvPadding,
                  dilation: IntOrPair, scale: Optional[Tensor], shift: Optional[Tensor],
                  relu: bool, stats: bool) -> tuple[Tensor, Optional[WelfordPartials]]:
    """The same with torch's operators (the normalised tensor written): the fallback."""
    z = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if bn_relu:
        z = F.relu(z)
    return conv2d_fused_torch(z, weight, bias, stride, padding, dilation, scale, shift, relu,
                              stats)


def uses_kernels(x: Tensor) -> bool:
    """Our kernels, except for empty inputs and what ``backend`` sends to torch (counted)."""
    if x.numel() == 0:
        backend.count_fallback("batch_norm_conv2d")
        return False
    return backend.use_triton("batch_norm_conv2d", x)


def checked_args(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], training: bool,
                 eps: float, weight: Tensor, bias: Optional[Tensor],
                 scale: Optional[Tensor], shift: Optional[Tensor]
                 ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """torch's checks of F.batch_norm's and conv2d's arguments on a 4-D x, and (x, weight,
    bias) as torch.autocast casts a conv's (x is cast before it is normalised)."""
    if x.dim() != 4:
        raise ValueError(f"batch_norm_conv2d: expected a 4-D input, got {list(x.shape)}")
    arguments.check_batch_norm_args(x, running_mean, running_var, bn_weight, bn_bias, training,
                                    eps)
    x, weight, bias = arguments.autocast_args(x, weight, bias)
    arguments.check_conv_args(x, weight, bias)
    arguments.check_scale_shift(x, weight, scale, shift)
    return x, weight, bias

