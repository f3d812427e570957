"""``fastarch.convert(model)``: run any torch.nn model — torchvision's or your own — on
fastarch's kernels.

Every module whose type is exactly one of torch.nn's Conv2d, BatchNorm2d, ReLU, MaxPool2d,
AvgPool2d, AdaptiveAvgPool2d, Linear or Dropout becomes its ``fastarch.nn`` twin, then
``fastarch.fusion.fuse`` fuses the Conv2d -> BatchNorm2d -> ReLU (-> pool), Conv2d -> ReLU and
Linear -> ReLU (-> Dropout) runs it finds in every nn.Sequential. A torchvision ResNet (its
``ResNet``, ``BasicBlock`` and ``Bottleneck`` classes, recognised by class name and children
without importing torchvision) takes fastarch's classes of the same names
(``fastarch.models.resnet``), which run its stem and blocks fused.

In place, like ``Module.to()``: the model is returned, and each converted module is the same
object with its class changed (the twins subclass torch.nn's and add no state). So
parameters and buffers are shared, not copied — an optimizer built before the conversion
keeps training the converted model — and the training flag, hooks and any other attribute
stay as they were, so every hook still fires (a run with a hooked module is not fused: see
``fastarch.nn.fused``); the state_dict is unchanged (keys, values, dtypes). Copy first
(``copy.deepcopy(model)``) to keep a torch.nn original.

Left alone: subclasses of those types (their ``forward`` may differ; a module parametrized
with ``torch.nn.utils.parametrize`` is one), every other module, and functional calls
inside a ``forward`` (``F.relu(x)`` stays torch's).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastarch import nn
from fastarch.fusion import fuse
from fastarch.models import resnet

TWINS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.Conv2d: nn.Conv2d,
    torch.nn.BatchNorm2d: nn.BatchNorm2d,
    torch.nn.ReLU: nn.ReLU,
    torch.nn.MaxPool2d: nn.MaxPool2d,
    torch.nn.AvgPool2d: nn.AvgPool2d,
    torch.nn.AdaptiveAvgPool2d: nn.AdaptiveAvgPool2d,
    torch.nn.Linear: nn.Linear,
    torch.nn.Dropout: nn.Dropout,
}


# torchvision's ResNet classes, recognised without importing torchvision by their class name
# and their children's names (a block's ``downsample`` is optional): their forward is
# torchvision's, which these fastarch classes compute fused.
_BLOCK = {"conv1", "bn1", "relu", "conv2", "bn2"}
STRUCTURES: dict[str, tuple[type[torch.nn.Module], tuple[frozenset[str], ...]]] = {
    "ResNet": (resnet.ResNet, (frozenset({"conv1", "bn1", "relu", "maxpool", "layer1",
                                          "layer2", "layer3", "layer4", "avgpool", "fc"}),)),
    "BasicBlock": (resnet.BasicBlock, (frozenset(_BLOCK), frozenset(_BLOCK | {"downsample"}))),
    "Bottleneck": (resnet.Bottleneck, (frozenset(_BLOCK | {"conv3", "bn3"}),
                                       frozenset(_BLOCK | {"conv3", "bn3", "downsample"}))),
}


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Swap ``model``'s torch.nn layers (``model`` itself included) for fastarch's, and
    torchvision's ResNet, BasicBlock and Bottleneck for fastarch's, in place, and fuse what
    can be fused; returns ``model``."""
    for module in model.modules():
        twin = TWINS.get(type(module)) or _structural_twin(module)
        if twin is not None:
            module.__class__ = twin
    fuse(model)
    return model


def _structural_twin(module: torch.nn.Module) -> Optional[type[torch.nn.Module]]:
    """The fastarch class of a torchvision ResNet module (by class name and children)."""
    twin, children = STRUCTURES.get(type(module).__name__, (None, ()))
    if twin is None or type(module) is twin or "forward" in module.__dict__:
        return None
    return twin if frozenset(module._modules) in children else None
