"""``fastarch.convert(model)``: run any torch.nn model — torchvision's or your own — on
fastarch's kernels.

Every module whose type is exactly one of torch.nn's Conv2d, BatchNorm2d, ReLU, MaxPool2d,
AvgPool2d, AdaptiveAvgPool2d, Linear or Dropout becomes its ``fastarch.nn`` twin, then
``fastarch.fusion.fuse`` fuses the Conv2d -> BatchNorm2d -> ReLU (-> pool), Conv2d -> ReLU and
Linear -> ReLU (-> Dropout) runs it finds in every nn.Sequential.

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

import torch

from fastarch import nn
from fastarch.fusion import fuse

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


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Swap ``model``'s torch.nn layers (``model`` itself included) for fastarch's, in
    place, and fuse what can be fused; returns ``model``."""
    for module in model.modules():
        twin = TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin
    fuse(model)
    return model
