"""The functional API and the autograd Functions behind it.

Each op takes torch.nn.functional's exact arguments, validates them with torch's error types
and messages, and runs our Triton kernel when ``fastarch.backend`` says the input's device
runs Triton (CUDA, or CPU under TRITON_INTERPRET=1). Otherwise, and for dtypes we do not
accelerate (float64), it calls torch's own implementation: the documented fallback.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F

from fastarch import backend
from fastarch.kernels import avg_pool as avg_pool_kernels
from fastarch.kernels import max_pool as max_pool_kernels
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
