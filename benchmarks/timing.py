"""Honest GPU timing inside pytest-benchmark.

* On a GPU, conftest makes ``synchronized_clock`` pytest-benchmark's timer: it waits for the
  GPU before reading the clock, so a round measures the device time of its calls, not the
  time to launch them.
* A round runs enough back-to-back calls (``iterations``) to last about ``ROUND_SECONDS``, so
  the synchronize and clock reads vanish in it; each call takes the next of several input
  copies that together exceed the L2 cache (``rotating``).
* Warm-up calls run first, outside any timing: Triton and inductor compile, cuDNN autotunes.
* Beside that wall time, ``device_seconds`` sums the durations of the kernels one call runs
  (torch.profiler's CUDA activity): for a small case the wall time is mostly the host
  launching kernels, and the difference says how much.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable

import torch

L2_BYTES = 64 * 2**20  # H100 50 MB, H200 60 MB: rotate until the copies exceed twice this
MAX_COPIES = 512
ROUND_SECONDS = 2e-3
MAX_ITERATIONS = 256
WARMUP_CALLS = 3
PROBE_CALLS = 5
DEVICE_CALLS = 3
CPU_DRY_RUN = "CPU dry run (Triton interpreter)"


def synchronized_clock() -> float:
    """pytest-benchmark's timer on a GPU (``--benchmark-timer timing.synchronized_clock``)."""
    torch.cuda.synchronize()
    return time.perf_counter()


def rotating(make: Callable[[], tuple], bytes_per_copy: int, copies: int | None = None
             ) -> Callable[[], tuple]:
    """Cycle through enough independently drawn argument tuples to defeat the L2 cache."""
    if copies is None:
        copies = max(1, min(MAX_COPIES, math.ceil(2 * L2_BYTES / max(bytes_per_copy, 1))))
    pool = itertools.cycle([make() for _ in range(copies)])
    return lambda: next(pool)


def iterations_for(seconds_per_call: float) -> int:
    """Calls per round so that a round lasts about ``ROUND_SECONDS``."""
    return max(1, min(MAX_ITERATIONS, round(ROUND_SECONDS / max(seconds_per_call, 1e-9))))


def measure(benchmark, fn: Callable[..., object], next_args: Callable[[], tuple],
            rounds: int, brief: bool = False) -> float:
    """Warm up, size the rounds, time ``fn(*next_args())``; the median seconds per call.
    ``brief`` (the CPU dry run, where nothing compiles and a call takes seconds) times
    single calls with no warm-up."""
    iterations = 1
    if not brief:
        for _ in range(WARMUP_CALLS):
            fn(*next_args())
        start = synchronized_clock()
        for _ in range(PROBE_CALLS):
            fn(*next_args())
        iterations = iterations_for((synchronized_clock() - start) / PROBE_CALLS)
    benchmark.extra_info["iterations"] = iterations
    benchmark.pedantic(lambda: fn(*next_args()), rounds=rounds, iterations=iterations,
                       warmup_rounds=0 if brief else 1)
    return benchmark.stats.stats.median


def device_seconds(fn: Callable[..., object], next_args: Callable[[], tuple]) -> float | None:
    """Seconds per call that the GPU spends in kernels (None without a GPU)."""
    if not torch.cuda.is_available():
        return None
    args = [next_args() for _ in range(DEVICE_CALLS)]
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for call_args in args:
            fn(*call_args)
        torch.cuda.synchronize()
    kernel_us = sum(event.time_range.elapsed_us() for event in prof.events()
                    if event.device_type == torch.autograd.DeviceType.CUDA)
    return kernel_us * 1e-6 / DEVICE_CALLS


def environment() -> dict[str, str]:
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__, "gpu": CPU_DRY_RUN}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
        info["cudnn"] = str(torch.backends.cudnn.version())
    return info
