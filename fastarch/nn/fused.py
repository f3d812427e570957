"""Fused runs: Conv2d -> BatchNorm2d -> ReLU (-> MaxPool2d / AvgPool2d), Conv2d -> ReLU and
Linear -> ReLU (-> Dropout) run as few kernels as the mode allows, while every original module
(and so every parameter, buffer and state_dict key) stays where it was. ``walk`` finds them
in a list of modules; ``FusedSequential`` and ``ModuleChains`` (a model whose forward runs
lists of its children, LeNet-5's) run what it yields.

* Conv runs in training: the conv kernel writes its output and the BatchNorm Welford partials
  in its epilogue (no statistics pass), a tiny finalize turns them into the statistics and
  updates the running ones, and the normalisation + ReLU happens where the output is read
  next, never written:
  - another conv run follows: the run is a chain link (``fastarch::conv2d_chain``) and hands
    that run its output and differentiable batch statistics (``PendingBatchNorm``); the next
    conv applies the BatchNorm and ReLU to its input tiles as it loads them, its weight
    gradient recomputes them, and BatchNorm's backward folds into the next conv's dgrad
    epilogue and this conv's dgrad/wgrad prologues (``ops.conv2d_chain``);
  - a max pool follows: the link's statistics go to the pool, which normalises as it pools
    and folds BatchNorm's backward into its gather (``batch_norm_max_pool2d``, ``folded``);
  - a plain ``nn.Flatten()`` then a Linear (run): the Flatten is absorbed and the GEMM applies
    them to x.flatten(1) (``fastarch::batch_norm_linear``; a channels_last conv output with
    H * W > 1 is copied to NCHW first, flatten's order), its backward BatchNorm's passes;
  - an average pool: the pool normalises as it pools, backward BatchNorm's passes;
  - anything else (or nothing): one pass normalises + ReLUs, written.
* Conv runs in inference (running statistics, no gradient needed for the BatchNorm or conv
  bias): the BatchNorm and the conv bias fold into the conv epilogue as per-channel fp32
  scale and shift, with the ReLU: one kernel. The fold is recomputed at every call from the
  current parameters and running statistics (a few C-sized torch ops, captured by CUDA
  graphs and traced by torch.compile), so no write, through ``.data`` or otherwise, can
  leave it stale.
* Linear runs: one GEMM with the bias, the ReLU and (while the Dropout is in training, with
  its ``p``) the Philox dropout in its epilogue; backward applies the ReLU and dropout masks
  in the one pass that also sums the bias gradient. The ReLU and Dropout ``inplace`` flags
  change nothing: the fused run never exposes the tensor they would overwrite.

A run fuses only modules whose ``forward`` is known to compute what the fused kernels do:
each module's type must be exactly torch.nn's class or its ``fastarch.nn`` twin (a subclass,
a parametrized module — ``torch.nn.utils.parametrize`` makes its class a subclass — or an
instance with its own ``forward`` attribute runs as itself), and no module of the run may
carry a forward, forward pre-, backward or backward pre-hook, nor may any global module hook
of those kinds be registered (``weight_norm`` / ``spectral_norm`` are forward pre-hooks).
Such a run runs module by module, so every hook fires. State-dict hooks do not matter.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from fastarch import arguments, functional
from fastarch.ops import batch_norm as batch_norm_ops
from fastarch.ops import conv2d_chain as chain_ops
from fastarch.nn.activation import ReLU
from fastarch.nn.batchnorm import BatchNorm2d, batch_norm_mode, uses_batch_statistics
from fastarch.nn.conv import Conv2d
from fastarch.nn.dropout import Dropout
from fastarch.nn.linear import Linear
from fastarch.nn.pooling import AvgPool2d, MaxPool2d

Pool = Union[nn.MaxPool2d, nn.AvgPool2d]

# The exact types a run is made of: torch.nn's classes and their fastarch.nn twins, which
# override nothing but the kernels ``forward`` runs.
_CONVS = (nn.Conv2d, Conv2d)
_BATCH_NORMS = (nn.BatchNorm2d, BatchNorm2d)
_RELUS = (nn.ReLU, ReLU)
_POOLS = (nn.MaxPool2d, MaxPool2d, nn.AvgPool2d, AvgPool2d)
_LINEARS = (nn.Linear, Linear)
_DROPOUTS = (nn.Dropout, Dropout)
_FLATTENS = (nn.Flatten,)


class Run:
    """A fusable run of ``length`` modules; calling it on an input runs them fused."""
    length: int


class PendingBatchNorm(NamedTuple):
    """A conv run's output ``y`` before its BatchNorm (batch statistics, ``partials`` from
    the conv epilogue) and ReLU, handed to the conv run that follows, or to the Linear (run)
    after a flatten: that conv or linear normalises its input as it loads it. Before a conv,
    y was written by a chain link (``ops.conv2d_chain``), which ran the BatchNorm's forward
    (its mode, counting the batch, and the running statistics' update) and gave y's
    differentiable ``statistics`` (mean, invstd); before a linear, ``statistics`` is None
    and the BatchNorm's forward runs in the linear's op, once."""
    y: torch.Tensor
    bn: nn.BatchNorm2d
    partials: functional.WelfordPartials
    statistics: Optional[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ConvRun(Run):
    """conv (-> bn) -> relu (-> pool), executed as one fused block by calling it."""
    conv: nn.Conv2d
    bn: Optional[nn.BatchNorm2d]
    pool: Optional[Pool]
    length: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _run_conv(self, x)


@dataclass(frozen=True)
class LinearRun(Run):
    """linear -> relu (-> dropout) as one GEMM, executed by calling it."""
    linear: nn.Linear
    dropout: Optional[nn.Dropout]
    length: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dropout = self.dropout
        return functional.linear_relu_dropout(
            x, self.linear.weight, self.linear.bias, relu=True,
            p=0.0 if dropout is None else dropout.p,
            training=dropout is not None and dropout.training)


def walk(modules: Sequence[nn.Module]) -> Iterator[tuple[int, Union[Run, nn.Module]]]:
    """``modules`` as they execute, in order: each fusable run (at this call: see the module
    docstring) as one ``Run``, every other module as itself, each with the index of its first
    module. Both are called on the input."""
    index = 0
    while index < len(modules):
        run = match_run(modules, index)
        yield index, modules[index] if run is None else run
        index += 1 if run is None else run.length


def run_fused(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``modules`` applied in order to ``x``, their fusable runs fused; a conv run followed
    directly by another, or by a flatten and a linear (run), hands it a ``PendingBatchNorm``
    where it can (``_run_conv``): the flatten is absorbed, the linear flattens as it loads."""
    steps = [step for _, step in walk(modules)]
    for index, step in enumerate(steps):
        if isinstance(x, PendingBatchNorm) and _is_flatten(step):
            continue
        if isinstance(step, ConvRun):
            x = _run_conv(step, x, hand_on=_pending_taker(steps[index + 1:index + 3]))
        elif isinstance(x, PendingBatchNorm):
            x = _batch_norm_linear(step, x)
        else:
            x = step(x)
    return x


def _pending_taker(following: Sequence[Union[Run, nn.Module]]) -> Optional[str]:
    """What among the steps after a conv run can take its ``PendingBatchNorm``: "conv" (a
    conv run), "linear" (a plain ``nn.Flatten()`` then a linear run or a plain Linear), or
    None."""
    if following and isinstance(following[0], ConvRun):
        return "conv"
    if (len(following) == 2 and _is_flatten(following[0])
            and (isinstance(following[1], LinearRun) or _plain(following[1], _LINEARS))):
        return "linear"
    return None


def _is_flatten(step: Union[Run, nn.Module]) -> bool:
    """A plain flatten of every dimension after the batch one: ``nn.Flatten()``."""
    return _plain(step, _FLATTENS) and step.start_dim == 1 and step.end_dim == -1


def match_run(modules: Sequence[nn.Module], start: int) -> Optional[Run]:
    """The fusable run beginning at ``modules[start]``, if any (see the module docstring for
    which modules may take part)."""
    if _global_hooks_registered():
        return None
    first = modules[start]
    if _plain(first, _CONVS) and first.groups == 1 and first.padding_mode == "zeros":
        return _match_conv_run(first, modules[start + 1:start + 4])
    if _plain(first, _LINEARS):
        return _match_linear_run(first, modules[start + 1:start + 3])
    return None


def _match_conv_run(conv: nn.Conv2d, rest: Sequence[nn.Module]) -> Optional[ConvRun]:
    bn = rest[0] if rest and _plain(rest[0], _BATCH_NORMS) \
        and rest[0].num_features == conv.out_channels else None
    after_bn = rest[1:] if bn is not None else rest
    if not after_bn or not _plain(after_bn[0], _RELUS):
        return None
    if bn is None:
        return ConvRun(conv, None, None, 2)
    pool = after_bn[1] if len(after_bn) > 1 and _fusable_pool(after_bn[1]) else None
    return ConvRun(conv, bn, pool, 4 if pool is not None else 3)


def _match_linear_run(linear: nn.Linear, rest: Sequence[nn.Module]) -> Optional[LinearRun]:
    if not rest or not _plain(rest[0], _RELUS):
        return None
    dropout = rest[1] if len(rest) > 1 and _plain(rest[1], _DROPOUTS) else None
    return LinearRun(linear, dropout, 3 if dropout is not None else 2)


def _fusable_pool(module: nn.Module) -> bool:
    return _plain(module, _POOLS) and not getattr(module, "return_indices", False)


def _plain(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """``module`` is exactly one of ``types``, with no forward of its own and no hook."""
    return type(module) in types and "forward" not in module.__dict__ and not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks)


def _global_hooks_registered() -> bool:
    """Whether a hook registered for every module (``nn.modules.module.register_module_*``)
    would fire: then every module must run as itself."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)


def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm (and the conv bias before it) folded into the conv epilogue,
    from the current values: scale = gamma / sqrt(running_var + eps),
    shift = beta - (running_mean - bias) * scale, fp32 [C]. Called only where nothing
    folded needs a gradient (``_can_fold``); forward-mode tangents flow through."""
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    mean = bn.running_mean.float()
    if conv.bias is not None:
        mean = mean - conv.bias.float()
    if bn.bias is None:
        return scale, -mean * scale
    return scale, torch.addcmul(bn.bias.float(), mean, scale, value=-1)


def _conv_args(conv: nn.Conv2d) -> tuple:
    return conv.stride, conv.padding, conv.dilation


def _can_fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    """Eval with running statistics, and nothing that folding would hide needs a gradient."""
    if uses_batch_statistics(bn):
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in (conv.bias, bn.weight, bn.bias))


def _pool(pool: Optional[Pool], y: torch.Tensor) -> torch.Tensor:
    if pool is None:
        return y
    if isinstance(pool, nn.MaxPool2d):
        return functional.max_pool2d(y, pool.kernel_size, pool.stride, pool.padding,
                                     pool.dilation, pool.ceil_mode)
    return functional.avg_pool2d(y, pool.kernel_size, pool.stride, pool.padding,
                                 pool.ceil_mode, pool.count_include_pad, pool.divisor_override)


def _max_pool_folded(bn: nn.BatchNorm2d, pool: nn.MaxPool2d, y: torch.Tensor,
                     statistics: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """BatchNorm, ReLU and the max pool in one pass over a chain link's output y, with its
    differentiable batch ``statistics``: the pool's backward folds BatchNorm's."""
    geometry = arguments.pool_geometry("max_pool2d", y, pool.kernel_size, pool.stride,
                                       pool.padding, pool.dilation, pool.ceil_mode)
    return batch_norm_ops.normalize_folded(y, statistics, bn.weight, bn.bias, True,
                                           batch_norm_ops.FusedPool(geometry, is_max=True))


def _batch_norm_relu_pool(bn: nn.BatchNorm2d, pool: Optional[Pool], y: torch.Tensor,
                          partials: Optional[functional.WelfordPartials]) -> torch.Tensor:
    """BatchNorm (batch or running statistics, exactly as nn.BatchNorm2d.forward chooses),
    ReLU and the pool in one pass; ``partials`` are y's statistics from the conv epilogue."""
    bn._check_input_dim(y)
    mode = batch_norm_mode(bn)
    args = (y, mode.running_mean, mode.running_var, bn.weight, bn.bias, mode.training,
            mode.momentum, bn.eps)
    if isinstance(pool, nn.MaxPool2d):
        return functional.batch_norm_max_pool2d(
            *args, relu=True, kernel_size=pool.kernel_size, stride=pool.stride,
            padding=pool.padding, dilation=pool.dilation, ceil_mode=pool.ceil_mode,
            partials=partials)
    if isinstance(pool, nn.AvgPool2d):
        return functional.batch_norm_avg_pool2d(
            *args, relu=True, kernel_size=pool.kernel_size, stride=pool.stride,
            padding=pool.padding, ceil_mode=pool.ceil_mode,
            count_include_pad=pool.count_include_pad, divisor_override=pool.divisor_override,
            partials=partials)
    return functional.batch_norm_relu(*args, partials=partials)


def _run_conv(run: ConvRun, x: Union[torch.Tensor, PendingBatchNorm],
              hand_on: Optional[str] = None) -> Union[torch.Tensor, PendingBatchNorm]:
    """Execute one conv run on ``x`` (see the module docstring for what fuses when); with
    ``hand_on`` (what follows can take it: ``_pending_taker``) a run without a pool whose
    BatchNorm uses batch statistics, on our kernels, returns its ``PendingBatchNorm``, as a
    chain link when a conv takes it."""
    conv, bn = run.conv, run.bn
    if bn is None:
        y, _, _ = _conv2d(conv, x, conv.bias, relu=True)
        return y
    if _can_fold(conv, bn):
        scale, shift = fold_batch_norm(conv, bn)
        y, _, _ = _conv2d(conv, x, None, scale=scale, shift=shift, relu=True)
        return _pool(run.pool, y)
    batch_statistics = uses_batch_statistics(bn)
    kernels = chain_ops.runs_kernels(x.y if isinstance(x, PendingBatchNorm) else x)
    taker = hand_on if run.pool is None and batch_statistics and kernels else None
    if taker == "linear":  # its op runs the BatchNorm's forward (``_batch_norm_linear``)
        y, partials, _ = _conv2d(conv, x, conv.bias, stats=True)
        return PendingBatchNorm(y, bn, partials, None)
    link = taker == "conv" or (isinstance(run.pool, nn.MaxPool2d) and batch_statistics
                               and kernels)
    if not link:
        y, partials, _ = _conv2d(conv, x, conv.bias, stats=batch_statistics)
        return _batch_norm_relu_pool(bn, run.pool, y, partials)
    # A chain link: this BatchNorm's forward (its mode, counting the batch, and the running
    # statistics' update) runs here, in the link's finalize.
    mode = batch_norm_mode(bn)
    y, partials, statistics = _conv2d(
        conv, x, conv.bias, stats=True,
        output_batch_norm=chain_ops.ChainOutput(mode.running_mean, mode.running_var,
                                                mode.momentum, bn.eps, bn.weight, bn.bias))
    if run.pool is None:
        return PendingBatchNorm(y, bn, partials, statistics)
    return _max_pool_folded(bn, run.pool, y, statistics)


def _conv2d(conv: nn.Conv2d, x: Union[torch.Tensor, PendingBatchNorm],
            bias: Optional[torch.Tensor],
            output_batch_norm: Optional[chain_ops.ChainOutput] = None, **epilogue
            ) -> tuple[torch.Tensor, Optional[functional.WelfordPartials],
                       Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """``conv`` with the fused ``epilogue`` on x, or on the pending BatchNorm's output,
    normalised and ReLU'd as the conv loads it: then, or with ``output_batch_norm``, a
    chain link (``ops.conv2d_chain``), which then also returns its output's differentiable
    batch statistics."""
    if not isinstance(x, PendingBatchNorm) and output_batch_norm is None:
        y, partials = functional.conv2d_fused(x, conv.weight, bias, *_conv_args(conv),
                                              **epilogue)
        return y, partials, None
    input_batch_norm = None
    if isinstance(x, PendingBatchNorm):
        x, input_batch_norm = x.y, _take_statistics(x)
    return chain_ops.forward(x, input_batch_norm, conv.weight, bias, *_conv_args(conv),
                             output_batch_norm=output_batch_norm, **epilogue)


def _take_statistics(pending: PendingBatchNorm) -> chain_ops.ChainInput:
    """What a link normalises the pending BatchNorm's output with (its forward ran in the
    link that wrote it)."""
    return chain_ops.ChainInput(*pending.statistics, pending.bn.weight, pending.bn.bias, True)


def _batch_norm_linear(step: Union[LinearRun, nn.Linear], x: PendingBatchNorm) -> torch.Tensor:
    """The linear (run) ``step`` on the pending BatchNorm's output, ReLU'd and flattened as
    the GEMM loads it."""
    linear, dropout = (step.linear, step.dropout) if isinstance(step, LinearRun) else (step, None)
    bn = x.bn
    bn._check_input_dim(x.y)
    mode = batch_norm_mode(bn)
    return functional.batch_norm_linear_fused(
        x.y, mode.running_mean, mode.running_var, bn.weight, bn.bias, mode.training,
        mode.momentum, bn.eps, weight=linear.weight, bias=linear.bias,
        relu=isinstance(step, LinearRun),
        p=dropout.p if dropout is not None and dropout.training else 0.0, partials=x.partials)


class FusedSequential(nn.Sequential):
    """nn.Sequential that runs the fusable runs ``walk`` finds at this call fused; everything
    else runs module by module. Same children, same keys."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return run_fused(list(self._modules.values()), input)


class ModuleChains(nn.Module):
    """A module whose forward runs ``chains`` of its children (each a tuple of child names,
    applied in order) through ``run_chain``: their fusable runs fused while ``fused``, else
    module by module. ``fastarch.fusion.fuse`` / ``unfuse`` set ``fused``."""
    chains: tuple[tuple[str, ...], ...] = ()

    def __init__(self, *, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused

    def run_chain(self, chain: int, x: torch.Tensor) -> torch.Tensor:
        modules = [self.get_submodule(name) for name in self.chains[chain]]
        if self.fused:
            return run_fused(modules, x)
        for module in modules:
            x = module(x)
        return x


class ConvBatchNormReLU(FusedSequential):
    """Conv2d -> BatchNorm2d -> ReLU (-> ``pool``) as one fused block, keyed like
    torchvision's Conv2dNormActivation (``0.weight``, ``1.running_mean``, ...)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = False, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, pool: Optional[Pool] = None,
                 device=None, dtype=None) -> None:
        layers: list[nn.Module] = [
            Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias,
                   device=device, dtype=dtype),
            BatchNorm2d(out_channels, eps, momentum, device=device, dtype=dtype),
            ReLU(inplace=True),
        ]
        if pool is not None:
            layers.append(pool)
        super().__init__(*layers)
