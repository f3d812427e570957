"""BatchNorm (+ ReLU) fused into the linear layer that follows it through a flatten:
``fastarch::batch_norm_linear`` is ``fastarch::linear`` (its epilogue included) of
z = relu?(batch_norm(x)).flatten(1) for a 4-D x [N, C, H, W], the GEMM applying the
normalisation to its x tiles as it loads them (an input prologue,
``kernels.linear.InputNormalization``), so z is never written. Input feature
f = c * H * W + h * W + w of the linear is channel c of x, so the prologue's per-feature
scale and shift are the BatchNorm's per-channel ones, each repeated H * W times. The backward
never writes z either: dz is the linear's input gradient (reshaped to x's shape), the weight
gradient reads x through the same prologue, and dz goes back through the BatchNorm with
``ops.batch_norm``'s own formula (``batch_norm_grads``: x_hat and the ReLU mask recomputed
from x).

The op reads x.flatten(1) as a view: x dense NCHW (or any layout where H * W = 1). ``forward``
hands it a contiguous copy of a channels_last x with H * W > 1 (the raw, pre-BatchNorm tensor,
one copy of x's size; torch's autograd takes dx back to x's layout).

A module of its own, as ``ops.batch_norm_conv2d``: the op is one of BatchNorm's normalising
ops (statistics from ``ops.batch_norm.statistics``, autograd ending in ``batch_norm_grads``),
and its consumer is a linear layer on ``ops.linear``'s host side (``linear_forward`` and
``linear_grads`` with the prologue).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastarch import arguments, backend, profiling
from fastarch.kernels.linear import InputNormalization
from fastarch.kernels.welford import WelfordPartials
from fastarch.ops import linear as linear_ops
from fastarch.ops.batch_norm import batch_norm_grads, batch_norm_setup, statistics
from fastarch.ops.batch_norm_conv2d import input_normalization
from fastarch.ops.common import absent, fake_empty, no_double_backward, no_grads, or_absent
from fastarch.ops.dropout import new_seed


def feature_normalization(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                          relu: bool) -> InputNormalization:
    """The linear's prologue over x.flatten(1)'s C * H * W features: ``input_normalization``'s
    per-channel fp32 vectors, each repeated H * W times; forward and backward build it alike
    (bitwise)."""
    channels = input_normalization(mean, scale, shift, relu)
    pixels = x.shape[2] * x.shape[3]

    def per_feature(vector: Tensor) -> Tensor:  # repeat_interleave would sync with an int
        return vector[:, None].expand(-1, pixels).reshape(-1)
    return InputNormalization(per_feature(channels.scale), per_feature(channels.shift), relu)


def _features(x: Tensor) -> Tensor:
    """x.flatten(1) as a view (the op's x is flattenable: see the module docstring)."""
    return x.view(x.shape[0], -1)


# ----------------------------------------------------------------------------- operators

@torch.library.custom_op("fastarch::batch_norm_linear", mutates_args=())
def batch_norm_linear(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      mean: Tensor, invstd: Tensor, bn_scale: Tensor, bn_shift: Tensor,
                      training: bool, bn_relu: bool, weight: Tensor, bias: Optional[Tensor],
                      relu: bool, p: float, seed: Optional[Tensor]) -> Tensor:
    """``linear`` of z = relu?((x - mean) * bn_scale + bn_shift).flatten(1)
    (``batch_norm``'s output, ReLU'd if ``bn_relu``) for a 4-D x whose flatten(1) is a
    view, z never written. The arguments are ``batch_norm``'s (bn_weight, bn_bias only for
    their gradients), then ``linear``'s."""
    prologue = feature_normalization(x, mean, bn_scale, bn_shift, bn_relu)
    return linear_ops.linear_forward(_features(x), weight, bias, relu, p, seed, prologue)


@batch_norm_linear.register_fake
def _(x, bn_weight, bn_bias, mean, invstd, bn_scale, bn_shift, training, bn_relu, weight, bias,
      relu, p, seed):
    return fake_empty((x.shape[0], weight.shape[0]), x.dtype, x)


# The op's linear arguments follow batch_norm's nine (x .. bn_relu): weight, then bias.
_WEIGHT, _BIAS = 9, 10


def _batch_norm_linear_setup(ctx, inputs, output) -> None:
    weight, bias, relu, p, seed = inputs[_WEIGHT:]
    ctx.linear_relu, ctx.p = relu, p
    ctx.bias_dtype = None if bias is None else bias.dtype
    need_dz = any(ctx.needs_input_grad[:3])
    batch_norm_setup(ctx, inputs, output,
                     kept=(weight if need_dz else None, output if relu else None, seed))


@profiling.op_range("batch_norm_linear.backward")
def _batch_norm_linear_grads(ctx, dy: Tensor):
    x, mean, _, bn_scale, bn_shift, _, weight, y, seed = ctx.saved_tensors
    need_dz = any(ctx.needs_input_grad[:3])
    need_dw, need_db = ctx.needs_input_grad[_WEIGHT], ctx.needs_input_grad[_BIAS]
    dz, dw, db = batch_norm_linear_backward(dy, x, weight, y, seed, mean, bn_scale, bn_shift,
                                            ctx.relu, ctx.linear_relu, ctx.p,
                                            ctx.bias_dtype if need_db else None, need_dw)
    bn_grads = batch_norm_grads(ctx, dz) if need_dz else no_grads(3)
    return (*bn_grads, *no_grads(6), dw if need_dw else None, db if need_db else None,
            *no_grads(3))


batch_norm_linear.register_autograd(_batch_norm_linear_grads,
                                    setup_context=_batch_norm_linear_setup)


@torch.library.custom_op("fastarch::batch_norm_linear_backward", mutates_args=())
def batch_norm_linear_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor],
                               y: Optional[Tensor], seed: Optional[Tensor], mean: Tensor,
                               bn_scale: Tensor, bn_shift: Tensor, bn_relu: bool, relu: bool,
                               p: float, bias_dtype: Optional[torch.dtype], weight_grad: bool
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """(dz, dweight, dbias) of ``batch_norm_linear``'s linear for a 2-D dy, each a
    placeholder unless asked for: dz (the gradient of the normalised input, x's shape, dense
    NCHW) when ``weight`` is given; dweight (``weight_grad``) reads x through the forward's
    prologue (z recomputed, not stored); dbias when ``bias_dtype`` is. ``y`` is the forward's
    output when ``relu``, ``seed`` its dropout seed when ``p`` > 0."""
    prologue = feature_normalization(x, mean, bn_scale, bn_shift, bn_relu)
    dz, dw, db = linear_ops.linear_grads(dy, _features(x) if weight_grad else None, weight, y,
                                         seed, relu, p, bias_dtype, prologue)
    return (or_absent(None if dz is None else dz.view(x.shape), dy), or_absent(dw, dy),
            or_absent(db, dy))


@batch_norm_linear_backward.register_fake
def _(dy, x, weight, y, seed, mean, bn_scale, bn_shift, bn_relu, relu, p, bias_dtype,
      weight_grad):
    return (absent(dy) if weight is None else fake_empty(x.shape, dy.dtype, dy),
            fake_empty((dy.shape[1], x[0].numel()), x.dtype, dy) if weight_grad
            else absent(dy),
            absent(dy) if bias_dtype is None else fake_empty((dy.shape[1],), bias_dtype, dy))


batch_norm_linear_backward.register_autograd(no_double_backward("linear"))


# ----------------------------------------------------------------------------- the flow

def forward(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], training: bool,
            momentum: float, eps: float, bn_relu: bool, bn_partials: Optional[WelfordPartials],
            weight: Tensor, bias: Optional[Tensor], relu: bool, p: float) -> Tensor:
    """BatchNorm (+ ReLU), flatten(1), then the fused linear of a 4-D x on our kernels: the
    BatchNorm's statistics (running ones updated in training), then the op on x, copied to
    dense NCHW first where flatten(1) would not be a view of it (channels_last with
    H * W > 1: the raw tensor is copied, never the normalised one); dropout when p > 0, with
    a new seed."""
    bn_stats = statistics(x, running_mean, running_var, bn_weight, bn_bias, training, momentum,
                          eps, bn_partials)
    seed = new_seed(x.device) if p > 0 else None
    return batch_norm_linear(x.contiguous(), bn_weight, bn_bias, *bn_stats, training, bn_relu,
                             weight, bias, relu, p, seed)


def torch_forward(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], training: bool,
                  momentum: float, eps: float, bn_relu: bool, weight: Tensor,
                  bias: Optional[Tensor], relu: bool, p: float) -> Tensor:
    """The same with torch's operators (the normalised tensor written): the fallback."""
    z = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if bn_relu:
        z = F.relu(z)
    return linear_ops.torch_apply(z.flatten(1), weight, bias, relu, p)


def uses_kernels(x: Tensor) -> bool:
    """Our kernels, except for empty inputs and what ``backend`` sends to torch (counted)."""
    if x.numel() == 0:
        backend.count_fallback("batch_norm_linear")
        return False
    return backend.use_triton("batch_norm_linear", x)


def checked_args(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], training: bool,
                 eps: float, weight: Tensor, bias: Optional[Tensor]
                 ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """torch's checks of F.batch_norm's and linear's arguments on a 4-D x (a 2-D weight, a
    bias of one value per output feature), and (x, weight, bias) as torch.autocast casts a
    linear's (x is cast before it is normalised)."""
    if x.dim() != 4:
        raise ValueError(f"batch_norm_linear: expected a 4-D input, got {list(x.shape)}")
    if weight.dim() != 2 or (bias is not None and tuple(bias.shape) != weight.shape[:1]):
        raise ValueError(f"batch_norm_linear: expected a 2-D weight and a bias of its "
                         f"{weight.shape[0]} rows, got {list(weight.shape)} and "
                         f"{None if bias is None else list(bias.shape)}")
    arguments.check_batch_norm_args(x, running_mean, running_var, bn_weight, bn_bias, training,
                                    eps)
    x, weight, bias = arguments.autocast_args(x, weight, bias)
    arguments.check_weight_and_bias("linear", x, weight, bias)
    features = x[0].numel()
    if weight.shape[1] != features:
        raise RuntimeError(f"linear: input of size {[x.shape[0], features]} has {features} "
                           f"features but weight of size {list(weight.shape)} expects "
                           f"in_features={weight.shape[1]}")
    return x, weight, bias
