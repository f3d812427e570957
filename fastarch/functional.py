"""The functional API and the autograd Functions behind it.

Each op takes torch.nn.functional's exact arguments, validates them with torch's error types
and messages, and runs our Triton kernel when ``fastarch.backend`` says the input's device
runs Triton (CUDA, or CPU under TRITON_INTERPRET=1). Otherwise, and for dtypes we do not
accelerate (float64), it calls torch's own implementation: the documented fallback.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from fastarch import backend, profiling
from fastarch.kernels import avg_pool as avg_pool_kernels
from fastarch.kernels import batch_norm as bn_kernels
from fastarch.kernels import conv2d_dgrad, conv2d_wgrad
from fastarch.kernels import conv2d_forward as conv_kernels
from fastarch.kernels import linear as linear_kernels
from fastarch.kernels import max_pool as max_pool_kernels
from fastarch.kernels import relu as relu_kernels
from fastarch.kernels import tensor_cores
from fastarch.kernels.conv2d_forward import WelfordPartials
from fastarch.kernels.conv_geometry import ConvGeometry
from fastarch.kernels.pool_tile import PoolGeometry

IntOrPair = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------- arguments

def _pair(value: IntOrPair, name: str, op: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(value)
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise RuntimeError(f"{op}: {name} must either be a single int, or a tuple of two ints")
    return int(values[0]), int(values[1])


def _check_pool_input(x: torch.Tensor, op: str) -> None:
    if x.dim() < 3 and op == "avg_pool2d":  # torch indexes dim -3 before it checks
        raise IndexError(f"{op}: expected a 3D or 4D (batch mode) tensor for input, but got "
                         f"shape {list(x.shape)}")
    if x.dim() not in (3, 4) or any(size == 0 for size in x.shape[-3:]):
        raise RuntimeError(f"{op}: expected a non-empty 3D or 4D (batch mode) tensor for "
                           f"input, with optional 0 batch size, but got shape {list(x.shape)}")
    if not x.dtype.is_floating_point:
        raise NotImplementedError(f'"{op}" not implemented for input dtype {x.dtype}: '
                                  "pooling takes floating-point tensors")


def _pool_geometry(op: str, x: torch.Tensor, kernel_size: IntOrPair,
                   stride: Optional[IntOrPair], padding: IntOrPair, dilation: IntOrPair,
                   ceil_mode: bool) -> PoolGeometry:
    kernel = _pair(kernel_size, "kernel_size", op)
    steps = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) \
        else _pair(stride, "stride", op)
    pads = _pair(padding, "padding", op)
    dilations = _pair(dilation, "dilation", op)
    if min(kernel) <= 0:
        raise RuntimeError(f"{op}: kernel_size must be greater than zero, but got {kernel}")
    if min(steps) <= 0:
        raise RuntimeError(f"{op}: stride must be greater than zero, but got {steps}")
    if min(dilations) <= 0:
        raise RuntimeError(f"{op}: dilation must be greater than zero, but got {dilations}")
    # torch's CUDA kernels and its indices path bound padding by the undilated kernel.
    if any(pad < 0 or pad > k // 2 for pad, k in zip(pads, kernel)):
        raise RuntimeError(f"{op}: pad should be at most half of kernel size, but got "
                           f"padding={pads} and kernel_size={kernel}")
    geometry = PoolGeometry(kernel, steps, pads, dilations, bool(ceil_mode))
    out_h, out_w = geometry.output_size(*x.shape[-2:])
    if out_h < 1 or out_w < 1:
        raise RuntimeError(f"{op}: given input size {tuple(x.shape[-3:])}, the calculated "
                           f"output size is {(x.shape[-3], out_h, out_w)}: output size is too "
                           "small")
    return geometry


def _batched(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 4 else x.unsqueeze(0)


def _unbatched_like(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 4 else y.squeeze(0)


# ----------------------------------------------------------------------------- max pool

@profiling.named("max_pool2d")
class MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, geometry: PoolGeometry, return_indices: bool):
        keep_offsets = ctx.needs_input_grad[0]
        y, offsets, indices = max_pool_kernels.max_pool2d_forward(
            x, geometry, keep_offsets, return_indices)
        ctx.geometry = geometry
        ctx.input_shape = x.shape
        ctx.memory_format = backend.memory_format_of(x)
        if keep_offsets:
            ctx.save_for_backward(offsets)
        if indices is not None:
            ctx.mark_non_differentiable(indices)
            return y, indices
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor, *unused_index_grad):
        (offsets,) = ctx.saved_tensors
        dx = max_pool_kernels.max_pool2d_backward(dy, offsets, ctx.input_shape,
                                                  ctx.memory_format, ctx.geometry)
        return dx, None, None


def max_pool2d(input: torch.Tensor, kernel_size: IntOrPair, stride: Optional[IntOrPair] = None,
               padding: IntOrPair = 0, dilation: IntOrPair = 1, ceil_mode: bool = False,
               return_indices: bool = False):
    """torch.nn.functional.max_pool2d on our kernels; int64 indices only when asked for."""
    _check_pool_input(input, "max_pool2d")
    geometry = _pool_geometry("max_pool2d", input, kernel_size, stride, padding, dilation,
                              ceil_mode)
    if not backend.use_triton("max_pool2d", input):
        return F.max_pool2d(input, kernel_size, stride, padding, dilation,
                            ceil_mode=ceil_mode, return_indices=return_indices)
    out = MaxPool2dFunction.apply(_batched(input), geometry, return_indices)
    if return_indices:
        return _unbatched_like(input, out[0]), _unbatched_like(input, out[1])
    return _unbatched_like(input, out)


# ----------------------------------------------------------------------------- avg pool

@profiling.named("avg_pool2d")
class AvgPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, geometry: PoolGeometry, count_include_pad: bool,
                divisor_override: Optional[int]):
        ctx.geometry = geometry
        ctx.count_include_pad = count_include_pad
        ctx.divisor_override = divisor_override
        ctx.input_shape = x.shape
        ctx.memory_format = backend.memory_format_of(x)
        return avg_pool_kernels.avg_pool2d_forward(x, geometry, count_include_pad,
                                                   divisor_override)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        dx = avg_pool_kernels.avg_pool2d_backward(dy, ctx.input_shape, ctx.memory_format,
                                                  ctx.geometry, ctx.count_include_pad,
                                                  ctx.divisor_override)
        return dx, None, None, None


def avg_pool2d(input: torch.Tensor, kernel_size: IntOrPair, stride: Optional[IntOrPair] = None,
               padding: IntOrPair = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: Optional[int] = None) -> torch.Tensor:
    """torch.nn.functional.avg_pool2d on our kernels (fp32 sums)."""
    _check_pool_input(input, "avg_pool2d")
    geometry = _pool_geometry("avg_pool2d", input, kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None and divisor_override == 0:
        raise RuntimeError("avg_pool2d: divisor_override must be non-zero")
    if not backend.use_triton("avg_pool2d", input):
        return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                            divisor_override)
    y = AvgPool2dFunction.apply(_batched(input), geometry, bool(count_include_pad),
                                divisor_override)
    return _unbatched_like(input, y)


# ----------------------------------------------------------------------------- adaptive avg pool

@profiling.named("adaptive_avg_pool2d")
class AdaptiveAvgPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, output_size: tuple[int, int]):
        ctx.input_shape = x.shape
        ctx.memory_format = backend.memory_format_of(x)
        return avg_pool_kernels.adaptive_avg_pool2d_forward(x, output_size)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        dx = avg_pool_kernels.adaptive_avg_pool2d_backward(dy, ctx.input_shape,
                                                           ctx.memory_format)
        return dx, None


def _adaptive_output_size(x: torch.Tensor,
                          output_size: Union[int, None, Sequence[Optional[int]]]
                          ) -> tuple[int, int]:
    sizes = (output_size, output_size) if output_size is None or isinstance(output_size, int) \
        else tuple(output_size)
    if len(sizes) != 2:
        raise RuntimeError("adaptive_avg_pool2d: output_size must be 2")
    resolved = tuple(x.shape[-2 + axis] if size is None else int(size)
                     for axis, size in enumerate(sizes))
    if min(resolved) < 0:
        raise RuntimeError("adaptive_avg_pool2d: elements of output_size must be greater than "
                           f"or equal to 0 but received {resolved}")
    return resolved


def adaptive_avg_pool2d(input: torch.Tensor,
                        output_size: Union[int, None, Sequence[Optional[int]]]) -> torch.Tensor:
    """torch.nn.functional.adaptive_avg_pool2d on our kernels.

    When the input already has the output size (AlexNet's 6x6, VGG's 7x7 at 224x224) the
    pool is the identity and ``input`` itself is returned, as ``nn.Identity`` would.
    """
    if not isinstance(output_size, int) and output_size is not None \
            and input.dim() <= len(output_size):  # torch's own check, with its error type
        raise ValueError(f"adaptive_avg_pool2d(): expected a 3D or 4D tensor for input, but "
                         f"got shape {list(input.shape)} for output_size {output_size}")
    if input.dim() not in (3, 4):
        raise RuntimeError("adaptive_avg_pool2d(): expected a 3D or 4D tensor for input, but "
                           f"got shape {list(input.shape)}")
    if not input.dtype.is_floating_point:
        raise NotImplementedError(f'"adaptive_avg_pool2d" not implemented for input dtype '
                                  f"{input.dtype}: pooling takes floating-point tensors")
    size = _adaptive_output_size(input, output_size)
    if any(s == 0 for s in input.shape[-3:]):
        raise RuntimeError("adaptive_avg_pool2d(): expected input to have non-zero size for "
                           f"non-batch dimensions, but got shape {list(input.shape)}")
    if tuple(input.shape[-2:]) == size:
        return input
    if not backend.use_triton("adaptive_avg_pool2d", input):
        return F.adaptive_avg_pool2d(input, size)
    if 0 in size:
        return input.new_empty((*input.shape[:-2], *size))
    y = AdaptiveAvgPool2dFunction.apply(_batched(input), size)
    return _unbatched_like(input, y)


# ----------------------------------------------------------------------------- batch norm

def _check_batch_norm_args(x: torch.Tensor, running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], training: bool) -> None:
    """torch's checks, error types and messages for F.batch_norm."""
    if x.dim() < 2:
        raise RuntimeError("batch_norm: expected input with at least 2 dimensions (N, C, ...), "
                           f"but got shape {list(x.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: running_mean and running_var must either both be None or "
                         "neither be None")
    if not training and running_mean is None:
        raise RuntimeError("batch_norm: running_mean must be defined in evaluation mode")
    if not x.dtype.is_floating_point:
        raise NotImplementedError(f'"batch_norm" not implemented for input dtype {x.dtype}: '
                                  "batch norm takes floating-point tensors")
    channels = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"batch_norm: {name} should contain {channels} elements not "
                               f"{t.numel()}")
        if t is not None and t.device != x.device:
            raise RuntimeError(f"batch_norm: expected {name} on the input's device {x.device}, "
                               f"but got {name} on {t.device}")
    if training and x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{x.size()}")


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) as a 4-D view (N, C, H, W) the kernels take."""
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() == 3:
        return x.unsqueeze(-1)
    return x if x.dim() == 4 else x.flatten(2, -2)


@dataclass(frozen=True)
class _FusedPool:
    """The pool a BatchNorm (+ ReLU) runs fused into: max, or avg with its divisor rules."""
    geometry: PoolGeometry
    is_max: bool
    count_include_pad: bool = True
    divisor_override: Optional[int] = None

    def backward(self, dy: torch.Tensor, offsets: Optional[torch.Tensor],
                 x: torch.Tensor) -> torch.Tensor:
        """The gradient of the pool's input (the normalised, ReLU'd x): the pools' gathers."""
        fmt = backend.memory_format_of(x)
        if self.is_max:
            return max_pool_kernels.max_pool2d_backward(dy, offsets, x.shape, fmt, self.geometry)
        return avg_pool_kernels.avg_pool2d_backward(dy, x.shape, fmt, self.geometry,
                                                    self.count_include_pad,
                                                    self.divisor_override)


@profiling.named("batch_norm")
class BatchNormFunction(torch.autograd.Function):
    """BatchNorm2d on a 4-D input, then ReLU (``relu``), then a pool (``pool``) whose input,
    the normalised tensor, is never written. Training updates the running statistics in
    place (when given) and saves fp32 mean / invstd; eval normalises with the running ones.
    Backward recomputes x_hat (and the ReLU mask) from x; with a pool it first runs the
    pool's backward gather to get the gradient of the normalised tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], training: bool, momentum: float,
                eps: float, relu: bool, pool: Optional[_FusedPool],
                partials: Optional[WelfordPartials]):
        if training:
            partials = partials if partials is not None else bn_kernels.welford_partials(x)
            stats = bn_kernels.batch_norm_finalize(*partials, weight, bias, running_mean,
                                                   running_var, momentum, eps)
        else:
            stats = bn_kernels.batch_norm_running_statistics(running_mean, running_var, weight,
                                                             bias, eps)
        offsets = None
        if pool is None:
            y = bn_kernels.batch_norm_apply(x, stats, relu)
        elif pool.is_max:
            y, offsets = bn_kernels.batch_norm_max_pool2d_forward(
                x, stats, relu, pool.geometry, keep_offsets=any(ctx.needs_input_grad[:3]))
        else:
            y = bn_kernels.batch_norm_avg_pool2d_forward(x, stats, relu, pool.geometry,
                                                         pool.count_include_pad,
                                                         pool.divisor_override)
        ctx.training, ctx.relu, ctx.pool = training, relu, pool
        ctx.grad_dtypes = (None if weight is None else weight.dtype,
                           None if bias is None else bias.dtype)
        ctx.save_for_backward(x, *stats, offsets)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, mean, invstd, scale, shift, offsets = ctx.saved_tensors
        stats = bn_kernels.BatchNormStatistics(mean, invstd, scale, shift)
        if ctx.pool is not None:
            dy = ctx.pool.backward(dy, offsets, x)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        sums = dw = db = None
        if (need_dx and ctx.training) or need_dw or need_db:
            sums, dw, db = bn_kernels.batch_norm_backward_sums(
                x, dy, stats, ctx.relu, ctx.grad_dtypes[0] if need_dw else None,
                ctx.grad_dtypes[1] if need_db else None)
        dx = None
        if need_dx:
            dx = bn_kernels.batch_norm_backward_input(x, dy, stats,
                                                      sums if ctx.training else None, ctx.relu)
        return dx, dw, db, None, None, None, None, None, None, None, None


def _use_batch_norm_kernels(op: str, input: torch.Tensor) -> bool:
    """Our kernels, except for empty inputs and what ``backend`` sends to torch (counted)."""
    if input.numel() == 0:
        backend.count_fallback(op)
        return False
    return backend.use_triton(op, input)


def _batch_norm(op: str, input: torch.Tensor, running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], training: bool, momentum: float, eps: float,
                relu: bool, partials: Optional[WelfordPartials] = None) -> torch.Tensor:
    _check_batch_norm_args(input, running_mean, running_var, weight, bias, training)
    if not _use_batch_norm_kernels(op, input):
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(y) if relu else y
    y = BatchNormFunction.apply(_as_4d(input), weight, bias, running_mean, running_var,
                                bool(training), float(momentum), float(eps), relu, None,
                                _training_partials(partials, training))
    return y if input.dim() == 4 else y.view(input.shape)


def batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor],
               running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """torch.nn.functional.batch_norm on our kernels for (N, C, ...) inputs; statistics in
    fp32 whatever the input dtype. ``momentum`` is the exponential-average factor of the
    running statistics (1/num_batches_tracked gives the cumulative average). Empty inputs
    and float64 run torch's implementation."""
    return _batch_norm("batch_norm", input, running_mean, running_var, weight, bias, training,
                       momentum, eps, relu=False)


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


def _training_partials(partials: Optional[WelfordPartials],
                       training: bool) -> Optional[WelfordPartials]:
    """Precomputed statistics only matter in training; eval normalises with running ones."""
    return partials if training else None


def _batch_norm_pool(op: str, input: torch.Tensor, running_mean: Optional[torch.Tensor],
                     running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], training: bool, momentum: float, eps: float,
                     relu: bool, pool: _FusedPool,
                     torch_pool: Callable[[torch.Tensor], torch.Tensor],
                     partials: Optional[WelfordPartials]) -> torch.Tensor:
    if not _use_batch_norm_kernels(op, input):
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return torch_pool(F.relu(y) if relu else y)
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                   bool(training), float(momentum), float(eps), relu, pool,
                                   _training_partials(partials, training))


def _check_batch_norm_pool_input(input: torch.Tensor, op: str) -> None:
    if input.dim() != 4:
        raise RuntimeError(f"{op}: expected a 4D (N, C, H, W) input, but got shape "
                           f"{list(input.shape)}")


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
    _check_batch_norm_pool_input(input, "batch_norm_max_pool2d")
    _check_batch_norm_args(input, running_mean, running_var, weight, bias, training)
    _check_pool_input(input, "max_pool2d")
    geometry = _pool_geometry("max_pool2d", input, kernel_size, stride, padding, dilation,
                              ceil_mode)
    return _batch_norm_pool(
        "batch_norm_max_pool2d", input, running_mean, running_var, weight, bias, training,
        momentum, eps, relu, _FusedPool(geometry, is_max=True),
        lambda y: F.max_pool2d(y, kernel_size, stride, padding, dilation, ceil_mode),
        partials)


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
    _check_batch_norm_pool_input(input, "batch_norm_avg_pool2d")
    _check_batch_norm_args(input, running_mean, running_var, weight, bias, training)
    _check_pool_input(input, "avg_pool2d")
    geometry = _pool_geometry("avg_pool2d", input, kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None and divisor_override == 0:
        raise RuntimeError("avg_pool2d: divisor_override must be non-zero")
    pool = _FusedPool(geometry, is_max=False, count_include_pad=bool(count_include_pad),
                      divisor_override=divisor_override)
    return _batch_norm_pool(
        "batch_norm_avg_pool2d", input, running_mean, running_var, weight, bias, training,
        momentum, eps, relu, pool,
        lambda y: F.avg_pool2d(y, kernel_size, stride, padding, ceil_mode, count_include_pad,
                               divisor_override),
        partials)


# ----------------------------------------------------------------------------- relu

@profiling.named("relu")
class ReLUFunction(torch.autograd.Function):
    """ReLU on a dense tensor; in place marks the input dirty (as torch.relu_ does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool):
        y = relu_kernels.relu_forward(x, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        return relu_kernels.relu_backward(y, dy), None


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.relu on our kernel. Inputs neither contiguous nor channels_last
    run on a contiguous copy (and, in place, are written back from it)."""
    if not backend.use_triton("relu", input):
        return torch.relu_(input) if inplace else torch.relu(input)
    if relu_kernels.dense_format(input) is not None:
        return ReLUFunction.apply(input, bool(inplace))
    y = ReLUFunction.apply(input.contiguous(), False)
    return input.copy_(y) if inplace else y


# ----------------------------------------------------------------------------- conv2d

ConvPadding = Union[str, int, Sequence[int]]


def _conv_pair(value: IntOrPair, name: str) -> tuple[int, int]:
    values = (value,) if isinstance(value, int) else tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"conv2d: {name} must be an int or a tuple of ints, but got {value!r}")
    if len(values) not in (1, 2):
        raise RuntimeError(f"conv2d: expected {name} to be a single integer value or a list of "
                           f"2 values to match the convolution dimensions, but got "
                           f"{name}={list(values)}")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _conv_padding(padding: ConvPadding, kernel: tuple[int, int], strides: tuple[int, int],
                  dilations: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(top/left, bottom/right) padding; 'same' puts the odd extra row/column at the end."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise RuntimeError(f"conv2d: invalid padding string {padding!r}, expected 'same' "
                               "or 'valid'")
        if strides != (1, 1):
            raise RuntimeError("conv2d: padding='same' is not supported for strided "
                               f"convolutions (stride={strides})")
        totals = [d * (k - 1) for k, d in zip(kernel, dilations)]
        begin = (totals[0] // 2, totals[1] // 2)
        return begin, (totals[0] - begin[0], totals[1] - begin[1])
    pads = _conv_pair(padding, "padding")
    if min(pads) < 0:
        raise RuntimeError(f"conv2d: negative padding is not supported, but got padding={pads}")
    return pads, pads


def _conv_geometry(x: torch.Tensor, weight: torch.Tensor, stride: IntOrPair,
                   padding: ConvPadding, dilation: IntOrPair) -> ConvGeometry:
    kernel = (weight.shape[2], weight.shape[3])
    strides = _conv_pair(stride, "stride")
    dilations = _conv_pair(dilation, "dilation")
    if min(strides) <= 0:
        raise RuntimeError(f"conv2d: non-positive stride is not supported, got {strides}")
    if min(dilations) <= 0:
        raise RuntimeError(f"conv2d: non-positive dilation is not supported, got {dilations}")
    begin, end = _conv_padding(padding, kernel, strides, dilations)
    padded = [size + b + e for size, b, e in zip(x.shape[-2:], begin, end)]
    effective = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    if padded[0] < effective[0] or padded[1] < effective[1]:
        raise RuntimeError(f"conv2d: calculated padded input size per channel: ({padded[0]} x "
                           f"{padded[1]}). Kernel size: ({effective[0]} x {effective[1]}). "
                           "Kernel size can't be greater than actual input size")
    return ConvGeometry(kernel, strides, begin, dilations, end if end != begin else None)


def _check_conv_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
                     ) -> None:
    """torch's checks and error types: RuntimeError for shapes, devices and mixed dtypes,
    NotImplementedError for dtypes no convolution kernel implements (integers)."""
    if x.dim() not in (3, 4):
        raise RuntimeError("conv2d: expected 3D (unbatched) or 4D (batched) input, but got "
                           f"input of size: {list(x.shape)}")
    if weight.dim() != 4:
        raise RuntimeError("conv2d: expected a 4D weight [out_channels, in_channels, kH, kW], "
                           f"but got weight of size {list(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"conv2d: expected {name} on the input's device {x.device}, but "
                               f"got {name} on {t.device}")
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(f"conv2d: input dtype {x.dtype} and {name} dtype {t.dtype} "
                               "should be the same")
    if not x.dtype.is_floating_point:
        raise NotImplementedError(f'"conv2d" not implemented for input dtype {x.dtype}: '
                                  "convolution takes floating-point tensors")
    if weight.shape[0] == 0 or 0 in weight.shape[2:]:
        raise RuntimeError(f"conv2d: expected weight with at least one output channel and a "
                           f"non-empty kernel, but got weight of size {list(weight.shape)}")
    if weight.shape[1] != x.shape[-3]:
        raise RuntimeError(f"conv2d: given groups=1, weight of size {list(weight.shape)}, "
                           f"expected input{list(x.shape)} to have {weight.shape[1]} channels, "
                           f"but got {x.shape[-3]} channels instead")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"conv2d: given weight of size {list(weight.shape)}, expected bias "
                           f"to be 1-dimensional with {weight.shape[0]} elements, but got bias "
                           f"of size {list(bias.shape)} instead")


def _check_scale_shift(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                       shift: Optional[torch.Tensor]) -> None:
    if (scale is None) != (shift is None):
        raise RuntimeError("conv2d_fused: scale and shift go together: give both or neither")
    if scale is None:
        return
    for name, t in (("scale", scale), ("shift", shift)):
        if t.device != x.device or t.dtype != torch.float32 or \
                tuple(t.shape) != (weight.shape[0],):
            raise RuntimeError(f"conv2d_fused: expected {name} to be a float32 tensor of "
                               f"{weight.shape[0]} elements on {x.device}, but got "
                               f"{t.dtype} of size {list(t.shape)} on {t.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"conv2d_fused: {name} must not require grad: scale/shift are "
                               "constants (an eval-mode BatchNorm folded into the conv)")


def _autocast_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """What torch.autocast does to a conv2d's arguments: floating tensors other than float64
    become the autocast dtype."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        eligible = t is not None and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t
    return cast(x), cast(weight), cast(bias)


@profiling.named("conv2d")
class Conv2dFunction(torch.autograd.Function):
    """conv2d with the fused epilogue; gradients reach input, weight and bias through ReLU
    and the (constant) scale. The Welford partials are extra, non-differentiable outputs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                geometry: ConvGeometry, relu: bool, stats: bool):
        y, partials = conv_kernels.conv2d_forward(x, weight, bias, geometry, scale, shift,
                                                  relu, stats)
        ctx.geometry = geometry
        ctx.input_shape = x.shape
        ctx.weight_shape = weight.shape
        ctx.memory_format = backend.memory_format_of(x)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[0] else None,
                              scale, y if relu else None)
        if partials is None:
            return y
        ctx.mark_non_differentiable(*partials)
        return y, *partials

    @staticmethod
    def backward(ctx, dy: torch.Tensor, *unused_partial_grads):
        x, weight, scale, y = ctx.saved_tensors
        if y is not None:
            dy = dy.masked_fill(y <= 0, 0)  # ReLU: torch's threshold_backward (NaN passes)
        if scale is not None:
            dy = (dy.float() * scale.view(1, -1, 1, 1)).to(dy.dtype)
        allow_tf32 = tensor_cores.cudnn_conv_allows_tf32()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = conv2d_dgrad.conv2d_input_grad(dy, weight, ctx.input_shape, ctx.memory_format,
                                                ctx.geometry, allow_tf32)
        if ctx.needs_input_grad[1]:
            dw, db = conv2d_wgrad.conv2d_weight_grad(x, dy, ctx.weight_shape, ctx.geometry,
                                                     ctx.needs_input_grad[2], allow_tf32)
        elif ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3), dtype=torch.float32).to(dy.dtype)
        return dx, dw, db, None, None, None, None, None


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: IntOrPair = 1, padding: ConvPadding = 0, dilation: IntOrPair = 1,
           groups: int = 1) -> torch.Tensor:
    """torch.nn.functional.conv2d on our implicit-GEMM kernels; the output takes the input's
    memory format. groups > 1 runs torch's convolution (a counted fallback), as does float64.
    Under torch.autocast the arguments are cast as torch would cast them."""
    input, weight, bias = _autocast_args(input, weight, bias)
    if groups != 1:
        backend.count_fallback("conv2d")
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    _check_conv_args(input, weight, bias)
    geometry = _conv_geometry(input, weight, stride, padding, dilation)
    if not backend.use_triton("conv2d", input):
        return F.conv2d(input, weight, bias, stride, padding, dilation)
    y = Conv2dFunction.apply(_batched(input), weight, bias, None, None, geometry, False, False)
    return _unbatched_like(input, y)


def conv2d_fused(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 stride: IntOrPair = 1, padding: ConvPadding = 0, dilation: IntOrPair = 1, *,
                 scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                 relu: bool = False, stats: bool = False
                 ) -> tuple[torch.Tensor, Optional[WelfordPartials]]:
    """conv2d (groups=1) with the epilogue fused into the kernel:
    y = relu?((conv(input, weight) + bias) * scale + shift), and with ``stats`` the
    BatchNorm statistics of conv + bias (before scale/shift/ReLU) as per-tile Welford
    partials [tiles, out_channels] (fp32; float64 input, which runs torch, gives one float64
    tile); ``kernels.conv2d_forward.merge_welford_partials`` turns them into mean and var.

    ``scale`` and ``shift`` are per-output-channel float32 constants (an eval-mode BatchNorm
    folded in): they must not require grad. Input, weight and bias get gradients."""
    input, weight, bias = _autocast_args(input, weight, bias)
    _check_conv_args(input, weight, bias)
    _check_scale_shift(input, weight, scale, shift)
    geometry = _conv_geometry(input, weight, stride, padding, dilation)
    if not backend.use_triton("conv2d_fused", input):
        return _conv2d_fused_torch(input, weight, bias, stride, padding, dilation, scale, shift,
                                   relu, stats)
    out = Conv2dFunction.apply(_batched(input), weight, bias, scale, shift, geometry, relu,
                               stats)
    if not stats:
        return _unbatched_like(input, out), None
    return _unbatched_like(input, out[0]), WelfordPartials(*out[1:])


def _conv2d_fused_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        stride: IntOrPair, padding: ConvPadding, dilation: IntOrPair,
                        scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                        relu: bool, stats: bool) -> tuple[torch.Tensor, Optional[WelfordPartials]]:
    """The fallback: torch's conv2d, then the epilogue as torch ops; the partials are one
    tile holding the whole output."""
    y = F.conv2d(_batched(x), weight, bias, stride, padding, dilation)
    partials = None
    if stats:
        values = y.detach().to(torch.promote_types(y.dtype, torch.float32))
        var, mean = torch.var_mean(values, dim=(0, 2, 3), unbiased=False)
        count = torch.full_like(mean, y.numel() // y.shape[1])
        partials = WelfordPartials(count[None], mean[None], (var * count)[None])
    if scale is not None:
        channel = (1, -1, 1, 1)
        y = (y * scale.view(channel) + shift.view(channel)).to(y.dtype)
    if relu:
        y = torch.relu(y)
    return _unbatched_like(x, y), partials


# ----------------------------------------------------------------------------- linear, dropout

def _check_dropout_p(p: float) -> None:
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def _check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       op: str) -> None:
    """torch's error types: RuntimeError for shapes, devices and mixed dtypes,
    NotImplementedError for dtypes no matmul kernel implements (integers)."""
    if x.dim() == 0:
        raise RuntimeError(f"{op}: expected input with at least one dimension, but got a 0-D "
                           "tensor")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: expected {name} on the input's device {x.device}, but "
                               f"got {name} on {t.device}")
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(f"{op}: input dtype {x.dtype} and {name} dtype {t.dtype} "
                               "should be the same")
    if not x.dtype.is_floating_point:
        raise NotImplementedError(f'"{op}" not implemented for input dtype {x.dtype}: linear '
                                  "layers take floating-point tensors")
    if weight.shape[1] != x.shape[-1]:
        raise RuntimeError(f"{op}: input of size {list(x.shape)} has {x.shape[-1]} features "
                           f"but weight of size {list(weight.shape)} expects "
                           f"in_features={weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"{op}: given weight of size {list(weight.shape)}, expected bias "
                           f"to be 1-dimensional with {weight.shape[0]} elements, but got bias "
                           f"of size {list(bias.shape)} instead")


@profiling.named("linear")
class LinearFunction(torch.autograd.Function):
    """dropout(relu(x @ W^T + b)) of a 2-D x. Backward recomputes the ReLU mask from the
    saved output and regenerates the dropout mask from ``seed`` (never stored)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                relu: bool, p: float, seed: Optional[torch.Tensor]):
        y = linear_kernels.linear_forward(x, weight, bias, relu, p, seed,
                                          tensor_cores.matmul_allows_tf32())
        ctx.relu = relu
        ctx.p = p
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[0] else None,
                              y if relu else None, seed)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, y, seed = ctx.saved_tensors
        bias_dtype = ctx.bias_dtype if ctx.needs_input_grad[2] else None
        dx, dw, db = linear_kernels.linear_backward(dy, x, weight, y, seed, ctx.relu, ctx.p,
                                                    bias_dtype,
                                                    tensor_cores.matmul_allows_tf32())
        return dx, dw, db, None, None, None


def _linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  relu: bool, p: float) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    if relu:
        y = F.relu(y)
    return F.dropout(y, p, training=True) if p > 0 else y


def linear_relu_dropout(input: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, relu: bool = True, p: float = 0.5,
                        training: bool = True) -> torch.Tensor:
    """dropout(relu(linear(input, weight, bias)), p, training) in one GEMM: torchvision's
    classifier block (Linear, ReLU, Dropout). ``relu`` and the dropout (``training`` and
    ``p`` > 0) are each optional; the input may have any leading dimensions and strides.
    The dropout seed is drawn from torch's generator on the input's device at every call.
    fp32 uses TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is on. A weight that is not
    2-D (torch also takes 1-D) and float64 run torch's implementation (a counted fallback);
    under torch.autocast the arguments are cast as torch would cast them."""
    _check_dropout_p(p)
    input, weight, bias = _autocast_args(input, weight, bias)
    p = float(p) if training else 0.0
    if weight.dim() != 2:
        backend.count_fallback("linear")
        return _linear_torch(input, weight, bias, relu, p)
    _check_linear_args(input, weight, bias, "linear")
    if not backend.use_triton("linear", input):
        return _linear_torch(input, weight, bias, relu, p)
    seed = linear_kernels.new_seed(input.device) if p > 0 else None
    x2d = input.reshape(input.shape[:-1].numel(), input.shape[-1])
    y = LinearFunction.apply(x2d, weight, bias, relu, p, seed)
    return y if input.dim() == 2 else y.view(*input.shape[:-1], weight.shape[0])


def linear(input: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.nn.functional.linear on our GEMM (see :func:`linear_relu_dropout`)."""
    return linear_relu_dropout(input, weight, bias, relu=False, p=0.0, training=False)


@profiling.named("dropout")
class DropoutFunction(torch.autograd.Function):
    """Dropout of a dense tensor (contiguous or channels_last), the mask keyed on memory
    order and regenerated from ``seed`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: torch.Tensor, inplace: bool):
        ctx.p = p
        ctx.memory_format = backend.memory_format_of(x)
        ctx.save_for_backward(seed)
        if inplace:
            ctx.mark_dirty(x)
            return linear_kernels.dropout_forward(x, p, seed, out=x)
        return linear_kernels.dropout_forward(x, p, seed)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (seed,) = ctx.saved_tensors
        dy = dy.contiguous(memory_format=ctx.memory_format)  # the mask follows memory order
        return linear_kernels.dropout_forward(dy, ctx.p, seed), None, None, None


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True,
            inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.dropout on our Philox kernel: the identity (``input`` itself) when
    not training or p = 0. A tensor that is neither contiguous nor channels_last is copied
    to a contiguous one first (in place: and the result copied back)."""
    _check_dropout_p(p)
    if not training or p == 0:
        return input
    if not input.dtype.is_floating_point:
        raise RuntimeError(f"dropout: expected a floating-point input, but got input dtype "
                           f"{input.dtype}")
    if not backend.use_triton("dropout", input):
        return F.dropout(input, p, training, inplace)
    seed = linear_kernels.new_seed(input.device)
    if input.is_contiguous(memory_format=backend.memory_format_of(input)):
        return DropoutFunction.apply(input, float(p), seed, inplace)
    y = DropoutFunction.apply(input.contiguous(), float(p), seed, False)
    return input.copy_(y) if inplace else y
