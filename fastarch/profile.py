"""Where the time of a model goes, layer by layer: ``python -m fastarch profile <model>``.

The model (``fastarch.models``, fused by ``fastarch.fusion.fuse`` unless ``--no-fuse``) is cut
into units: each fused run (conv -> bn -> relu -> pool) and each other layer. Every unit is
timed on the input it sees in the model, through fastarch and through torch's own modules
(cuDNN on a GPU), and judged against the card's roofline (``fastarch.roofline``); the
kernels it launched are read from torch.profiler. A chrome trace of one whole-model forward
(every module and fastarch op a named range) goes to ``--trace``. Without a GPU the kernels run
under the Triton interpreter on the CPU: the table's shape is the same, its times are not GPU
times.

This module also holds the layer inventory the benchmarks share: ``torch_twin`` (the same
module on torch's implementation), ``trace_leaves`` (every leaf layer with its shapes) and
``run_cost``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from fastarch import roofline
from fastarch.roofline import Cost

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- inventory

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
    """A deep copy that runs torch's own implementation: every ``fastarch.nn`` module (fused
    Sequentials included) becomes the torch.nn class it subclasses; weights are shared by value."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        m.__class__ = _torch_class(type(m))
    return twin


def trace_leaves(model: nn.Module, example: torch.Tensor) -> list[Leaf]:
    """Every leaf module ``model(example)`` calls, in call order, with its shapes. Run it on a
    torch twin on the meta device for shapes alone (fused runs hide their modules' hooks)."""
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


# ----------------------------------------------------------------------------- the command

IMAGES = {"lenet5": (1, 32, 32)}  # every other model takes 3×224×224 (see --size)
BATCHES = {"lenet5": 1024, "alexnet": 256}  # the benchmarks' batches; VGG's is 64


@dataclass(frozen=True)
class UnitResult:
    name: str
    layers: str
    input_shape: tuple[int, ...]
    kernels: tuple[str, ...]
    cost: Cost
    fastarch_s: float
    torch_s: float


def units(leaves: list[Leaf], runs: Sequence[Sequence[str]]) -> list[list[Leaf]]:
    """The leaves grouped as they execute: each fused run is one unit, other leaves alone."""
    run_length = {run[0]: len(run) for run in runs}
    grouped, index = [], 0
    while index < len(leaves):
        length = run_length.get(leaves[index].path, 1)
        grouped.append(leaves[index:index + length])
        index += length
    return grouped


def unit_module(model: nn.Module, unit: Sequence[Leaf], fuse: Optional[Callable]) -> nn.Module:
    """The unit's modules of ``model`` (shared, not copied); a run is fused when ``fuse``."""
    layers = [model.get_submodule(leaf.path) for leaf in unit]
    if len(layers) == 1:
        return layers[0]
    sequential = nn.Sequential(*layers)
    return fuse(sequential) if fuse is not None else sequential


def seconds_per_call(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Mean seconds of ``reps`` back-to-back calls after ``warmup`` calls; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def kernels_of(fn: Callable[[], object]) -> tuple[str, ...]:
    """The kernels one call launches (device events on a GPU; under the interpreter, the
    fastarch op ranges), each name once, in launch order."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    gpu = torch.cuda.is_available()
    if gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if gpu:
            torch.cuda.synchronize()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    if gpu:
        names = [e.name for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    else:
        names = [e.name for e in events if e.name.startswith("fastarch::")]
    return tuple(dict.fromkeys(names))


def profile_units(model: nn.Module, twin: nn.Module, leaves: list[Leaf],
                  runs: Sequence[Sequence[str]], fuse: Optional[Callable], dtype: torch.dtype,
                  device: str, warmup: int, reps: int) -> Iterator[UnitResult]:
    """Each unit measured on a random input of its shape, as soon as it is measured."""
    size = torch.finfo(dtype).bits // 8
    for unit in units(leaves, runs):
        ours = unit_module(model, unit, fuse)
        theirs = unit_module(twin, unit, None)
        x = torch.randn(unit[0].input_shape, device=device, dtype=dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        fastarch_s = seconds_per_call(lambda: ours(x), warmup, reps)  # compiles first
        torch_s = seconds_per_call(lambda: theirs(x), warmup, reps)
        yield UnitResult(
            name=unit[0].path if len(unit) == 1
            else f"{unit[0].path}-{unit[-1].path.rsplit('.', 1)[-1]}",
            layers=" + ".join(label(leaf.module) for leaf in unit),
            input_shape=unit[0].input_shape, kernels=kernels_of(lambda: ours(x)),
            cost=run_cost(unit, size), fastarch_s=fastarch_s, torch_s=torch_s)


class Table:
    """The per-unit table, printed a row at a time (a slow or interrupted run shows what it
    measured); a unit that launched nothing (an identity) gets no rate."""
    COLUMNS = "{:24} {:50} {:>18} {:>11} {:>16} {:>6} {:>10} {:>8}  {}"

    def __init__(self, ceilings: Optional[roofline.Ceilings], operand: str, rival: str) -> None:
        self.ceilings, self.operand = ceilings, operand
        self.head = self.COLUMNS.format("unit", "layers", "input", "fastarch ms", "rate",
                                        "% roof", f"{rival} ms", "speedup", "kernels")
        self.rule = "-" * len(self.head)

    def header(self) -> str:
        return f"{self.head}\n{self.rule}"

    def row(self, r: UnitResult) -> str:
        rate = r.cost.rate(r.fastarch_s) if r.kernels else None
        peak = self.ceilings.peak(r.cost, self.operand) if self.ceilings is not None else None
        return self.COLUMNS.format(
            r.name[:24], r.layers[:50], shape_text(r.input_shape), f"{r.fastarch_s * 1e3:.4f}",
            "—" if rate is None else f"{rate:.3g} {r.cost.metric}",
            "—" if rate is None or not peak else f"{rate / peak:.0%}",
            f"{r.torch_s * 1e3:.4f}", f"{r.torch_s / r.fastarch_s:.2f}×",
            ", ".join(r.kernels) or "— (identity)")

    def total(self, name: str, ours_s: float, theirs_s: float) -> str:
        return self.COLUMNS.format(name, "", "", f"{ours_s * 1e3:.4f}", "", "",
                                   f"{theirs_s * 1e3:.4f}", f"{theirs_s / ours_s:.2f}×",
                                   "").rstrip()


def module_ranges(model: nn.Module) -> list:
    """Forward hooks that put every module's call inside a range named by its path and
    layer (fused runs show as their Sequential); returns the handles to remove."""
    stack: list = []

    def enter(name: str, module: nn.Module, args: tuple) -> None:
        stack.append(torch.autograd.profiler.record_function(name))
        stack[-1].__enter__()

    def leave(name: str, module: nn.Module, args: tuple, output: object) -> None:
        stack.pop().__exit__(None, None, None)

    handles = []
    for path, module in model.named_modules():
        name = f"{path or type(module).__name__} {label(module)}".strip()
        handles.append(module.register_forward_pre_hook(functools.partial(enter, name)))
        handles.append(module.register_forward_hook(functools.partial(leave, name)))
    return handles


def write_trace(model: nn.Module, x: torch.Tensor, path: str) -> None:
    """A torch.profiler chrome trace of one forward, every module a named range."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    handles = module_ranges(model)
    try:
        with torch.profiler.profile(activities=activities) as prof, torch.no_grad():
            model(x)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    finally:
        for handle in handles:
            handle.remove()
    prof.export_chrome_trace(path)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    from fastarch import models
    parser = argparse.ArgumentParser(
        prog="fastarch profile", description=__doc__.split("\n\n")[0],
        epilog="Without a GPU it runs under the Triton interpreter: use a tiny model and batch "
               "(lenet5 --batch 2).")
    parser.add_argument("model", choices=[n for n in models.__all__ if n[0].islower()])
    parser.add_argument("--batch", type=int, help="default: the benchmarks' batch (1024 "
                        "LeNet-5, 256 AlexNet, 64 VGG) on a GPU, 2 without one")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--size", type=int, help="input height = width (default 32 for "
                        "LeNet-5, 224 otherwise)")
    parser.add_argument("--trace", help="write a chrome trace of one forward here (.json)")
    parser.add_argument("--no-fuse", action="store_true", help="run the model unfused")
    parser.add_argument("--reps", type=int, help="timed calls per unit (default 20 on a GPU, "
                        "1 without one)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from fastarch import models
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda" if gpu else "cpu"), DTYPES[args.dtype]
    channels, height, _ = IMAGES.get(args.model, (3, 224, 224))
    batch = args.batch or (BATCHES.get(args.model, 64) if gpu else 2)
    torch.manual_seed(0)
    x = torch.randn(batch, channels, args.size or height, args.size or height, device=device,
                    dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.device(device):
        model = getattr(models, args.model)()
    model = model.to(dtype=dtype, memory_format=torch.channels_last).eval()
    twin = torch_twin(model)
    fusion = None if args.no_fuse else _fusion()
    if fusion is not None:
        fusion.fuse(model)
    runs = fusion.fused_runs(model) if fusion is not None else []
    leaves = trace_leaves(torch_twin(model).to("meta"), x.to("meta"))
    warmup, reps = (3, args.reps or 20) if gpu else (0, args.reps or 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
    where = (f"compiled Triton on {torch.cuda.get_device_name()}" if gpu
             else "Triton interpreter on the CPU: times are interpreter times, not GPU times")
    print(f"fastarch profile: {args.model}, batch {batch}, {args.dtype}, channels_last, eval, "
          f"{f'{len(runs)} fused runs' if fusion is not None else 'unfused'}; {where}\n")
    ceilings = roofline.ceilings_for(torch.cuda.get_device_name()) if gpu else None
    table = Table(ceilings, roofline.operand_kind(dtype, _tf32()), "cuDNN" if gpu else "torch")
    print(table.header(), flush=True)
    ours = theirs = 0.0
    with torch.no_grad():
        for result in profile_units(model, twin, leaves, runs, fusion.fuse if fusion else None,
                                    dtype, device, warmup, reps):
            print(table.row(result), flush=True)
            ours, theirs = ours + result.fastarch_s, theirs + result.torch_s
        whole = (seconds_per_call(lambda: model(x), warmup, reps),
                 seconds_per_call(lambda: twin(x), warmup, reps))
    print(table.rule, table.total("sum of units", ours, theirs),
          table.total("whole model forward", *whole), sep="\n")
    if args.trace:
        write_trace(model, x, args.trace)
        print(f"\nchrome trace of one forward: {args.trace} (chrome://tracing or Perfetto)")
    return 0


def _fusion():
    try:
        from fastarch import fusion
    except ImportError:
        return None
    return fusion


def _tf32() -> bool:
    from fastarch.kernels import tensor_cores
    return tensor_cores.cudnn_conv_allows_tf32()
