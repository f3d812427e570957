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

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastarch import backend, ops, profiling
from fastarch.kernels import linear as linear_kernels
from fastarch.kernels import relu as relu_kernels
from fastarch.kernels.batch_norm import BatchNormStatistics
from fastarch.kernels.conv2d_forward import WelfordPartials, merge_welford_partials
from fastarch.kernels.conv_geometry import ConvGeometry
from fastarch.kernels.pool_tile import PoolGeometry

IntOrPair = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------- arguments

def _ints(value: IntOrPair, name: str, op: str) -> tuple[int, ...]:
    """An int or a sequence of ints as a tuple; torch's TypeError naming the argument for
    anything else (a float, a bool, a string)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_index(v, name, op, f"found element of type {type(v).__name__} at pos {i}")
                     for i, v in enumerate(value))
    return (_index(value, name, op, f"not {type(value).__name__}"),)


def _index(value, name: str, op: str, problem: str) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{op}(): argument '{name}' must be tuple of ints, {problem}")
    return operator.index(value)


def _pair(value: IntOrPair, name: str, op: str) -> tuple[int, int]:
    values = _ints(value, name, op)
    if len(values) not in (1, 2):
        raise RuntimeError(f"{op}: {name} must either be a single int, or a tuple of two ints")
    return values[0], values[-1]


def _check_pool_input(x: torch.Tensor, op: str) -> None:
    if x.dim() < 3 and op == "avg_pool2d":  # torch indexes dim -3 before it checks
        raise IndexError(f"{op}: expected a 3D or 4D (batch mode) tensor for input, but got "
                         f"shape {list(x.shape)}")
    if x.dim() not in (3, 4) or any(size == 0 for size in x.shape[-3:]):
        raise RuntimeError(f"{op}: expected a non-empty 3D or 4D (batch mode) tensor for "
                           f"input, with optional 0 batch size, but got shape {list(x.shape)}")


def _pool_geometry(op: str, x: torch.Tensor, kernel_size: IntOrPair,
                   stride: Optional[IntOrPair], padding: IntOrPair, dilation: IntOrPair,
                   ceil_mode: bool) -> PoolGeometry:
    kernel = _pair(kernel_size, "kernel_size", op)
    steps = kernel if stride is None or (isinstance(stride, Sequence) and len(stride) == 0) \
        else _pair(stride, "stride", op)
    pads = _pair(padding, "padding", op)
    dilations = _pair(dilation, "dilation", op)
    if min(kernel) <= 0:
        raise RuntimeError(f"{op}: kernel_size must be greater than zero, but got {kernel}")
    if min(steps) <= 0:
        raise RuntimeError(f"{op}: stride must be greater than zero, but got {steps}")
    if min(dilations) <= 0:
        raise RuntimeError(f"{op}: dilation must be greater than zero, but got {dilations}")
    if min(pads) < 0:
        raise RuntimeError(f"{op}: pad must be non-negative, but got pad: {min(pads)}")
    # torch's CUDA kernels and its indices path bound padding by the undilated kernel.
    if any(pad > k // 2 for pad, k in zip(pads, kernel)):
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


def _records_grad(x: torch.Tensor) -> bool:
    """Whether autograd records an op on x (what decides the tensors kept for backward)."""
    return torch.is_grad_enabled() and x.requires_grad


def _check_inplace(x: torch.Tensor) -> None:
    """Before an in-place kernel writes x: raise torch's own error where torch refuses to
    write x in place (a leaf that requires grad, a view of one, a view autograd cannot
    rebase, an inference tensor outside inference mode). For every x that may be refused,
    ``x.copy_(x)`` runs torch's in-place checks and copies nothing; where torch accepts, it
    records an identity. Not traced: under torch.compile, autograd's checks run on the
    captured graph's in-place ops."""
    if torch.compiler.is_compiling():
        return
    outside_inference = x.is_inference() and not torch.is_inference_mode_enabled()
    if outside_inference or (_records_grad(x) and (x.is_leaf or x._is_view())):
        x.copy_(x)


# ----------------------------------------------------------------------------- max pool

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
    y, _, indices = ops.max_pool2d(_batched(input), *ops.pool_window(geometry),
                                   keep_offsets=_records_grad(input),
                                   return_indices=bool(return_indices))
    if return_indices:
        return _unbatched_like(input, y), _unbatched_like(input, indices)
    return _unbatched_like(input, y)


# ----------------------------------------------------------------------------- avg pool

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
    y = ops.avg_pool2d(_batched(input), *_avg_window(geometry), bool(count_include_pad),
                       divisor_override)
    return _unbatched_like(input, y)


def _avg_window(geometry: PoolGeometry) -> tuple:
    """An average pool's window as op arguments: kernel, stride, padding, ceil_mode."""
    kernel, stride, padding, _, ceil_mode = ops.pool_window(geometry)
    return kernel, stride, padding, ceil_mode


# ----------------------------------------------------------------------------- adaptive avg pool

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
    size = _adaptive_output_size(input, output_size)
    if 0 in input.shape[-2:]:  # torch takes an empty batch or channel dimension
        raise RuntimeError("adaptive_avg_pool2d(): expected input to have non-zero size for "
                           f"non-batch dimensions, but got shape {list(input.shape)}")
    if not backend.use_triton("adaptive_avg_pool2d", input):
        return F.adaptive_avg_pool2d(input, size)
    if tuple(input.shape[-2:]) == size:
        return input
    if 0 in size:
        return input.new_empty((*input.shape[:-2], *size))
    y = ops.adaptive_avg_pool2d(_batched(input), list(size))
    return _unbatched_like(input, y)


# ----------------------------------------------------------------------------- batch norm

def _check_batch_norm_args(x: torch.Tensor, running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], training: bool, eps: float) -> None:
    """torch's checks, error types and messages for F.batch_norm, all made before anything
    (the running statistics) is written."""
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
    given = {name: t for name, t in (("running_mean", running_mean),
                                     ("running_var", running_var), ("weight", weight),
                                     ("bias", bias)) if t is not None}
    for name, t in given.items():
        if t.numel() != channels:
            raise RuntimeError(f"batch_norm: {name} should contain {channels} elements not "
                               f"{t.numel()}")
        if t.device != x.device:
            raise RuntimeError(f"batch_norm: expected {name} on the input's device {x.device}, "
                               f"but got {name} on {t.device}")
        if name.startswith("running") and t.dim() != 1:  # weight and bias may be any shape
            raise RuntimeError(f"batch_norm: expected {name} of shape [{channels}] "
                               f"(TensorAccessor expected 1 dims but tensor has {t.dim()})")
    _check_batch_norm_dtypes(x, given)
    if training and x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{x.size()}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_batch_norm_dtypes(x: torch.Tensor, given: dict[str, torch.Tensor]) -> None:
    """torch's rule: the running statistics, weight and bias all in the input's dtype or, for
    a float16/bfloat16 input, all in float32."""
    mixed = x.dtype in (torch.float16, torch.bfloat16) and \
        any(t.dtype == torch.float32 for t in given.values())
    expected = torch.float32 if mixed else x.dtype
    for name, t in given.items():
        if t.dtype != expected:
            raise RuntimeError(f"batch_norm: mixed dtype: expected {name} to have scalar type "
                               f"{expected}, but got {t.dtype}")


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


def _detached(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()


def _batch_norm_statistics(x: torch.Tensor, running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], training: bool, momentum: float,
                           eps: float, partials: Optional[WelfordPartials]
                           ) -> BatchNormStatistics:
    """What the normalising op takes: in training the batch's statistics, from ``partials``
    (the conv epilogue's) or a statistics pass over the 4-D x, updating the running ones in
    place when given; in eval the running statistics. The normalising op differentiates
    through the batch statistics itself, so these are computed from detached values."""
    weight, bias = _detached(weight), _detached(bias)
    if not training:
        return BatchNormStatistics(*ops.batch_norm_running_statistics(
            running_mean, running_var, weight, bias, eps))
    if partials is None:
        partials = WelfordPartials(*ops.batch_norm_welford_partials(x.detach()).unbind(0))
    return BatchNormStatistics(*ops.batch_norm_finalize(
        *partials, weight, bias, running_mean, running_var, momentum, eps))


def _normalize(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               stats: BatchNormStatistics, training: bool, relu: bool,
               pool: Optional[_FusedPool]) -> torch.Tensor:
    """(x - mean) * scale + shift of a 4-D x, then ReLU (``relu``), then ``pool`` (whose
    input, the normalised tensor, is never written)."""
    if pool is None:
        return ops.batch_norm(x, weight, bias, *stats, training, relu)
    if pool.is_max:
        keep_offsets = any(_records_grad(t) for t in (x, weight, bias) if t is not None)
        y, _ = ops.batch_norm_max_pool2d(x, weight, bias, *stats, training, relu,
                                         *ops.pool_window(pool.geometry), keep_offsets)
        return y
    return ops.batch_norm_avg_pool2d(x, weight, bias, *stats, training, relu,
                                     *_avg_window(pool.geometry), pool.count_include_pad,
                                     pool.divisor_override)


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
    if input.numel() != 0:  # torch answers an empty input (of any rank) before checking
        _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    if not _use_batch_norm_kernels(op, input):
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(y) if relu else y
    x = _as_4d(input)
    stats = _batch_norm_statistics(x, running_mean, running_var, weight, bias, bool(training),
                                   float(momentum), float(eps), partials)
    y = _normalize(x, weight, bias, stats, bool(training), relu, None)
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


def _batch_norm_pool(op: str, input: torch.Tensor, running_mean: Optional[torch.Tensor],
                     running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], training: bool, momentum: float, eps: float,
                     relu: bool, pool: _FusedPool,
                     torch_pool: Callable[[torch.Tensor], torch.Tensor],
                     partials: Optional[WelfordPartials]) -> torch.Tensor:
    if not _use_batch_norm_kernels(op, input):
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return torch_pool(F.relu(y) if relu else y)
    stats = _batch_norm_statistics(input, running_mean, running_var, weight, bias,
                                   bool(training), float(momentum), float(eps), partials)
    return _normalize(input, weight, bias, stats, bool(training), relu, pool)


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
    _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
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
    _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
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

class InPlaceReLUFunction(torch.autograd.Function):
    """An in-place ReLU that autograd records, in eager mode: ``fastarch::relu_`` writes x,
    which is marked dirty and saved as the output, so no second tensor is kept (as with
    torch.relu_). Mutable operators carry no autograd formula, so compiled code takes the
    out-of-place ``fastarch::relu`` and a copy instead, which Inductor fuses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ops.relu_(x)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        return ops.relu_grads(ctx, dy)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.relu on our kernel. Inputs neither contiguous nor channels_last
    run on a contiguous copy (and, in place, are written back from it)."""
    if not backend.use_triton("relu", input):
        return torch.relu_(input) if inplace else torch.relu(input)
    if inplace:
        _check_inplace(input)
    if relu_kernels.dense_format(input) is None:
        y = ops.relu(input.contiguous())
        return input.copy_(y) if inplace else y
    if not inplace:
        return ops.relu(input)
    if not _records_grad(input):
        ops.relu_(input)
        return input
    if torch.compiler.is_compiling():
        return input.copy_(ops.relu(input))
    return InPlaceReLUFunction.apply(input)


# ----------------------------------------------------------------------------- conv2d

ConvPadding = Union[str, int, Sequence[int]]


def _conv_pair(value: IntOrPair, name: str) -> tuple[int, int]:
    values = _ints(value, name, "conv2d")
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
    """torch's checks and error types: RuntimeError for shapes, devices and mixed dtypes.
    Dtypes we do not accelerate (integers, float64) go on to torch, which answers or raises."""
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
    if weight.shape[0] == 0 or 0 in weight.shape[2:]:
        raise RuntimeError(f"conv2d: expected weight with at least one output channel and a "
                           f"non-empty kernel, but got weight of size {list(weight.shape)}")
    if weight.shape[1] != x.shape[-3]:
        raise RuntimeError(f"conv2d: given groups=1, weight of size {list(weight.shape)}, "
                           f"expected input{list(x.shape)} to have {weight.shape[1]} channels, "
                           f"but got {x.shape[-3]} channels instead")
    _check_bias_shape(weight, bias)


def _check_bias_shape(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """torch's message for a bias that is not one value per output channel."""
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


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: IntOrPair = 1, padding: ConvPadding = 0, dilation: IntOrPair = 1,
           groups: int = 1) -> torch.Tensor:
    """torch.nn.functional.conv2d on our implicit-GEMM kernels; the output takes the input's
    memory format. groups > 1 runs torch's convolution (a counted fallback), as do float64 and
    integer inputs.
    Under torch.autocast the arguments are cast as torch would cast them."""
    input, weight, bias = _autocast_args(input, weight, bias)
    if groups != 1:
        backend.count_fallback("conv2d")
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    _check_conv_args(input, weight, bias)
    geometry = _conv_geometry(input, weight, stride, padding, dilation)
    if not backend.use_triton("conv2d", input):
        return F.conv2d(input, weight, bias, stride, padding, dilation)
    y, _ = ops.conv2d(_batched(input), weight, bias, None, None, *ops.conv_window(geometry),
                      False, False)
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
    y, partials = ops.conv2d(_batched(input), weight, bias, scale, shift,
                             *ops.conv_window(geometry), bool(relu), bool(stats))
    if not stats:
        return _unbatched_like(input, y), None
    return _unbatched_like(input, y), WelfordPartials(*partials.unbind(0))


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
    """torch's checks: ValueError out of [0, 1] (F.dropout's own), RuntimeError for NaN,
    which passes that comparison and is refused by the kernel's check."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if math.isnan(p):
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")


def _check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       op: str) -> None:
    """torch's error types: RuntimeError for shapes, devices and mixed dtypes. Dtypes we do not
    accelerate (integers, float64) go on to torch, which answers or raises."""
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
    if weight.shape[1] != x.shape[-1]:
        raise RuntimeError(f"{op}: input of size {list(x.shape)} has {x.shape[-1]} features "
                           f"but weight of size {list(weight.shape)} expects "
                           f"in_features={weight.shape[1]}")


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
    2-D (torch also takes 1-D), a bias that is not one value per output feature (torch
    broadcasts it: a single value, or one row per input row), float64 and integers run torch's
    implementation (a counted fallback); under torch.autocast the arguments are cast as torch
    would cast them."""
    _check_dropout_p(p)
    input, weight, bias = _autocast_args(input, weight, bias)
    p = float(p) if training else 0.0
    if weight.dim() != 2 or (bias is not None and tuple(bias.shape) != weight.shape[:1]):
        backend.count_fallback("linear")
        return _linear_torch(input, weight, bias, relu, p)
    _check_linear_args(input, weight, bias, "linear")
    if not backend.use_triton("linear", input):
        return _linear_torch(input, weight, bias, relu, p)
    seed = linear_kernels.new_seed(input.device) if p > 0 else None
    x2d = input.reshape(input.shape[:-1].numel(), input.shape[-1])
    y = ops.linear(x2d, weight, bias, bool(relu), p, seed)
    return y if input.dim() == 2 else y.view(*input.shape[:-1], weight.shape[0])


def linear(input: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.nn.functional.linear on our GEMM (see :func:`linear_relu_dropout`)."""
    return linear_relu_dropout(input, weight, bias, relu=False, p=0.0, training=False)


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
    if inplace:
        _check_inplace(input)
    seed = linear_kernels.new_seed(input.device)
    if not input.is_contiguous(memory_format=backend.memory_format_of(input)):
        y = ops.dropout(input.contiguous(), float(p), seed)
        return input.copy_(y) if inplace else y
    if not inplace:
        return ops.dropout(input, float(p), seed)
    if _records_grad(input):  # mutable operators carry no autograd formula: write a copy
        return input.copy_(ops.dropout(input, float(p), seed))
    ops.dropout_(input, float(p), seed)
    return input


# ----------------------------------------------------------------------------- sync batch norm

def _rank_partials(x: torch.Tensor) -> torch.Tensor:
    """This process's Welford partials of a 4-D x merged over its pixel tiles (Chan's
    formula): one [3, C] fp32 (count, mean, M2); zeros for an empty local batch."""
    channels = x.shape[1]
    if x.numel() == 0:
        return torch.zeros((3, channels), dtype=torch.float32, device=x.device)
    count, mean, m2 = ops.batch_norm_welford_partials(x.detach()).unbind(0)
    total = count.sum(0)
    merged_mean, variance = merge_welford_partials(count, mean, m2)
    return torch.stack([total, merged_mean, variance * total])


def _gather_partials(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every process's partials as [3, world, C]: tiles the finalize merges in rank order,
    so every process computes the same global statistics."""
    local = _rank_partials(x)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return torch.stack(gathered, dim=1)


@profiling.named("sync_batch_norm")
class SyncBatchNormFunction(torch.autograd.Function):
    """Training BatchNorm of a 4-D x over the batches of every process in ``group``: the
    statistics (and running-statistics update) are those of the global batch; backward
    all-reduces the per-channel sums of dy and dy * x_hat. dweight and dbias stay local, as
    in torch's SyncBatchNorm: DistributedDataParallel averages parameter gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], momentum: float, eps: float,
                group: dist.ProcessGroup) -> torch.Tensor:
        partials = _gather_partials(x, group)
        stats = BatchNormStatistics(*ops.batch_norm_finalize(
            *partials.unbind(0), _detached(weight), _detached(bias), running_mean,
            running_var, momentum, eps))
        ctx.group = group
        ctx.grad_dtypes = (None if weight is None else weight.dtype,
                           None if bias is None else bias.dtype)
        # The dx kernel averages the sums over its own N*H*W pixels; the share of them in
        # the global batch rescales the global sums to that.
        local_share = x.shape[0] * x.shape[2] * x.shape[3] / partials[0, :, 0].sum()
        ctx.save_for_backward(x, *stats, local_share)
        return ops.batch_norm(x, None, None, *stats, True, False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, mean, invstd, scale, shift, local_share = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xhat, dw, db = ops.batch_norm_backward_reduce(
            x, dy, mean, invstd, scale, shift, False,
            ctx.grad_dtypes[0] if need_dw else None, ctx.grad_dtypes[1] if need_db else None)
        dx = None
        if need_dx:  # every process takes part: each one's need_dx is the same
            sums = torch.stack([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            sums = sums * local_share
            dx = ops.batch_norm_backward_input(x, dy, mean, invstd, scale, shift, sums[0],
                                               sums[1], False)
        return (dx, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None)


def sync_batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                    running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], momentum: float, eps: float,
                    process_group: dist.ProcessGroup) -> torch.Tensor:
    """Training batch norm of an (N, C, ...) input over the global batch of
    ``process_group`` (gloo on the CPU under the interpreter, NCCL on CUDA): each process's
    Welford partials are all-gathered and merged with Chan's formula. float64 and devices
    without our kernels run torch's own SyncBatchNorm function (a counted fallback), which
    takes CUDA tensors only."""
    _check_batch_norm_args(input, running_mean, running_var, weight, bias, True, eps)
    if not backend.use_triton("sync_batch_norm", input):
        if input.device.type != "cuda":
            raise ValueError("SyncBatchNorm expected input tensor to be on GPU (or on the CPU "
                             "under TRITON_INTERPRET=1)")
        return torch.nn.modules._functions.SyncBatchNorm.apply(
            input, weight, bias, running_mean, running_var, eps, momentum, process_group,
            dist.get_world_size(process_group))
    y = SyncBatchNormFunction.apply(_as_4d(input), weight, bias, running_mean, running_var,
                                    float(momentum), float(eps), process_group)
    return y if input.dim() == 4 else y.view(input.shape)
