"""The functional API.

Each op takes torch.nn.functional's exact arguments, validates them with torch's error types
and messages, and runs our Triton kernel when ``fastarch.backend`` says the input's device
runs Triton (CUDA, or CPU under TRITON_INTERPRET=1). Otherwise, and for dtypes we do not
accelerate (float64, integers), it calls torch's own implementation, which answers or raises
as torch does: the documented fallback.
The kernels run as the operators of ``fastarch.ops`` (``torch.ops.fastarch.*``), which carry
their autograd formulas, so ``torch.compile`` traces these functions without graph breaks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastarch import arguments, backend
from fastarch.arguments import ConvPadding, IntOrPair
from fastarch.kernels.welford import WelfordPartials
from fastarch.ops import avg_pool as avg_pool_ops
from fastarch.ops import batch_norm as batch_norm_ops
from fastarch.ops import batch_norm_conv2d as batch_norm_conv2d_ops
from fastarch.ops import batch_norm_linear as batch_norm_linear_ops
from fastarch.ops import conv2d as conv2d_ops
from fastarch.ops import dropout as dropout_ops
from fastarch.ops import linear as linear_ops
from fastarch.ops import max_pool as max_pool_ops
from fastarch.ops import relu as relu_ops
from fastarch.ops import sync_batch_norm as sync_batch_norm_ops
from fastarch.ops.common import pool_window

# ----------------------------------------------------------------------------- max pool

def max_pool2d(input: torch.Tensor, kernel_size: IntOrPair, stride: Optional[IntOrPair] = None,
               padding: IntOrPair = 0, dilation: IntOrPair = 1, ceil_mode: bool = False,
               return_indices: bool = False):
    """torch.nn.functional.max_pool2d on our kernels; int64 indices only when asked for."""
    arguments.check_pool_input(input, "max_pool2d")
    geometry = arguments.pool_geometry("max_pool2d", input, kernel_size, stride, padding,
                                       dilation, ceil_mode)
    if not backend.use_triton("max_pool2d", input):
        return F.max_pool2d(input, kernel_size, stride, padding, dilation,
                            ceil_mode=ceil_mode, return_indices=return_indices)
    y, _, indices = max_pool_ops.max_pool2d(arguments.batched(input), *pool_window(geometry),
                                            keep_offsets=arguments.records_grad(input),
                                            return_indices=bool(return_indices))
    if return_indices:
        return arguments.unbatched_like(input, y), arguments.unbatched_like(input, indices)
    return arguments.unbatched_like(input, y)


# ----------------------------------------------------------------------------- avg pool

def avg_pool2d(input: torch.Tensor, kernel_size: IntOrPair, stride: Optional[IntOrPair] = None,
               padding: IntOrPair = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: Optional[int] = None) -> torch.Tensor:
    """torch.nn.functional.avg_pool2d on our kernels (fp32 sums)."""
    arguments.check_pool_input(input, "avg_pool2d")
    geometry = arguments.pool_geometry("avg_pool2d", input, kernel_size, stride, padding, 1,
                                       ceil_mode)
    arguments.check_divisor_override(divisor_override)
    if not backend.use_triton("avg_pool2d", input):
        return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                            divisor_override)
    y = avg_pool_ops.avg_pool2d(arguments.batched(input), *avg_pool_ops.avg_window(geometry),
                                bool(count_include_pad), divisor_override)
    return arguments.unbatched_like(input, y)


# ----------------------------------------------------------------------------- adaptive avg pool


def adaptive_avg_pool2d(input: torch.Tensor,
                        output_size: Union[int, None, Sequence[Optional[int]]]) -> torch.Tensor:
    """torch.nn.functional.adaptive_avg_pool2d on our kernels.

    When the input already has the output size (AlexNet's 6x6, VGG's 7x7 at 224x224) the
    pool is the identity and ``input`` itself is returned, as ``nn.Identity`` would.
    """
    size = arguments.adaptive_output_size(input, output_size)
    if not backend.use_triton("adaptive_avg_pool2d", input):
        return F.adaptive_avg_pool2d(input, size)
    if tuple(input.shape[-2:]) == size:
        return input
    if 0 in size:
        return input.new_empty((*input.shape[:-2], *size))
    y = avg_pool_ops.adaptive_avg_pool2d(arguments.batched(input), list(size))
    return arguments.unbatched_like(input, y)


# ----------------------------------------------------------------------------- batch norm


def _use_batch_norm_kernels(op: str, input: torch.Tensor) -> bool:
    """Our kernels, except for empty inputs and what ``backend`` sends to torch (counted)."""
    if input.numel() == 0:
        backend.count_fallback(op)
        return False
    return backend.use_triton(op, input)


def _batch_norm(op: str, input: torch.Tensor, running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], training: bool, momentum: float, eps: float,
                relu: bool, pool: Optional[batch_norm_ops.FusedPool] = None,
                partials: Optional[WelfordPartials] = None) -> torch.Tensor:
    """BatchNorm (+ ReLU, + ``pool``: its caller checks the arguments) of an (N, C, ...)
    input on our kernels, or torch's."""
    if pool is None and input.numel() != 0:  # torch answers an empty input before checking
        arguments.check_batch_norm_args(input, running_mean, running_var, weight, bias,
                                        training, eps)
    if not _use_batch_norm_kernels(op, input):
        return batch_norm_ops.torch_forward(input, running_mean, running_var, weight, bias,
                                            training, momentum, eps, relu, pool)
    y = batch_norm_ops.forward(arguments.as_4d(input), running_mean, running_var, weight, bias,
                               bool(training), float(momentum), float(eps), relu, pool,
                               partials)
    return y if input.dim() == 4 else y.view(input.shape)


def batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor],
               running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *,
               partials: Optional[WelfordPartials] = None) -> torch.Tensor:
    """torch.nn.functional.batch_norm on our kernels for (N, C, ...) inputs; statistics in
    fp32 whatever the input dtype. ``momentum`` is the exponential-average factor of the
    running statistics (1/num_batches_tracked gives the cumulative average). Empty inputs
    and float64 run torch's implementation. ``partials`` as in ``batch_norm_relu``."""
    return _batch_norm("batch_norm", input, running_mean, running_var, weight, bias, training,
                       momentum, eps, relu=False, partials=partials)


def batch_norm_add_relu(input: torch.Tensor, residual: torch.Tensor,
                        running_mean: Optional[torch.Tensor],
                        running_var: Optional[torch.Tensor],
                        weight: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None, training: bool = False,
                        momentum: float = 0.1, eps: float = 1e-5, *,
                        partials: Optional[WelfordPartials] = None) -> torch.Tensor:
    """relu(batch_norm(input, ...) + residual) for a 4-D input in one normalising pass: a
    ResNet block's end (torchvision's ``out = bn(out); out += identity; relu(out)``, so the
    result has input's dtype: residual is cast to it). residual has input's shape, any
    strides. ``partials`` as in ``batch_norm_relu``."""
    if input.dim() != 4 or residual.shape != input.shape:
        raise ValueError(f"batch_norm_add_relu: expected a 4-D input and a residual of its "
                         f"shape, got {list(input.shape)} and {list(residual.shape)}")
    arguments.check_batch_norm_args(input, running_mean, running_var, weight, bias, training,
                                    eps)
    residual = residual.to(input.dtype)
    if not _use_batch_norm_kernels("batch_norm_add_relu", input):
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                         eps)
        return F.relu(y + residual)
    return batch_norm_ops.forward_add_relu(input, residual, running_mean, running_var, weight,
                                           bias, bool(training), float(momentum), float(eps),
                                           partials)


def batch_norm_relu(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                    running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5, *,
                    partials: Optional[WelfordPartials] = None) -> torch.Tensor:
    """relu(batch_norm(...)): the ReLU runs inside the normalising pass, and its backward
    mask is recomputed from the input, so the BatchNorm output is never saved.
    ``partials``: the input's Welford partials from the conv epilogue (``conv2d_fused(...,
    stats=True)``), used in training instead of a statistics pass over the input."""
    return _batch_norm("batch_norm_relu", input, running_mean, running_var, weight, bias,
                       training, momentum, eps, relu=True, partials=partials)


def batch_norm_max_pool2d(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                          running_var: Optional[torch.Tensor],
                          weight: Optional[torch.Tensor] = None,
                          bias: Optional[torch.Tensor] = None, training: bool = False,
                          momentum: float = 0.1, eps: float = 1e-5, *, relu: bool = True,
                          kernel_size: IntOrPair, stride: Optional[IntOrPair] = None,
                          padding: IntOrPair = 0, dilation: IntOrPair = 1,
                          ceil_mode: bool = False,
                          partials: Optional[WelfordPartials] = None) -> torch.Tensor:
    """max_pool2d(relu(batch_norm(input, ...))) (ReLU only if ``relu``) for a 4-D input,
    without writing the normalised tensor; the arguments are F.batch_norm's then
    F.max_pool2d's (no return_indices). ``partials`` as in ``batch_norm_relu``."""
    arguments.check_batch_norm_pool_args("batch_norm_max_pool2d", "max_pool2d", input,
                                        running_mean, running_var, weight, bias, training,
                                        eps)
    geometry = arguments.pool_geometry("max_pool2d", input, kernel_size, stride, padding,
                                       dilation, ceil_mode)
    return _batch_norm("batch_norm_max_pool2d", input, running_mean, running_var, weight, bias,
                       training, momentum, eps, relu,
                       batch_norm_ops.FusedPool(geometry, is_max=True), partials)


def batch_norm_avg_pool2d(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                          running_var: Optional[torch.Tensor],
                          weight: Optional[torch.Tensor] = None,
                          bias: Optional[torch.Tensor] = None, training: bool = False,
                          momentum: float = 0.1, eps: float = 1e-5, *, relu: bool = True,
                          kernel_size: IntOrPair, stride: Optional[IntOrPair] = None,
                          padding: IntOrPair = 0, ceil_mode: bool = False,
                          count_include_pad: bool = True,
                          divisor_override: Optional[int] = None,
                          partials: Optional[WelfordPartials] = None) -> torch.Tensor:
    """avg_pool2d(relu(batch_norm(input, ...))) (ReLU only if ``relu``) for a 4-D input,
    without writing the normalised tensor; the arguments are F.batch_norm's then
    F.avg_pool2d's. ``partials`` as in ``batch_norm_relu``."""
    arguments.check_batch_norm_pool_args("batch_norm_avg_pool2d", "avg_pool2d", input,
                                        running_mean, running_var, weight, bias, training,
                                        eps)
    geometry = arguments.pool_geometry("avg_pool2d", input, kernel_size, stride, padding, 1,
                                       ceil_mode)
    arguments.check_divisor_override(divisor_override)
    pool = batch_norm_ops.FusedPool(geometry, is_max=False,
                                    count_include_pad=bool(count_include_pad),
                                    divisor_override=divisor_override)
    return _batch_norm("batch_norm_avg_pool2d", input, running_mean, running_var, weight, bias,
                       training, momentum, eps, relu, pool, partials)


# ----------------------------------------------------------------------------- relu

def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.relu on our kernel. Inputs neither contiguous nor channels_last
    run on a contiguous copy (and, in place, are written back from it)."""
    if not backend.use_triton("relu", input):
        return torch.relu_(input) if inplace else torch.relu(input)
    if inplace:
        arguments.check_inplace(input)
    return relu_ops.apply(input, bool(inplace))


# ----------------------------------------------------------------------------- conv2d


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: IntOrPair = 1, padding: ConvPadding = 0, dilation: IntOrPair = 1,
           groups: int = 1) -> torch.Tensor:
    """torch.nn.functional.conv2d on our implicit-GEMM kernels; the output takes the input's
    memory format. groups > 1 runs torch's convolution (a counted fallback), as do float64 and
    integer inputs.
    Under torch.autocast the arguments are cast as torch would cast them."""
    input, weight, bias = arguments.autocast_args(input, weight, bias)
    if groups != 1:
        backend.count_fallback("conv2d")
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    arguments.check_conv_args(input, weight, bias)
    geometry = arguments.conv_geometry(input, weight, stride, padding, dilation)
    if not backend.use_triton("conv2d", input):
        return F.conv2d(input, weight, bias, stride, padding, dilation)
    y, _ = conv2d_ops.conv2d_fused(arguments.batched(input), weight, bias, geometry)
    return arguments.unbatched_like(input, y)


def conv2d_fused(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 stride: IntOrPair = 1, padding: ConvPadding = 0, dilation: IntOrPair = 1, *,
                 scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                 relu: bool = False, stats: bool = False,
                 residual: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, Optional[WelfordPartials]]:
    """conv2d (groups=1) with the epilogue fused into the kernel:
    y = relu?((conv(input, weight) + bias) * scale + shift + residual), and with ``stats``
    the BatchNorm statistics of conv + bias (before scale/shift/residual/ReLU) as per-tile
    Welford partials [tiles, out_channels] (fp32; float64 input, which runs torch, gives one
    float64 tile); ``kernels.welford.merge_welford_partials`` turns them into mean and var.

    ``scale`` and ``shift`` are per-output-channel float32 constants (an eval-mode BatchNorm
    folded in): they must not require grad. ``residual`` (y's shape, the input's dtype after
    autocast, any strides) is added in fp32 before the ReLU: a residual block's identity.
    Input, weight, bias and residual get gradients."""
    input, weight, bias = arguments.autocast_args(input, weight, bias)
    arguments.check_conv_args(input, weight, bias)
    arguments.check_scale_shift(input, weight, scale, shift)
    geometry = arguments.conv_geometry(input, weight, stride, padding, dilation)
    conv2d_ops.check_residual(input, weight, geometry, residual)
    if not backend.use_triton("conv2d_fused", input):
        return conv2d_ops.conv2d_fused_torch(input, weight, bias, stride, padding, dilation,
                                             scale, shift, relu, stats, residual)
    y, partials = conv2d_ops.conv2d_fused(
        arguments.batched(input), weight, bias, geometry, scale, shift, relu, stats,
        None if residual is None else arguments.batched(residual))
    return arguments.unbatched_like(input, y), partials


def batch_norm_conv2d_fused(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                            running_var: Optional[torch.Tensor],
                            bn_weight: Optional[torch.Tensor] = None,
                            bn_bias: Optional[torch.Tensor] = None, training: bool = False,
                            momentum: float = 0.1, eps: float = 1e-5, *, bn_relu: bool = True,
                            weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            stride: IntOrPair = 1, padding: ConvPadding = 0,
                            dilation: IntOrPair = 1, scale: Optional[torch.Tensor] = None,
                            shift: Optional[torch.Tensor] = None, relu: bool = False,
                            stats: bool = False, partials: Optional[WelfordPartials] = None
                            ) -> tuple[torch.Tensor, Optional[WelfordPartials]]:
    """``conv2d_fused(relu?(batch_norm(input, ...)), weight, bias, ...)`` (ReLU only if
    ``bn_relu``) for a 4-D input without writing the normalised tensor: the conv applies the
    BatchNorm to its input tiles as it loads them, and its backward recomputes them. The
    arguments are F.batch_norm's, then ``conv2d_fused``'s; ``partials`` (the input's, from
    the conv that wrote it) as in ``batch_norm_relu``. Under torch.autocast the input is cast
    with the conv's arguments, before it is normalised."""
    input, weight, bias = batch_norm_conv2d_ops.checked_args(
        input, running_mean, running_var, bn_weight, bn_bias, training, eps, weight, bias,
        scale, shift)
    geometry = arguments.conv_geometry(input, weight, stride, padding, dilation)
    normalisation = (running_mean, running_var, bn_weight, bn_bias, bool(training),
                     float(momentum), float(eps), bool(bn_relu))
    if not batch_norm_conv2d_ops.uses_kernels(input):
        return batch_norm_conv2d_ops.torch_forward(input, *normalisation, weight, bias, stride,
                                                   padding, dilation, scale, shift, relu,
                                                   stats)
    return batch_norm_conv2d_ops.forward(input, *normalisation, partials, weight, bias,
                                         geometry, scale, shift, bool(relu), bool(stats))


# ----------------------------------------------------------------------------- linear, dropout


def linear_relu_dropout(input: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, relu: bool = True, p: float = 0.5,
                        training: bool = True) -> torch.Tensor:
    """dropout(relu(linear(input, weight, bias)), p, training) in one GEMM: torchvision's
    classifier block (Linear, ReLU, Dropout). ``relu`` and the dropout (``training`` and
    ``p`` > 0) are each optional; the input may have any leading dimensions and strides.
    The dropout seed is drawn from torch's generator on the input's device at every call.
    fp32 uses TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is on. A weight that is not
    2-D (torch also takes 1-D), a bias that is not one value per output feature (torch
    broadcasts it: a single value, or one row per input row), float64 and integers run torch's
    implementation (a counted fallback); under torch.autocast the arguments are cast as torch
    would cast them."""
    arguments.check_dropout_p(p)
    input, weight, bias = arguments.autocast_args(input, weight, bias)
    p = float(p) if training else 0.0
    if weight.dim() != 2 or (bias is not None and tuple(bias.shape) != weight.shape[:1]):
        backend.count_fallback("linear")
        return linear_ops.torch_apply(input, weight, bias, relu, p)
    arguments.check_linear_args(input, weight, bias, "linear")
    if not backend.use_triton("linear", input):
        return linear_ops.torch_apply(input, weight, bias, relu, p)
    return linear_ops.apply(input, weight, bias, bool(relu), p)


def batch_norm_linear_fused(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                            running_var: Optional[torch.Tensor],
                            bn_weight: Optional[torch.Tensor] = None,
                            bn_bias: Optional[torch.Tensor] = None, training: bool = False,
                            momentum: float = 0.1, eps: float = 1e-5, *, bn_relu: bool = True,
                            weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            relu: bool = False, p: float = 0.0,
                            partials: Optional[WelfordPartials] = None) -> torch.Tensor:
    """``linear_relu_dropout(relu?(batch_norm(input, ...)).flatten(1), weight, bias, relu,
    p)`` (BatchNorm's ReLU only if ``bn_relu``; dropout when ``p`` > 0) for a 4-D input
    without writing the normalised tensor: the GEMM applies the BatchNorm to its input tiles
    as it loads them, and its weight gradient recomputes them. A channels_last input with
    H * W > 1 is copied to NCHW first (flatten's feature order; the raw input, not the
    normalised tensor). The arguments are F.batch_norm's, then the linear's (a 2-D weight, a
    bias of one value per output feature); ``partials`` (the input's, from the conv that
    wrote it) as in ``batch_norm_relu``. Under torch.autocast the input is cast with the
    linear's arguments, before it is normalised."""
    arguments.check_dropout_p(p)
    input, weight, bias = batch_norm_linear_ops.checked_args(
        input, running_mean, running_var, bn_weight, bn_bias, training, eps, weight, bias)
    normalisation = (running_mean, running_var, bn_weight, bn_bias, bool(training),
                     float(momentum), float(eps), bool(bn_relu))
    if not batch_norm_linear_ops.uses_kernels(input):
        return batch_norm_linear_ops.torch_forward(input, *normalisation, weight, bias,
                                                   bool(relu), float(p))
    return batch_norm_linear_ops.forward(input, *normalisation, partials, weight, bias,
                                         bool(relu), float(p))


def linear(input: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.nn.functional.linear on our GEMM (see :func:`linear_relu_dropout`)."""
    return linear_relu_dropout(input, weight, bias, relu=False, p=0.0, training=False)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True,
            inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.dropout on our Philox kernel: the identity (``input`` itself) when
    not training or p = 0. A tensor that is neither contiguous nor channels_last is copied
    to a contiguous one first (in place: and the result copied back)."""
    arguments.check_dropout_p(p)
    if not training or p == 0:
        return input
    if not input.dtype.is_floating_point:
        raise RuntimeError(f"dropout: expected a floating-point input, but got input dtype "
                           f"{input.dtype}")
    if not backend.use_triton("dropout", input):
        return F.dropout(input, p, training, inplace)
    if inplace:
        arguments.check_inplace(input)
    return dropout_ops.apply(input, float(p), bool(inplace))


# ----------------------------------------------------------------------------- sync batch norm

def sync_batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                    running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], momentum: float, eps: float,
                    process_group: dist.ProcessGroup) -> torch.Tensor:
    """Training batch norm of an (N, C, ...) input over the global batch of
    ``process_group`` (gloo on the CPU under the interpreter, NCCL on CUDA): each process's
    Welford partials are gathered and merged with Chan's formula. float64 and devices
    without our kernels run torch's own SyncBatchNorm function (a counted fallback), which
    takes CUDA tensors only."""
    arguments.check_batch_norm_args(input, running_mean, running_var, weight, bias, True, eps)
    if not backend.use_triton("sync_batch_norm", input):
        if input.device.type != "cuda":
            raise ValueError("SyncBatchNorm expected input tensor to be on GPU (or on the CPU "
                             "under TRITON_INTERPRET=1)")
        return torch.nn.modules._functions.SyncBatchNorm.apply(
            input, weight, bias, running_mean, running_var, eps, momentum, process_group,
            dist.get_world_size(process_group))
    y = sync_batch_norm_ops.sync_forward(arguments.as_4d(input), running_mean, running_var,
                                         weight, bias, float(momentum), float(eps),
                                         process_group)
    return y if input.dim() == 4 else y.view(input.shape)
