"""The fusion mechanism: ``fuse(model)`` makes the fusable runs of a model — Conv2d ->
BatchNorm2d -> ReLU (-> MaxPool2d / AvgPool2d), Conv2d -> ReLU and Linear -> ReLU (->
Dropout) inside every nn.Sequential, and inside the module chains of a ``ModuleChains`` model
(LeNet-5, ResNet's stem; ResNet's residual blocks are ``ModuleChains`` too:
``fastarch.nn.residual``) — run fused (``fastarch.nn.fused``), keeping every original
module, parameter, buffer and state_dict key: torchvision checkpoints load unchanged and
``train()`` / ``eval()`` behave as before. Runs are found at each forward
(``fastarch.nn.fused.walk``), so later edits to a Sequential are honoured, and a run fuses
only modules of exactly torch.nn's (or fastarch.nn's) types that carry no hook: subclasses,
parametrized modules and hooked modules run as themselves.

It works in place: each such nn.Sequential becomes a ``FusedSequential`` (the same object,
its class swapped), so references to it, optimizers and hooks on it stay valid; a
``ModuleChains`` model gets ``fused = True``. ``unfuse(model)`` undoes both.
"""
from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from fastarch.nn.fused import FusedSequential, ModuleChains, Run, walk


def fuse(model: nn.Module) -> nn.Module:
    """Make every fusable run in ``model`` execute fused; returns ``model`` itself."""
    for module in model.modules():
        if isinstance(module, ModuleChains):
            module.fused = True
        elif type(module) is nn.Sequential and _has_run(module):
            module.__class__ = FusedSequential
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo ``fuse``: every module of ``model`` runs as itself again."""
    for module in model.modules():
        if isinstance(module, ModuleChains):
            module.fused = False
        elif type(module) is FusedSequential:
            module.__class__ = nn.Sequential
    return model


def fused_runs(model: nn.Module) -> list[tuple[str, ...]]:
    """The paths of the modules of each run ``fuse`` fuses, in order (for inspection and
    tests)."""
    runs = []
    for prefix, names in _chains(model):
        modules = [model.get_submodule(_path(prefix, name)) for name in names]
        for start, step in walk(modules):
            if isinstance(step, Run):
                runs.append(tuple(_path(prefix, name)
                                  for name in names[start:start + step.length]))
    return runs


def _chains(model: nn.Module) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(path of the parent, names of its children) of every list of modules run in order."""
    for prefix, module in model.named_modules():
        if isinstance(module, ModuleChains):
            yield from ((prefix, chain) for chain in module.chains)
        elif isinstance(module, nn.Sequential):
            yield prefix, tuple(module._modules)


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_run(sequential: nn.Sequential) -> bool:
    return any(isinstance(step, Run) for _, step in walk(list(sequential)))
