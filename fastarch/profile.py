"""Where the time of a model goes, layer by layer: ``python -m fastarch profile <model>``.

The model (``fastarch.models``, fused as it is built unless ``--no-fuse``) is cut into units:
each fused run (conv -> bn -> relu (-> pool), conv -> relu, linear -> relu (-> dropout)), each
fused residual block (ResNet) and each other layer. Every unit is timed on the input it sees
in the model, through fastarch and through torch's own modules (cuDNN on a GPU), and judged
against the card's roofline (``fastarch.roofline``); the kernels it launched are read from
torch.profiler. A chrome trace of one whole-model forward (every module outside a fused run
or block and every fastarch op a named range) goes to ``--trace``. Without a GPU the kernels
run under the Triton interpreter on the CPU: the table's shape is the same, its times are not
GPU times. The layers come from the shared inventory, ``fastarch.inventory``.
"""
from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastarch import backend, fusion, roofline
from fastarch.inventory import DTYPES, Leaf, label, run_cost, shape_text, torch_twin, trace_leaves
from fastarch.kernels.tensor_cores import Operand
from fastarch.nn.residual import ResidualBlock
from fastarch.roofline import Cost


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


def residual_blocks(model: nn.Module) -> list[str]:
    """The paths of ``model``'s residual blocks: each one unit, run by its own forward (fused,
    or module by module when the model is)."""
    return [path for path, m in model.named_modules() if isinstance(m, ResidualBlock)]


def block_of(path: str, blocks: Sequence[str]) -> Optional[str]:
    """The residual block (among ``blocks``) the module at ``path`` belongs to, if any."""
    return next((block for block in blocks if path.startswith(f"{block}.")), None)


def block_runs(leaves: list[Leaf], blocks: Sequence[str]) -> list[tuple[str, ...]]:
    """The leaves each residual block calls, in call order (its ReLU once a call): what
    ``units`` groups into one unit."""
    runs: dict[str, list[str]] = {}
    for leaf in leaves:
        block = block_of(leaf.path, blocks)
        if block is not None:
            runs.setdefault(block, []).append(leaf.path)
    return [tuple(run) for run in runs.values()]


def unit_module(model: nn.Module, unit: Sequence[Leaf], fuse: Optional[Callable],
                block: Optional[str] = None) -> nn.Module:
    """The unit's modules of ``model`` (shared, not copied): the residual ``block`` it is, or
    its layer, or its run, fused when ``fuse``."""
    if block is not None:
        return model.get_submodule(block)
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
                  device: str, warmup: int, reps: int,
                  blocks: Sequence[str] = ()) -> Iterator[UnitResult]:
    """Each unit measured on a random input of its shape, as soon as it is measured; each
    residual block of ``blocks`` is one unit."""
    size = torch.finfo(dtype).bits // 8
    for unit in units(leaves, [*runs, *block_runs(leaves, blocks)]):
        block = block_of(unit[0].path, blocks)
        ours = unit_module(model, unit, fuse, block)
        theirs = unit_module(twin, unit, None, block)
        x = torch.randn(unit[0].input_shape, device=device, dtype=dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        fastarch_s = seconds_per_call(lambda: ours(x), warmup, reps)  # compiles first
        torch_s = seconds_per_call(lambda: theirs(x), warmup, reps)
        yield UnitResult(
            name=block or (unit[0].path if len(unit) == 1
                           else f"{unit[0].path}-{unit[-1].path.rsplit('.', 1)[-1]}"),
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


def module_ranges(model: nn.Module, runs: Sequence[Sequence[str]]) -> list:
    """Forward hooks that put the call of every module outside the fused ``runs`` and fused
    residual blocks inside a range named by its path and layer (a hook on a module of a run
    or block would unfuse it: a run shows inside its parent's range, as its fastarch op
    ranges); returns the handles to remove."""
    stack: list = []

    def enter(name: str, module: nn.Module, args: tuple) -> None:
        stack.append(torch.autograd.profiler.record_function(name))
        stack[-1].__enter__()

    def leave(name: str, module: nn.Module, args: tuple, output: object) -> None:
        stack.pop().__exit__(None, None, None)

    in_runs = {path for run in runs for path in run}
    fused_blocks = [path for path, m in model.named_modules()
                    if isinstance(m, ResidualBlock) and m.fused]
    handles = []
    for path, module in model.named_modules():
        if path in in_runs or block_of(path, fused_blocks) is not None:
            continue
        name = f"{path or type(module).__name__} {label(module)}".strip()
        handles.append(module.register_forward_pre_hook(functools.partial(enter, name)))
        handles.append(module.register_forward_hook(functools.partial(leave, name)))
    return handles


def write_trace(model: nn.Module, x: torch.Tensor, path: str,
                runs: Sequence[Sequence[str]]) -> None:
    """A torch.profiler chrome trace of one forward, every module outside the fused ``runs``
    a named range."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    handles = module_ranges(model, runs)
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
        model = getattr(models, args.model)(fused=not args.no_fuse)
    model = model.to(dtype=dtype, memory_format=torch.channels_last).eval()
    twin = torch_twin(model)
    runs = [] if args.no_fuse else fusion.fused_runs(model)
    blocks = [] if args.no_fuse else residual_blocks(model)
    leaves = trace_leaves(torch_twin(model).to("meta"), x.to("meta"))
    warmup, reps = (3, args.reps or 20) if gpu else (0, args.reps or 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
    where = (f"compiled Triton on {torch.cuda.get_device_name()}" if gpu
             else "Triton interpreter on the CPU: times are interpreter times, not GPU times")
    print(f"fastarch profile: {args.model}, batch {batch}, {args.dtype}, channels_last, eval, "
          f"{'unfused' if args.no_fuse else f'{len(runs)} fused runs'}"
          f"{f', {len(blocks)} fused residual blocks' if blocks else ''}; {where}\n")
    ceilings = roofline.ceilings_for(torch.cuda.get_device_name()) if gpu else None
    table = Table(ceilings, Operand.of(dtype, _tf32()), "cuDNN" if gpu else "torch")
    print(table.header(), flush=True)
    ours = theirs = 0.0
    with torch.no_grad():
        for result in profile_units(model, twin, leaves, runs,
                                    None if args.no_fuse else fusion.fuse, dtype, device,
                                    warmup, reps, blocks):
            print(table.row(result), flush=True)
            ours, theirs = ours + result.fastarch_s, theirs + result.torch_s
        whole = (seconds_per_call(lambda: model(x), warmup, reps),
                 seconds_per_call(lambda: twin(x), warmup, reps))
    print(table.rule, table.total("sum of units", ours, theirs),
          table.total("whole model forward", *whole), sep="\n")
    if args.trace:
        write_trace(model, x, args.trace, runs)
        print(f"\nchrome trace of one forward: {args.trace} (chrome://tracing or Perfetto)")
    return 0


def _tf32() -> bool:
    return backend.conv_operand(torch.float32) is Operand.TF32
