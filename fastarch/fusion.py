"""The fusion mechanism: ``fuse(model)`` finds Conv2d -> BatchNorm2d -> ReLU (-> MaxPool2d /
AvgPool2d) and Conv2d -> ReLU runs inside every nn.Sequential of a model and makes them run
fused (``fastarch.nn.fused``), keeping every original module, parameter, buffer and
state_dict key: torchvision checkpoints load unchanged and ``train()`` / ``eval()`` behave
as before. Runs are found at each forward, so later edits to a Sequential are honoured, and
a run fuses only modules of exactly torch.nn's (or fastarch.nn's) types that carry no hook
(``fastarch.nn.fused.match_run``): subclasses, parametrized modules and hooked modules run
as themselves.

It works in place: each such nn.Sequential becomes a ``FusedSequential`` (the same object,
its class swapped), so references to it, optimizers and hooks on it stay valid.
``unfuse(model)`` swaps them back.
"""
from __future__ import annotations

from torch import nn

from fastarch.nn.fused import FusedSequential, match_run


def fuse(model: nn.Module) -> nn.Module:
    """Make every fusable run in ``model`` execute fused; returns ``model`` itself."""
    for module in model.modules():
        if type(module) is nn.Sequential and _has_run(module):
            module.__class__ = FusedSequential
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo ``fuse``: every FusedSequential made by it runs module by module again."""
    for module in model.modules():
        if type(module) is FusedSequential:
            module.__class__ = nn.Sequential
    return model


def fused_runs(model: nn.Module) -> list[tuple[str, ...]]:
    """The names of the modules of each run ``fuse`` fuses (for inspection and tests)."""
    runs = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        names, modules = list(module._modules), list(module._modules.values())
        index = 0
        while index < len(modules):
            run = match_run(modules, index)
            step = 1 if run is None else run.length
            if run is not None:
                runs.append(tuple(f"{prefix}.{n}" if prefix else n
                                  for n in names[index:index + step]))
            index += step
    return runs


def _has_run(sequential: nn.Sequential) -> bool:
    modules = list(sequential._modules.values())
    return any(match_run(modules, i) is not None for i in range(len(modules)))
