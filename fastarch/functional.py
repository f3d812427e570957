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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastarch import arguments, backend, ops, profiling
from fastarch.arguments import ConvPadding, IntOrPair
from fastarch.kernels import linear as linear_kernels
from fastarch.kernels import relu as relu_kernels
from fastarch.kernels.batch_norm import BatchNormStatistics
from fastarch.kernels.conv2d_forward import WelfordPartials, merge_welford_partials
from fastarch.kernels.pool_tile import PoolGeometry

# ----------------------------------------------------------------------------- max pool

def max_pool2d(input: torch.Tensor, kernel_size: IntOrPair, stride: Optional[IntOrPair] = None,
               padding: IntOrPair = 0, dilation: IntOrPair = 1, ceil_mode: bool = False,
               return_indices: bool = False):
    """torch.nn.functional.max_pool2d on our kernels; int64 indices only when asked for."""
    arguments.check_pool_input(input, "max_pool2d")
    geometry = arguments.pool_geometry("max_pool2d", input, kernel_size, stride, padding, dilation,
                              ceil_mode)
    if not backend.use_triton("max_pool2d", input):
        return F.max_pool2d(input, kernel_size, stride, padding, dilation,
                            ceil_mode=ceil_mode, return_indices=return_indices)
    y, _, indices = ops.max_pool2d(arguments.batched(input), *ops.pool_window(geometry),
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
    geometry = arguments.pool_geometry("avg_pool2d", input, kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None and divisor_override == 0:
        raise RuntimeError("avg_pool2d: divisor_override must be non-zero")
    if not backend.use_triton("avg_pool2d", input):
        return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                            divisor_override)
    y = ops.avg_pool2d(arguments.batched(input), *_avg_window(geometry), bool(count_include_pad),
                       divisor_override)
    return arguments.unbatched_like(input, y)


def _avg_window(geometry: PoolGeometry) -> tuple:
    """An average pool's window as op arguments: kernel, stride, padding, ceil_mode."""
    kernel, stride, padding, _, ceil_mode = ops.pool_window(geometry)
    return kernel, stride, padding, ceil_mode


# ----------------------------------------------------------------------------- adaptive avg pool


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
    size = arguments.adaptive_output_size(input, output_size)
    if 0 in input.shape[-2:]:  # torch takes an empty batch or channel dimension
        raise RuntimeError("adaptive_avg_pool2d(): expected input to have non-zero size for "
                           f"non-batch dimensions, but got shape {list(input.shape)}")
    if not backend.use_triton("adaptive_avg_pool2d", input):
        return F.adaptive_avg_pool2d(input, size)
    if tuple(input.shape[-2:]) == size:
        return input
    if 0 in size:
        return input.new_empty((*input.shape[:-2], *size))
    y = ops.adaptive_avg_pool2d(arguments.batched(input), list(size))
    return arguments.unbatched_like(input, y)


# ----------------------------------------------------------------------------- batch norm


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
        keep_offsets = any(arguments.records_grad(t) for t in (x, weight, bias) if t is not None)
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
        arguments.check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    if not _use_batch_norm_kernels(op, input):
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(y) if relu else y
    x = arguments.as_4d(input)
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
    arguments.check_batch_norm_pool_input(input, "batch_norm_max_pool2d")
    arguments.check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    arguments.check_pool_input(input, "max_pool2d")
    geometry = arguments.pool_geometry("max_pool2d", input, kernel_size, stride, padding, dilation,
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
    arguments.check_batch_norm_pool_input(input, "batch_norm_avg_pool2d")
    arguments.check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    arguments.check_pool_input(input, "avg_pool2d")
    geometry = arguments.pool_geometry("avg_pool2d", input, kernel_size, stride, padding, 1, ceil_mode)
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
        arguments.check_inplace(input)
    if relu_kernels.dense_format(input) is None:
        y = ops.relu(input.contiguous())
        return input.copy_(y) if inplace else y
    if not inplace:
        return ops.relu(input)
    if not arguments.records_grad(input):
        ops.relu_(input)
        return input
    if torch.compiler.is_compiling():
        return input.copy_(ops.relu(input))
    return InPlaceReLUFunction.apply(input)


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
    y, _ = ops.conv2d(arguments.batched(input), weight, bias, None, None, *ops.conv_window(geometry),
                      False, False)
    return arguments.unbatched_like(input, y)


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
    input, weight, bias = arguments.autocast_args(input, weight, bias)
    arguments.check_conv_args(input, weight, bias)
    arguments.check_scale_shift(input, weight, scale, shift)
    geometry = arguments.conv_geometry(input, weight, stride, padding, dilation)
    if not backend.use_triton("conv2d_fused", input):
        return _conv2d_fused_torch(input, weight, bias, stride, padding, dilation, scale, shift,
                                   relu, stats)
    y, partials = ops.conv2d(arguments.batched(input), weight, bias, scale, shift,
                             *ops.conv_window(geometry), bool(relu), bool(stats))
    if not stats:
        return arguments.unbatched_like(input, y), None
    return arguments.unbatched_like(input, y), WelfordPartials(*partials.unbind(0))


def _conv2d_fused_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        stride: IntOrPair, padding: ConvPadding, dilation: IntOrPair,
                        scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                        relu: bool, stats: bool) -> tuple[torch.Tensor, Optional[WelfordPartials]]:
    """The fallback: torch's conv2d, then the epilogue as torch ops; the partials are one
    tile holding the whole output."""
    y = F.conv2d(arguments.batched(x), weight, bias, stride, padding, dilation)
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
    return arguments.unbatched_like(x, y), partials


# ----------------------------------------------------------------------------- linear, dropout


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
    arguments.check_dropout_p(p)
    input, weight, bias = arguments.autocast_args(input, weight, bias)
    p = float(p) if training else 0.0
    if weight.dim() != 2 or (bias is not None and tuple(bias.shape) != weight.shape[:1]):
        backend.count_fallback("linear")
        return _linear_torch(input, weight, bias, relu, p)
    arguments.check_linear_args(input, weight, bias, "linear")
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
    seed = linear_kernels.new_seed(input.device)
    if not input.is_contiguous(memory_format=backend.memory_format_of(input)):
        y = ops.dropout(input.contiguous(), float(p), seed)
        return input.copy_(y) if inplace else y
    if not inplace:
        return ops.dropout(input, float(p), seed)
    if arguments.records_grad(input):  # mutable operators carry no autograd formula: write a copy
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
    arguments.check_batch_norm_args(input, running_mean, running_var, weight, bias, True, eps)
    if not backend.use_triton("sync_batch_norm", input):
        if input.device.type != "cuda":
            raise ValueError("SyncBatchNorm expected input tensor to be on GPU (or on the CPU "
                             "under TRITON_INTERPRET=1)")
        return torch.nn.modules._functions.SyncBatchNorm.apply(
            input, weight, bias, running_mean, running_var, eps, momentum, process_group,
            dist.get_world_size(process_group))
    y = SyncBatchNormFunction.apply(arguments.as_4d(input), weight, bias, running_mean, running_var,
                                    float(momentum), float(eps), process_group)
    return y if input.dim() == 4 else y.view(input.shape)
