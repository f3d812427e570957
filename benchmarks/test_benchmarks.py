"""Every case of ``cases.py`` in each of its modes, up to four contenders in one benchmark
group: PyTorch eager (cuDNN / cuBLAS), torch.compile of the same torch module, fastarch on
its static tables, for layers and blocks fastarch autotuned, and for conv layers and blocks
fastarch forced onto the TMA convolution (``--contenders`` picks some: gpu_check.sh runs
eager + fastarch first, then eager + fastarch + tma on every conv layer, then compile, then
tuned).

The torch contenders run ``fastarch.inventory.torch_twin`` of the fastarch module: the same
weights on torch's own classes. Blocks and whole models run fastarch fused
(``fastarch.fusion.fuse``). Modes: ``eval`` (no_grad inference), ``train`` (training forward,
graph recorded), ``fwd_bwd`` (forward + input and weight gradients), ``train_step`` (cross
entropy, backward, SGD with momentum). Before timing, fastarch's eval / train output is
checked against the torch twin's; extra_info holds TFLOP/s or GB/s, the speedups, the card
and the versions, and on a GPU the device time (the kernels' own durations) beside the wall
time, which for small launch-bound cases is mostly the host launching them.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from cases import CONTENDERS, Case, build, fusion, scenarios
from timing import device_seconds, environment, measure, rotating
from torch import nn

from fastarch.inventory import torch_twin
from fastarch.kernels.tensor_cores import Operand

FASTARCH = ("fastarch", "tuned", "tma")
# Relative L2 error allowed between fastarch and torch, by operand kind; models ×2.5.
CHECK_TOLERANCE = {Operand.SIXTEEN_BIT: 2e-2, Operand.TF32: 5e-3, Operand.IEEE: 1e-4}


def pytest_generate_tests(metafunc):
    if "scenario" in metafunc.fixturenames:
        chosen = contenders_of(metafunc.config)
        metafunc.parametrize("scenario", [
            pytest.param((case, mode, contender), id=f"{case.name}-{mode}-{contender}")
            for case, mode in scenarios(subset_of(metafunc.config)) for contender in chosen
            if runs_on(contender, case)])


def runs_on(contender: str, case: Case) -> bool:
    """Whether ``contender`` has anything of its own to time on ``case``: tuning on layers
    and blocks, the TMA convolution where a conv runs alone or in a block."""
    if contender == "tuned":
        return case.kind != "model"
    if contender == "tma":
        return case.kind in ("conv", "block")
    return True


def contenders_of(config) -> tuple[str, ...]:
    """The ``--contenders`` asked for, in CONTENDERS order."""
    asked = {name.strip() for name in config.getoption("--contenders").split(",") if name.strip()}
    unknown = asked - set(CONTENDERS)
    if unknown or not asked:
        raise pytest.UsageError(f"--contenders: expected some of {','.join(CONTENDERS)}, "
                                f"got {config.getoption('--contenders')!r}")
    return tuple(name for name in CONTENDERS if name in asked)


@functools.lru_cache(maxsize=None)
def source_model(name: str, tiny: bool, device: str, dtype: torch.dtype) -> nn.Module:
    """The fastarch model every contender copies its module from (same weights for all)."""
    torch.manual_seed(0)
    model = build(name, tiny, device)
    return model.to(dtype=dtype, memory_format=torch.channels_last)


def case_module(case: Case, model: nn.Module) -> nn.Module:
    """A copy of what ``case`` runs: the whole model, one layer, or a run as a Sequential."""
    if not case.paths:
        return copy.deepcopy(model)
    layers = [copy.deepcopy(model.get_submodule(path)) for path in case.paths]
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def contender_module(case: Case, contender: str, module: nn.Module,
                     compile_backend: str = "inductor") -> nn.Module:
    if contender in FASTARCH:
        return fusion.fuse(module) if case.kind in ("block", "model") else module
    twin = torch_twin(module)
    if contender == "compile":
        torch._dynamo.reset()  # each case compiles afresh, far from the recompile limit
        return torch.compile(twin, backend=compile_backend)
    return twin


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: str,
           requires_grad: bool = False) -> torch.Tensor:
    x = torch.randn(shape, device=device, dtype=dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def workload(module: nn.Module, case: Case, mode: str, tiny: bool, dtype: torch.dtype,
             device: str):
    """(fn, make_args, bytes of one argument tuple) for ``mode``."""
    x_shape, y_shape = case.input_shape(tiny), case.output_shape(tiny)
    size = torch.finfo(dtype).bits // 8
    x_bytes = torch.Size(x_shape).numel() * size
    module.train(mode != "eval")
    if mode == "eval":
        def fn(x):
            with torch.no_grad():
                return module(x)
        return fn, lambda: (_randn(x_shape, dtype, device),), x_bytes
    if mode == "train":
        return module, lambda: (_randn(x_shape, dtype, device, requires_grad=True),), x_bytes
    if mode == "fwd_bwd":
        params = tuple(p for p in module.parameters() if p.requires_grad)

        def fn(x, dy):
            return torch.autograd.grad(module(x), (x, *params), dy)
        make = lambda: (_randn(x_shape, dtype, device, requires_grad=True),  # noqa: E731
                        _randn(y_shape, dtype, device))
        return fn, make, x_bytes + torch.Size(y_shape).numel() * size
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def step(x, target):
        loss = F.cross_entropy(module(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    make = lambda: (_randn(x_shape, dtype, device),  # noqa: E731
                    torch.randint(y_shape[-1], (x_shape[0],), device=device))
    return step, make, x_bytes


def check_against_torch(case: Case, mode: str, fn, args: tuple, source: nn.Module,
                        tiny: bool, dtype: torch.dtype, device: str, tf32: bool) -> None:
    """fastarch's output equals the torch twin's on the same input and weights (modes with a
    deterministic output: no dropout, no optimizer)."""
    twin_fn, _, _ = workload(torch_twin(case_module(case, source)), case, mode, tiny, dtype,
                             device)
    ours, theirs = fn(*args).detach().float(), twin_fn(*args).detach().float()
    assert ours.shape == theirs.shape and torch.isfinite(ours).all()
    error = ((ours - theirs).norm() / theirs.norm().clamp_min(1e-30)).item()
    tolerance = CHECK_TOLERANCE[Operand.of(dtype, tf32)] * (2.5 if case.kind == "model" else 1)
    assert error <= tolerance, f"{case.name} {mode}: relative error {error:.2e} > {tolerance:g}"


def subset_of(config) -> str:
    if config.getoption("convs"):
        return "convs-dry-run" if config.getoption("dry_run") else "convs"
    for subset in ("smoke", "dry-run", "quick"):
        if config.getoption(subset.replace("-", "_")):
            return subset
    return "full"


def test_case(benchmark, scenario, bench_device, bench_dtype, tf32, smoke, tiny, medians,
              request, monkeypatch):
    case, mode, contender = scenario
    monkeypatch.setenv("FASTARCH_AUTOTUNE", "on" if contender == "tuned" else "off")
    monkeypatch.setenv("FASTARCH_CONV_ALGO", "tma" if contender == "tma" else "auto")
    if smoke and contender == "compile":
        pytest.skip("torch.compile is not run in --smoke: inductor's first CPU compile takes "
                    "~25 s of C++ builds; the GPU run compiles every case")
    if smoke and contender == "tuned":
        pytest.skip("nothing is tuned under the interpreter: 'tuned' would rerun 'fastarch'")
    dry_run = request.config.getoption("--dry-run")
    compile_backend = "aot_eager" if dry_run else "inductor"
    source = source_model(case.model, tiny, bench_device, bench_dtype)
    module = contender_module(case, contender, case_module(case, source), compile_backend)
    fn, make, bytes_per_copy = workload(module, case, mode, tiny, bench_dtype, bench_device)
    next_args = rotating(make, bytes_per_copy, copies=1 if tiny else None)
    benchmark.group = f"{case.name} {mode}"
    if contender in FASTARCH and mode in ("eval", "train"):
        check_against_torch(case, mode, fn, next_args(), source, tiny, bench_dtype,
                            bench_device, tf32)
    if smoke:  # --benchmark-disable: one untimed call
        benchmark(fn, *next_args())
        return
    median = measure(benchmark, fn, next_args, request.config.getoption("--rounds"),
                     brief=dry_run)
    timings = medians.setdefault((case.name, mode), {})
    timings[contender] = median
    benchmark.extra_info.update(
        environment(), contender=contender, case=case.name, mode=mode, kind=case.kind,
        describe=case.describe(tiny), dtype=str(bench_dtype).removeprefix("torch."), tf32=tf32,
        channels_last=True, subset=subset_of(request.config),
        device_seconds=device_seconds(fn, next_args),
        **rates(case, mode, tiny, bench_dtype, median, contender, timings, compile_backend))


def rates(case: Case, mode: str, tiny: bool, dtype: torch.dtype, median: float,
          contender: str, timings: dict[str, float], compile_backend: str) -> dict:
    """FLOPs and bytes, the achieved TFLOP/s or GB/s, and fastarch's speedups."""
    cost = case.cost(mode, tiny, torch.finfo(dtype).bits // 8)
    info = {"flops": cost.flops, "bytes": cost.bytes, cost.metric: cost.rate(median)}
    if contender == "compile":
        info["compile_mode"] = f"default ({compile_backend})"
    if contender in FASTARCH:
        info["fused"] = case.kind in ("block", "model") and fusion is not None
        info.update({f"speedup_vs_{rival}": timings[rival] / median
                     for rival in ("eager", "compile", "fastarch")
                     if rival in timings and rival != contender})
    return info
