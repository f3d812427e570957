"""The layer inventory that the profiler (``python -m fastarch profile``), ``python -m
fastarch layers``, the benchmarks and the tests share: every leaf layer a model calls with its
shapes (``trace_leaves``), the same module on torch's own implementation (``torch_twin``),
what a layer or a run of layers must compute and move (``run_cost``), and short names for
layers and shapes."""
from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from fastarch import roofline
from fastarch.fusion import unfuse
from fastarch.roofline import Cost

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Leaf:
    """A leaf layer as one forward met it."""
    path: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def _torch_class(cls: type) -> type:
    while cls.__module__.startswith("fastarch.nn"):
        cls = cls.__bases__[0]
    return cls


def torch_twin(module: nn.Module) -> nn.Module:
    """A deep copy that runs torch's own implementation, module by module: fusion undone,
    every ``fastarch.nn`` module (fused Sequentials included) the torch.nn class it
    subclasses; weights are shared by value."""
    twin = unfuse(copy.deepcopy(module))
    for m in twin.modules():
        m.__class__ = _torch_class(type(m))
    return twin


def trace_leaves(model: nn.Module, example: torch.Tensor) -> list[Leaf]:
    """Every leaf module ``model(example)`` calls, in call order, with its shapes. Run it on a
    torch twin on the meta device for shapes alone (no kernel runs)."""
    leaves: list[Leaf] = []

    def record(path: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        leaves.append(Leaf(path, module, tuple(args[0].shape), tuple(output.shape)))

    handles = [m.register_forward_hook(functools.partial(record, path))
               for path, m in model.named_modules() if not any(m.children())]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return leaves


def run_cost(leaves: Sequence[Leaf], element_size: int, backward: bool = False,
             input_grad: bool = True) -> Cost:
    """A layer, or a run of layers executed together: the FLOPs of every layer; the bytes of
    the run's input, weights and output (what a fused run must move). ``backward`` adds the
    backward pass; without ``input_grad`` the first layer computes no input gradient."""
    if len(leaves) == 1:
        leaf = leaves[0]
        cost = roofline.forward_cost(leaf.module, leaf.input_shape, leaf.output_shape,
                                     element_size)
        if backward:
            cost += roofline.backward_cost(leaf.module, leaf.input_shape, leaf.output_shape,
                                           element_size, input_grad)
        return cost
    x, y = math.prod(leaves[0].input_shape), math.prod(leaves[-1].output_shape)
    weights = sum(p.numel() for leaf in leaves for p in leaf.module.parameters(recurse=False))
    flops = sum(roofline.forward_cost(leaf.module, leaf.input_shape, leaf.output_shape, 0).flops
                for leaf in leaves)
    moved = x + weights + y
    if backward:
        compute = [leaf for leaf in leaves if isinstance(leaf.module, roofline.COMPUTE_LAYERS)]
        flops += sum(roofline.backward_cost(leaf.module, leaf.input_shape, leaf.output_shape, 0,
                                            input_grad or leaf is not compute[0]).flops
                     for leaf in compute)
        moved += y + x + 2 * weights + (x if input_grad else 0)
    return Cost(flops, moved * element_size)


def label(module: nn.Module) -> str:
    """A short ASCII name for a layer (trace ranges must be ASCII): "conv 64->128 3x3 p1",
    "max 3x3 s2", "bn 256", "fc 4096->1000"; "" for what is not a layer."""
    if isinstance(module, nn.Conv2d):
        return (f"conv {module.in_channels}->{module.out_channels} "
                f"{_window(module.kernel_size, module.stride, module.padding)}")
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        kind = "max" if isinstance(module, nn.MaxPool2d) else "avg"
        return f"{kind} {_window(module.kernel_size, module.stride, module.padding)}"
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return f"adaptive avg ->{'x'.join(map(str, _pair(module.output_size)))}"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"bn {module.num_features}"
    if isinstance(module, nn.Linear):
        return f"fc {module.in_features}->{module.out_features}"
    if isinstance(module, (nn.ReLU, nn.Dropout)):
        return type(module).__name__.lower()
    return ""


def _window(kernel, stride, padding) -> str:
    def pair(prefix: str, value, default: int) -> str:
        a, b = _pair(value)
        return "" if (a, b) == (default, default) else f" {prefix}{a}" + ("" if a == b else f",{b}")
    kh, kw = _pair(kernel)
    return f"{kh}x{kw}{pair('s', stride, 1)}{pair('p', padding, 0)}"


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))
