"""Honest GPU timing inside pytest-benchmark: every timed call ends with a synchronize, inputs
rotate through copies that together exceed L2, and the environment goes into extra_info."""
from __future__ import annotations

import itertools
from typing import Callable

import torch

L2_BYTES = 64 * 2**20  # H100 50 MB, H200 60 MB: rotate until the copies exceed this


def rotating(make: Callable[[], tuple], bytes_per_copy: int) -> Callable[[], tuple]:
    """Cycle through enough independently drawn argument tuples to defeat the L2 cache."""
    copies = 1 if bytes_per_copy >= 2 * L2_BYTES else min(8, -(-2 * L2_BYTES // bytes_per_copy))
    pool = itertools.cycle([make() for _ in range(copies)])
    return lambda: next(pool)


def environment() -> dict[str, str]:
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cudnn"] = str(torch.backends.cudnn.version())
    return info


def run_case(benchmark, fn: Callable[..., object], next_args: Callable[[], tuple],
             bytes_moved: int, smoke: bool, contender: str, case: str) -> None:
    """Time ``fn(*next_args())`` (synchronized) and record GB/s beside the environment."""
    if smoke:  # --benchmark-disable: one untimed call through the interpreter
        benchmark(fn, *next_args())
        return

    def timed():
        fn(*next_args())
        torch.cuda.synchronize()

    benchmark.group = case
    benchmark.pedantic(timed, rounds=60, iterations=1, warmup_rounds=10)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update({"contender": contender, "case": case,
                                 "bytes": bytes_moved, "GB/s": bytes_moved / median / 1e9})
