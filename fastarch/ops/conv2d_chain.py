"""A chain of convolutions with training BatchNorms between them, conv -> BN -> ReLU -> conv
-> ..., where no BatchNorm is a pass of its own, forward or backward: ``fastarch::conv2d_chain``
is one link, a conv that reads its input through the BatchNorm (+ ReLU) before it and hands
the BatchNorm after it its batch statistics.

Forward. A link reads x through an input prologue (``kernels.conv2d.InputNormalization``:
relu?((x - mean) * invstd * weight + bias) as its tiles load, the normalised tensor never
written); its epilogue writes y and y's Welford partials, and with ``link`` one finalize
turns them into y's batch statistics (mean, invstd), returned as differentiable outputs for
the next link's prologue (or a max pool's), and into the updated running statistics,
returned as new tensors (an op that wrote them in place could have no autograd formula):
the caller copies them into the BatchNorm's buffers.

Backward. Because the statistics are outputs, autograd splits BatchNorm's input gradient
into its two terms and hands each to the op that can apply it without a pass:
- the next link returns, for y, the gradient at fixed statistics, du * weight * invstd (du:
  the ReLU-masked gradient of the normalised input), written by its dgrad's epilogue in
  place of dz (``kernels.nhwc.BatchNormGradEpilogue``), with the sums of du and du * (y -
  mean) from which the statistics' gradients follow (a few [C] torch ops);
- this link receives those as the gradients of its (mean, invstd) outputs and adds their
  term, ``g_mean / N + g_invstd * d invstd / dy``, linear in y, to dy as its dgrad and wgrad
  load it (``kernels.nhwc.GradientPrologue``).
So dy, y and x are each read where a GEMM reads them anyway, and nothing but the GEMMs'
outputs is written. Every op's gradient is exact for its own inputs, whoever consumes its
outputs: hooks, a second consumer of y or of the statistics, torch.compile all see torch's
semantics.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastarch import arguments, backend, profiling
from fastarch.arguments import ConvPadding, IntOrPair
from fastarch.kernels import batch_norm as batch_norm_kernels
from fastarch.kernels.batch_norm import BatchNormStatistics
from fastarch.kernels.conv2d import InputNormalization
from fastarch.kernels.nhwc import GradientPrologue
from fastarch.kernels.runtime import empty, memory_format_of
from fastarch.kernels.welford import WelfordPartials
from fastarch.ops import relu as relu_ops
from fastarch.ops.batch_norm import folded_statistics_grads, merge_tile
from fastarch.ops.common import (absent, conv_geometry, conv_window, fake_empty,
                                 no_double_backward, no_grads, or_absent, weight_grad_format)
from fastarch.ops.conv2d import (BackwardFold, conv2d_forward, conv2d_input_grad,
                                 conv2d_weight_grad, fake_conv2d_outputs)


def input_normalization(mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                        bias: Optional[Tensor], relu: bool) -> InputNormalization:
    """The prologue of a BatchNorm (+ ReLU) with batch statistics (mean, invstd): x * scale
    + (bias - mean * scale), scale = invstd * weight, fp32 [C]; forward and backward build
    it alike (bitwise)."""
    scale = invstd if weight is None else invstd * weight.float()
    shift = torch.zeros_like(mean) if bias is None else bias.float()
    return InputNormalization(scale, torch.addcmul(shift, mean, scale, value=-1), relu)


def batch_statistics(partials: Tensor, running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], momentum: float, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd) fp32 [C] of the Welford ``partials`` [3, tiles, C] (biased variance,
    as BatchNorm normalises with), merged in tile order by BatchNorm's finalize, and the
    running statistics it updates with ``momentum`` (copies; placeholders without them)."""
    channels = partials.shape[2]
    stats = BatchNormStatistics(*(empty((channels,), torch.float32, partials.device)
                                  for _ in BatchNormStatistics._fields))
    running = [None if t is None else t.clone() for t in (running_mean, running_var)]
    batch_norm_kernels.finalize_launch(tuple(partials.unbind(0)), None, None, *running,
                                       stats, momentum, eps, merge_tile(channels))()
    return stats.mean, stats.invstd, *(or_absent(t, partials) for t in running)


def statistics_term(y: Tensor, mean: Tensor, invstd: Tensor, mean_grad: Optional[Tensor],
                    invstd_grad: Optional[Tensor]) -> GradientPrologue:
    """The gradient y receives through its batch statistics, g_mean * d mean / dy +
    g_invstd * d invstd / dy = B * y + C per channel (d mean / dy = 1 / N, d invstd / dy =
    -invstd^3 (y - mean) / N over the N pixels), as dy's prologue."""
    count = y.numel() // y.shape[1]
    slope = torch.zeros_like(mean) if invstd_grad is None else \
        -invstd_grad * invstd.pow(3) / count
    offset = torch.zeros_like(mean) if mean_grad is None else mean_grad / count
    return GradientPrologue(y, slope, torch.addcmul(offset, slope, mean, value=-1))


# ----------------------------------------------------------------------------- operators

@torch.library.custom_op("fastarch::conv2d_chain", mutates_args=())
def conv2d_chain(x: Tensor, in_mean: Optional[Tensor], in_invstd: Optional[Tensor],
                 bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], bn_relu: bool,
                 weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                 shift: Optional[Tensor], stride: list[int], padding: list[int],
                 dilation: list[int], padding_end: list[int], relu: bool, stats: bool,
                 link: bool, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 momentum: float, eps: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One link: y = relu?((conv2d(z) + bias) * scale + shift) of a 4-D x, z =
    relu?((x - in_mean) * in_invstd * bn_weight + bn_bias) (never written; z = x without
    ``in_mean``; ``bn_relu`` the first ReLU, ``relu`` the second); with ``stats`` the
    Welford partials of conv + bias ([3, tiles, K_out] fp32, not differentiable), with
    ``link`` (needs ``stats``, and y = conv + bias: no scale, no ReLU) also y's batch
    statistics (mean, invstd with ``eps``), differentiable, and the running statistics
    updated with ``momentum`` (new tensors; placeholders where not given)."""
    if link and (not stats or relu or scale is not None):
        raise ValueError("conv2d_chain: link hands on the statistics of conv + bias: it "
                         "needs stats, and no scale or relu")
    geometry = conv_geometry(weight.shape, stride, padding, dilation, padding_end)
    prologue = None if in_mean is None else \
        input_normalization(in_mean, in_invstd, bn_weight, bn_bias, bn_relu)
    y, partials = conv2d_forward(x, weight, bias, geometry, scale, shift, relu, stats,
                                 prologue=prologue)
    if not link:
        return y, or_absent(partials, x), *(absent(x) for _ in range(4))
    return y, partials, *batch_statistics(partials, running_mean, running_var, momentum, eps)


@conv2d_chain.register_fake
def _(x, in_mean, in_invstd, bn_weight, bn_bias, bn_relu, weight, bias, scale, shift, stride,
      padding, dilation, padding_end, relu, stats, link, running_mean, running_var, momentum,
      eps):
    y, partials = fake_conv2d_outputs(x, weight, [stride, padding, dilation, padding_end],
                                      stats)
    if not link:
        return y, partials, *(absent(x) for _ in range(4))
    return (y, partials, *(fake_empty((weight.shape[0],), torch.float32, x) for _ in range(2)),
            *(absent(x) if t is None else fake_empty(t.shape, t.dtype, t)
              for t in (running_mean, running_var)))


# conv2d_chain's arguments: the BatchNorm before the conv (x .. bn_relu), then the conv's.
_BATCH_NORM_INPUTS, _WEIGHT, _BIAS, _ARGUMENTS = 5, 6, 7, 21


def _conv2d_chain_setup(ctx, inputs, output) -> None:
    (x, in_mean, in_invstd, bn_weight, bn_bias, bn_relu, weight, _, scale, _, *window, relu,
     _, link, _, _, _, _) = inputs
    ctx.window, ctx.weight_shape, ctx.bn_relu, ctx.link = window, list(weight.shape), \
        bn_relu, link
    ctx.mark_non_differentiable(output[1], *output[4:])
    ctx.set_materialize_grads(False)  # no zero gradient written for what was not used
    y, _, mean, invstd, _, _ = output
    ctx.save_for_backward(x, in_mean, in_invstd, bn_weight, bn_bias, weight, scale,
                          y if link or relu else None, *((mean, invstd) if link else (None, None)))
    ctx.relu = relu


@profiling.op_range("conv2d_chain.backward")
def _conv2d_chain_grads(ctx, dy: Optional[Tensor], unused_partials_grad,
                        mean_grad: Optional[Tensor], invstd_grad: Optional[Tensor],
                        *unused_running_grads):
    (x, in_mean, in_invstd, bn_weight, bn_bias, weight, scale, y, mean,
     invstd) = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_input = any(needs[:_BATCH_NORM_INPUTS])
    need_dw, need_db = needs[_WEIGHT], needs[_BIAS]
    statistics_grad = ctx.link and (mean_grad is not None or invstd_grad is not None)
    if dy is None and not statistics_grad:
        return no_grads(_ARGUMENTS)
    if dy is None:  # only the statistics were used
        dy = torch.zeros_like(y)
    outputs = conv2d_chain_backward(
        dy, x, in_mean, in_invstd, bn_weight, bn_bias, ctx.bn_relu, weight, scale, y,
        ctx.relu, mean, invstd, mean_grad if statistics_grad else None,
        invstd_grad if statistics_grad else None, ctx.weight_shape, *ctx.window, need_input,
        need_dw, need_db)
    dx, sums, dw, db = outputs
    input_grads = (dx if needs[0] else None, *no_grads(4))
    if in_mean is not None and need_input:
        input_grads = (dx if needs[0] else None,
                       *folded_statistics_grads(sums, in_invstd, bn_weight, bn_bias,
                                                needs[1:5]))
    return (*input_grads, None, dw if need_dw else None, db if need_db else None,
            *no_grads(_ARGUMENTS - _BIAS - 1))


conv2d_chain.register_autograd(_conv2d_chain_grads, setup_context=_conv2d_chain_setup)


@torch.library.custom_op("fastarch::conv2d_chain_backward", mutates_args=())
def conv2d_chain_backward(dy: Tensor, x: Tensor, in_mean: Optional[Tensor],
                          in_invstd: Optional[Tensor], bn_weight: Optional[Tensor],
                          bn_bias: Optional[Tensor], bn_relu: bool, weight: Tensor,
                          scale: Optional[Tensor], y: Optional[Tensor], relu: bool,
                          mean: Optional[Tensor], invstd: Optional[Tensor],
                          mean_grad: Optional[Tensor], invstd_grad: Optional[Tensor],
                          weight_shape: list[int], stride: list[int], padding: list[int],
                          dilation: list[int], padding_end: list[int], input_grad: bool,
                          weight_grad: bool, bias_grad: bool
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, sums, dweight, dbias) of ``conv2d_chain``, each a placeholder unless asked for.
    dy goes back through the epilogue's ReLU (y the output) and ``scale`` (as ``conv2d``'s),
    or is read with the statistics term of y's mean and invstd gradients (when given);
    with an input BatchNorm, dx is the gradient of x at fixed statistics and sums [2, C]
    fp32 the sums of du and du * (x - in_mean) (``BatchNormGradEpilogue``)."""
    if relu:
        dy = relu_ops.relu_backward(y, dy)  # one pass, NaN passes as in threshold_backward
    if scale is not None:
        dy = (dy.float() * scale.view(1, -1, 1, 1)).to(dy.dtype)
    geometry = conv_geometry(weight_shape, stride, padding, dilation, padding_end)
    grad_prologue = None if mean_grad is None and invstd_grad is None else \
        statistics_term(y, mean, invstd, mean_grad, invstd_grad)
    prologue = None if in_mean is None else \
        input_normalization(in_mean, in_invstd, bn_weight, bn_bias, bn_relu)
    operand = backend.conv_operand(dy.dtype)
    dx = sums = dw = db = None
    if input_grad:
        fold = BackwardFold(grad_prologue,
                            None if prologue is None else (x, in_mean, prologue))
        dx, sums = conv2d_input_grad(dy, weight, x.shape, memory_format_of(x), geometry,
                                     operand, fold)
    if weight_grad:
        dw, db = conv2d_weight_grad(x, dy, torch.Size(weight_shape), geometry, bias_grad,
                                    operand, prologue, grad_prologue,
                                    weight_grad_format(weight))
    elif bias_grad:
        db = _bias_grad(dy, grad_prologue)
    return tuple(or_absent(grad, dy) for grad in (dx, sums, dw, db))


def _bias_grad(dy: Tensor, grad_prologue: Optional[GradientPrologue]) -> Tensor:
    """db = the sum of dy read through ``grad_prologue`` over (N, H, W), in fp32 by its
    linearity: sum(dy) + slope * sum(y) + offset * pixels, in dy's dtype."""
    total = dy.sum((0, 2, 3), dtype=torch.float32)
    if grad_prologue is not None:
        y, slope, offset = grad_prologue
        total = total + slope * y.sum((0, 2, 3), dtype=torch.float32) + \
            offset * (y.numel() // y.shape[1])
    return total.to(dy.dtype)


@conv2d_chain_backward.register_fake
def _(dy, x, in_mean, in_invstd, bn_weight, bn_bias, bn_relu, weight, scale, y, relu, mean,
      invstd, mean_grad, invstd_grad, weight_shape, stride, padding, dilation, padding_end,
      input_grad, weight_grad, bias_grad):
    folds = input_grad and in_mean is not None
    return (fake_empty(x.shape, dy.dtype, dy, memory_format_of(x)) if input_grad
            else absent(dy),
            fake_empty((2, x.shape[1]), torch.float32, dy) if folds else absent(dy),
            fake_empty(weight_shape, dy.dtype, dy, weight_grad_format(weight)) if weight_grad
            else absent(dy),
            fake_empty(weight_shape[:1], dy.dtype, dy) if bias_grad else absent(dy))


conv2d_chain_backward.register_autograd(no_double_backward("conv2d_chain"))


# ----------------------------------------------------------------------------- the flow

class ChainInput(NamedTuple):
    """The BatchNorm (+ ReLU) a link reads its input through: the previous link's batch
    statistics (mean, invstd: differentiable outputs of ``conv2d_chain``) and the
    BatchNorm's affine ``weight`` and ``bias``."""
    mean: Tensor
    invstd: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    relu: bool


class ChainOutput(NamedTuple):
    """What a link needs of the BatchNorm after it (training, batch statistics) to hand it
    its statistics: its running statistics (None when not tracked), their update factor and
    its eps; and its affine ``weight`` and ``bias``, checked as F.batch_norm checks them."""
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    momentum: float
    eps: float
    weight: Optional[Tensor]
    bias: Optional[Tensor]


def forward(x: Tensor, input_batch_norm: Optional[ChainInput], weight: Tensor,
            bias: Optional[Tensor], stride: IntOrPair, padding: ConvPadding,
            dilation: IntOrPair, scale: Optional[Tensor] = None,
            shift: Optional[Tensor] = None, relu: bool = False, stats: bool = False,
            output_batch_norm: Optional[ChainOutput] = None
            ) -> tuple[Tensor, Optional[WelfordPartials], Optional[tuple[Tensor, Tensor]]]:
    """One link on our kernels for a 4-D x (checked arguments; under torch.autocast x,
    weight and bias cast as a conv's): y, its partials with ``stats``, and with
    ``output_batch_norm`` (a link: needs ``stats``) its differentiable batch statistics
    (mean, invstd) for the next link, that BatchNorm's running statistics updated."""
    x, weight, bias = arguments.autocast_args(x, weight, bias)
    arguments.check_conv_args(x, weight, bias)
    arguments.check_scale_shift(x, weight, scale, shift)
    geometry = arguments.conv_geometry(x, weight, stride, padding, dilation)
    bn, out = input_batch_norm, output_batch_norm
    if out is not None:  # F.batch_norm's checks of y, before the link writes anything
        y_like = x.new_empty(()).expand(x.shape[0], weight.shape[0],
                                        *geometry.output_size(*x.shape[2:]))
        arguments.check_batch_norm_args(y_like, out.running_mean, out.running_var, out.weight,
                                        out.bias, True, out.eps)
    y, partials, mean, invstd, running_mean, running_var = conv2d_chain(
        x, *((None,) * 4 if bn is None else (bn.mean, bn.invstd, bn.weight, bn.bias)),
        bn is not None and bn.relu, weight, bias, scale, shift, *conv_window(geometry),
        bool(relu), bool(stats), out is not None,
        *((None, None, 0.0, 1e-5) if out is None else
          (out.running_mean, out.running_var, float(out.momentum), float(out.eps))))
    if out is not None and out.running_mean is not None:
        with torch.no_grad():
            out.running_mean.copy_(running_mean)
            out.running_var.copy_(running_var)
    return (y, WelfordPartials(*partials.unbind(0)) if stats else None,
            None if out is None else (mean, invstd))


def runs_kernels(x: Tensor) -> bool:
    """Whether a chain can run on our kernels for input ``x`` (``backend.accelerates``, and
    pixels to take statistics of): elsewhere a fusion runs no chain."""
    return x.numel() > 0 and backend.accelerates(x)
