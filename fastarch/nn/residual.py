"""Residual blocks run fused: torchvision's ResNet BasicBlock (conv1 -> bn1 -> relu -> conv2
-> bn2, + identity, relu) and Bottleneck (with conv3 -> bn3 last), the identity taken
through ``downsample`` (a 1x1 conv -> BatchNorm Sequential) where the shape changes.
``ResidualBlock`` is what both subclass (``fastarch.models.resnet``); its fused forward is
``run_residual_block``, which every block's conv / BatchNorm pairs go through:

* each pair but the last, with the ReLU: a ``ConvRun``, as in a Sequential (inference: one
  conv with the BatchNorm folded and the ReLU in its epilogue; training: the conv writes
  the Welford partials in its epilogue, a finalize, one normalise + ReLU pass);
* ``downsample``: ``conv_batch_norm``, the same without ReLU (inference: one kernel);
* the last pair, the add and the ReLU: ``conv_batch_norm_add_relu``: inference folds the
  BatchNorm into the conv, whose epilogue adds the identity in fp32 and ReLUs: one kernel;
  training runs the conv (its partials in the epilogue), a finalize of the batch's
  statistics, then one pass that normalises, adds the identity in fp32 and ReLUs.

A block runs fused only where every module of it would fuse in a Sequential (exact
torch.nn / fastarch.nn types, no hooks, no global hooks: ``fastarch.nn.fused``), its convs
ungrouped with zero padding and its downsample a plain (conv, BatchNorm) Sequential;
otherwise, or with ``fused`` off, it runs torchvision's forward module by module.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from fastarch import functional
from fastarch.nn.batchnorm import batch_norm_mode, uses_batch_statistics
from fastarch.nn.fused import (_BATCH_NORMS, _CONVS, _RELUS, ConvRun, FusedSequential,
                               ModuleChains, _can_fold, _conv_args, _global_hooks_registered,
                               _plain, fold_batch_norm)

ConvBatchNorm = tuple[nn.Conv2d, nn.BatchNorm2d]


class ResidualBlock(ModuleChains):
    """A residual block with torchvision's attribute names: ``pairs`` names its (conv,
    BatchNorm) children in order, ``relu`` the ReLU after each pair, ``downsample`` the
    identity's (conv, BatchNorm) Sequential or None. Runs fused (``run_residual_block``)
    while ``fused`` and every module allows it, else as torchvision's forward."""
    pairs: tuple[tuple[str, str], ...] = ()
    downsample: Optional[nn.Module]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = [(self.get_submodule(c), self.get_submodule(b)) for c, b in self.pairs]
        if self.fused and fusable_block(pairs, self.relu, self.downsample):
            return run_residual_block(pairs, self.downsample, x)
        return self._forward_unfused(pairs, x)

    def _forward_unfused(self, pairs: Sequence[ConvBatchNorm], x: torch.Tensor
                         ) -> torch.Tensor:
        """torchvision's forward: ``out += identity`` in place, then the ReLU."""
        out = x
        for conv, bn in pairs[:-1]:
            out = self.relu(bn(conv(out)))
        conv, bn = pairs[-1]
        out = bn(conv(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


def fusable_block(pairs: Sequence[ConvBatchNorm], relu: nn.Module,
                  downsample: Optional[nn.Module]) -> bool:
    """Whether a block of these modules runs fused at this call (see the module docstring)."""
    if _global_hooks_registered() or not _plain(relu, _RELUS):
        return False
    if downsample is not None:
        if not (_plain(downsample, (nn.Sequential, FusedSequential)) and len(downsample) == 2
                and _fusable_pair(downsample[0], downsample[1])):
            return False
    return all(_fusable_pair(conv, bn) for conv, bn in pairs)


def _fusable_pair(conv: nn.Module, bn: nn.Module) -> bool:
    return (_plain(conv, _CONVS) and conv.groups == 1 and conv.padding_mode == "zeros"
            and _plain(bn, _BATCH_NORMS) and bn.num_features == conv.out_channels)


def run_residual_block(pairs: Sequence[ConvBatchNorm], downsample: Optional[nn.Sequential],
                       x: torch.Tensor) -> torch.Tensor:
    """relu(bn_k(conv_k(... relu(bn_1(conv_1(x))))) + identity), identity = x or
    downsample(x), fused as the module docstring says."""
    out = x
    for conv, bn in pairs[:-1]:
        out = ConvRun(conv, bn, None, 3)(out)
    identity = x if downsample is None else conv_batch_norm(downsample[0], downsample[1], x)
    return conv_batch_norm_add_relu(*pairs[-1], out, identity)


def conv_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)) without ReLU: the BatchNorm folded into the conv epilogue in inference
    (one kernel), else the conv with the statistics in its epilogue, then one pass."""
    if _can_fold(conv, bn):
        scale, shift = fold_batch_norm(conv, bn)
        return functional.conv2d_fused(x, conv.weight, None, *_conv_args(conv), scale=scale,
                                       shift=shift)[0]
    y, partials = functional.conv2d_fused(x, conv.weight, conv.bias, *_conv_args(conv),
                                          stats=uses_batch_statistics(bn))
    bn._check_input_dim(y)
    mode = batch_norm_mode(bn)
    return functional.batch_norm(y, mode.running_mean, mode.running_var, bn.weight, bn.bias,
                                 mode.training, mode.momentum, bn.eps, partials=partials)


def conv_batch_norm_add_relu(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor,
                             identity: torch.Tensor) -> torch.Tensor:
    """relu(bn(conv(x)) + identity), a block's end: where ``_can_fold(conv, bn)``, one
    conv with the folded scale / shift, ``identity`` and the ReLU in its epilogue; else the
    conv (with the BatchNorm's partials in training), the statistics, one normalise + add +
    ReLU pass."""
    if _can_fold(conv, bn):
        scale, shift = fold_batch_norm(conv, bn)
        return functional.conv2d_fused(x, conv.weight, None, *_conv_args(conv), scale=scale,
                                       shift=shift, relu=True, residual=identity)[0]
    y, partials = functional.conv2d_fused(x, conv.weight, conv.bias, *_conv_args(conv),
                                          stats=uses_batch_statistics(bn))
    bn._check_input_dim(y)
    mode = batch_norm_mode(bn)
    return functional.batch_norm_add_relu(y, identity, mode.running_mean, mode.running_var,
                                          bn.weight, bn.bias, mode.training, mode.momentum,
                                          bn.eps, partials=partials)
