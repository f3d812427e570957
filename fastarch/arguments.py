"""Every argument check of the functional API, in one place: torch.nn.functional's error
types and messages, all raised before any kernel runs or any argument (running statistics,
an in-place input) is written; and the small conversions the checks share (int pairs,
window geometry, batched views, autocast)."""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Optional, Union

import torch

from fastarch.kernels.conv2d import ConvGeometry
from fastarch.kernels.pool_geometry import PoolGeometry

IntOrPair = Union[int, Sequence[int]]
ConvPadding = Union[str, int, Sequence[int]]


def ints(value: IntOrPair, name: str, op: str) -> tuple[int, ...]:
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


def pair(value: IntOrPair, name: str, op: str) -> tuple[int, int]:
    values = ints(value, name, op)
    if len(values) not in (1, 2):
        raise RuntimeError(f"{op}: {name} must either be a single int, or a tuple of two ints")
    return values[0], values[-1]


def check_pool_input(x: torch.Tensor, op: str) -> None:
    if x.dim() < 3 and op == "avg_pool2d":  # torch indexes dim -3 before it checks
        raise IndexError(f"{op}: expected a 3D or 4D (batch mode) tensor for input, but got "
                         f"shape {list(x.shape)}")
    if x.dim() not in (3, 4) or any(size == 0 for size in x.shape[-3:]):
        raise RuntimeError(f"{op}: expected a non-empty 3D or 4D (batch mode) tensor for "
                           f"input, with optional 0 batch size, but got shape {list(x.shape)}")


def pool_geometry(op: str, x: torch.Tensor, kernel_size: IntOrPair,
                   stride: Optional[IntOrPair], padding: IntOrPair, dilation: IntOrPair,
                   ceil_mode: bool) -> PoolGeometry:
    kernel = pair(kernel_size, "kernel_size", op)
    steps = kernel if stride is None or (isinstance(stride, Sequence) and len(stride) == 0) \
        else pair(stride, "stride", op)
    pads = pair(padding, "padding", op)
    dilations = pair(dilation, "dilation", op)
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


def batched(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 4 else x.unsqueeze(0)


def unbatched_like(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 4 else y.squeeze(0)


def records_grad(x: torch.Tensor) -> bool:
    """Whether autograd records an op on x (what decides the tensors kept for backward)."""
    return torch.is_grad_enabled() and x.requires_grad


def check_inplace(x: torch.Tensor) -> None:
    """Before an in-place kernel writes x: raise torch's own error where torch refuses to
    write x in place (a leaf that requires grad, a view of one, a view autograd cannot
    rebase, an inference tensor outside inference mode). For every x that may be refused,
    ``x.copy_(x)`` runs torch's in-place checks and copies nothing; where torch accepts, it
    records an identity. Not traced: under torch.compile, autograd's checks run on the
    captured graph's in-place ops."""
    if torch.compiler.is_compiling():
        return
    outside_inference = x.is_inference() and not torch.is_inference_mode_enabled()
    if outside_inference or (records_grad(x) and (x.is_leaf or x._is_view())):
        x.copy_(x)


def check_divisor_override(divisor_override: Optional[int]) -> None:
    if divisor_override is not None and divisor_override == 0:
        raise RuntimeError("avg_pool2d: divisor_override must be non-zero")


def adaptive_output_size(x: torch.Tensor,
                          output_size: Union[int, None, Sequence[Optional[int]]]
                          ) -> tuple[int, int]:
    """torch's checks of adaptive_avg_pool2d's input and output size, in its order; the
    output size with each None resolved to the input's."""
    if not isinstance(output_size, int) and output_size is not None \
            and x.dim() <= len(output_size):  # torch's own check, with its error type
        raise ValueError(f"adaptive_avg_pool2d(): expected a 3D or 4D tensor for input, but "
                         f"got shape {list(x.shape)} for output_size {output_size}")
    if x.dim() not in (3, 4):
        raise RuntimeError("adaptive_avg_pool2d(): expected a 3D or 4D tensor for input, but "
                           f"got shape {list(x.shape)}")
    sizes = (output_size, output_size) if output_size is None or isinstance(output_size, int) \
        else tuple(output_size)
    if len(sizes) != 2:
        raise RuntimeError("adaptive_avg_pool2d: output_size must be 2")
    resolved = tuple(x.shape[-2 + axis] if size is None else int(size)
                     for axis, size in enumerate(sizes))
    if min(resolved) < 0:
        raise RuntimeError("adaptive_avg_pool2d: elements of output_size must be greater than "
                           f"or equal to 0 but received {resolved}")
    if 0 in x.shape[-2:]:  # torch takes an empty batch or channel dimension
        raise RuntimeError("adaptive_avg_pool2d(): expected input to have non-zero size for "
                           f"non-batch dimensions, but got shape {list(x.shape)}")
    return resolved


def check_batch_norm_args(x: torch.Tensor, running_mean: Optional[torch.Tensor],
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
    check_batch_norm_dtypes(x, given)
    if training and x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{x.size()}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_batch_norm_dtypes(x: torch.Tensor, given: dict[str, torch.Tensor]) -> None:
    """torch's rule: the running statistics, weight and bias all in the input's dtype or, for
    a float16/bfloat16 input, all in float32."""
    mixed = x.dtype in (torch.float16, torch.bfloat16) and \
        any(t.dtype == torch.float32 for t in given.values())
    expected = torch.float32 if mixed else x.dtype
    for name, t in given.items():
        if t.dtype != expected:
            raise RuntimeError(f"batch_norm: mixed dtype: expected {name} to have scalar type "
                               f"{expected}, but got {t.dtype}")


def as_4d(x: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) as a 4-D view (N, C, H, W) the kernels take."""
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() == 3:
        return x.unsqueeze(-1)
    return x if x.dim() == 4 else x.flatten(2, -2)


def check_batch_norm_pool_input(input: torch.Tensor, op: str) -> None:
    if input.dim() != 4:
        raise RuntimeError(f"{op}: expected a 4D (N, C, H, W) input, but got shape "
                           f"{list(input.shape)}")


def conv_pair(value: IntOrPair, name: str) -> tuple[int, int]:
    values = ints(value, name, "conv2d")
    if len(values) not in (1, 2):
        raise RuntimeError(f"conv2d: expected {name} to be a single integer value or a list of "
                           f"2 values to match the convolution dimensions, but got "
                           f"{name}={list(values)}")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def conv_padding(padding: ConvPadding, kernel: tuple[int, int], strides: tuple[int, int],
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
    pads = conv_pair(padding, "padding")
    if min(pads) < 0:
        raise RuntimeError(f"conv2d: negative padding is not supported, but got padding={pads}")
    return pads, pads


def conv_geometry(x: torch.Tensor, weight: torch.Tensor, stride: IntOrPair,
                   padding: ConvPadding, dilation: IntOrPair) -> ConvGeometry:
    kernel = (weight.shape[2], weight.shape[3])
    strides = conv_pair(stride, "stride")
    dilations = conv_pair(dilation, "dilation")
    if min(strides) <= 0:
        raise RuntimeError(f"conv2d: non-positive stride is not supported, got {strides}")
    if min(dilations) <= 0:
        raise RuntimeError(f"conv2d: non-positive dilation is not supported, got {dilations}")
    begin, end = conv_padding(padding, kernel, strides, dilations)
    padded = [size + b + e for size, b, e in zip(x.shape[-2:], begin, end)]
    effective = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    if padded[0] < effective[0] or padded[1] < effective[1]:
        raise RuntimeError(f"conv2d: calculated padded input size per channel: ({padded[0]} x "
                           f"{padded[1]}). Kernel size: ({effective[0]} x {effective[1]}). "
                           "Kernel size can't be greater than actual input size")
    return ConvGeometry(kernel, strides, begin, dilations, end if end != begin else None)


def check_conv_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
                     ) -> None:
    """torch's checks and error types: RuntimeError for shapes, devices and mixed dtypes.
    Dtypes we do not accelerate (integers, float64) go on to torch, which answers or raises."""
    if x.dim() not in (3, 4):
        raise RuntimeError("conv2d: expected 3D (unbatched) or 4D (batched) input, but got "
                           f"input of size: {list(x.shape)}")
    if weight.dim() != 4:
        raise RuntimeError("conv2d: expected a 4D weight [out_channels, in_channels, kH, kW], "
                           f"but got weight of size {list(weight.shape)}")
    check_weight_and_bias("conv2d", x, weight, bias)
    if weight.shape[0] == 0 or 0 in weight.shape[2:]:
        raise RuntimeError(f"conv2d: expected weight with at least one output channel and a "
                           f"non-empty kernel, but got weight of size {list(weight.shape)}")
    if weight.shape[1] != x.shape[-3]:
        raise RuntimeError(f"conv2d: given groups=1, weight of size {list(weight.shape)}, "
                           f"expected input{list(x.shape)} to have {weight.shape[1]} channels, "
                           f"but got {x.shape[-3]} channels instead")
    check_bias_shape(weight, bias)


def check_bias_shape(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """torch's message for a bias that is not one value per output channel."""
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"conv2d: given weight of size {list(weight.shape)}, expected bias "
                           f"to be 1-dimensional with {weight.shape[0]} elements, but got bias "
                           f"of size {list(bias.shape)} instead")


def check_scale_shift(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
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


def autocast_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
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


def check_dropout_p(p: float) -> None:
    """torch's checks: ValueError out of [0, 1] (F.dropout's own), RuntimeError for NaN,
    which passes that comparison and is refused by the kernel's check."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if math.isnan(p):
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")


def check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       op: str) -> None:
    """torch's error types: RuntimeError for shapes, devices and mixed dtypes. Dtypes we do not
    accelerate (integers, float64) go on to torch, which answers or raises."""
    if x.dim() == 0:
        raise RuntimeError(f"{op}: expected input with at least one dimension, but got a 0-D "
                           "tensor")
    check_weight_and_bias(op, x, weight, bias)
    if weight.shape[1] != x.shape[-1]:
        raise RuntimeError(f"{op}: input of size {list(x.shape)} has {x.shape[-1]} features "
                           f"but weight of size {list(weight.shape)} expects "
                           f"in_features={weight.shape[1]}")


def check_weight_and_bias(op: str, x: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> None:
    """torch's RuntimeError for a weight or bias on another device or of another dtype than
    the input."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: expected {name} on the input's device {x.device}, but "
                               f"got {name} on {t.device}")
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(f"{op}: input dtype {x.dtype} and {name} dtype {t.dtype} "
                               "should be the same")


def check_batch_norm_pool_args(op: str, pool_op: str, input: torch.Tensor,
                              running_mean: Optional[torch.Tensor],
                              running_var: Optional[torch.Tensor],
                              weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              training: bool, eps: float) -> None:
    """The checks of BatchNorm fused into ``pool_op``, torch's pool's last."""
    check_batch_norm_pool_input(input, op)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    check_pool_input(input, pool_op)
