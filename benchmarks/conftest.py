"""fastarch against PyTorch eager (cuDNN) and torch.compile, per layer and per model, on a GPU.

Without a GPU every case skips with the reason, except in smoke mode (``--smoke``): tiny
shapes through the Triton interpreter, benchmark timing disabled, so the benchmark code
cannot rot. Options: ``--dtype`` (bf16 default), ``--no-tf32``, ``--quick`` (the subset
gpu_check.sh runs), ``--rounds``, ``--time-budget`` (skip what is left after that many
seconds, so a bounded run still writes its JSON).
"""
import os
import sys
import time

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from fastarch import backend  # noqa: E402
from fastarch.profile import DTYPES  # noqa: E402

_SESSION_START = time.monotonic()


def pytest_addoption(parser):
    group = parser.getgroup("fastarch benchmarks")
    group.addoption("--smoke", action="store_true",
                    help="tiny shapes through the Triton interpreter (CI); implies "
                         "--benchmark-disable")
    group.addoption("--quick", action="store_true",
                    help="only the cases in benchmarks/cases.py QUICK (gpu_check.sh)")
    group.addoption("--dtype", default="bf16", choices=sorted(DTYPES),
                    help="activations and weights of every contender (default bf16)")
    group.addoption("--no-tf32", action="store_true",
                    help="fp32 without TF32 on every contender (cuDNN, cuBLAS, fastarch)")
    group.addoption("--rounds", type=int, default=20, help="timed rounds per benchmark")
    group.addoption("--time-budget", type=float, default=0.0,
                    help="seconds after which the remaining benchmarks skip (0: no limit)")


def pytest_configure(config):
    if config.getoption("--smoke"):
        config.option.benchmark_disable = True
    elif HAS_CUDA:
        config.option.benchmark_timer = "timing.synchronized_clock"


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    return request.config.getoption("--smoke")


@pytest.fixture(scope="session")
def tf32(request) -> bool:
    return not request.config.getoption("--no-tf32")


@pytest.fixture(scope="session")
def bench_dtype(request) -> torch.dtype:
    return DTYPES[request.config.getoption("--dtype")]


@pytest.fixture(scope="session")
def bench_device(smoke, tf32) -> str:
    if smoke:
        return "cuda" if HAS_CUDA else "cpu"
    if not HAS_CUDA:
        pytest.skip("no CUDA device: the benchmarks time GPU kernels (run with --smoke "
                    "for the interpreter smoke mode)")
    if backend.POISON_OUTPUTS:
        pytest.skip("FASTARCH_POISON_OUTPUTS is set (tests/conftest.py sets it): every kernel "
                    "output would be NaN-filled first; run `pytest benchmarks` on its own")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return "cuda"


@pytest.fixture(scope="session")
def medians() -> dict:
    """(case, mode) -> {contender: median seconds}, for the speedups."""
    return {}


@pytest.fixture(autouse=True)
def time_budget(request) -> None:
    budget = request.config.getoption("--time-budget")
    if budget and time.monotonic() - _SESSION_START > budget:
        pytest.skip(f"--time-budget {budget:g} s spent")
