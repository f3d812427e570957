"""fastarch against PyTorch eager (cuDNN) and torch.compile, per layer and per model, on a GPU.

Modes:

* on a GPU: every case of ``cases.py`` (or ``--quick``: the subset gpu_check.sh runs), timed;
* ``--smoke`` (CI's test command): tiny shapes through the Triton interpreter, benchmark
  timing disabled, so that the benchmark code cannot rot;
* ``--dry-run`` (``gpu_check.sh --dry-run``): a few of the ``--quick`` cases (``DRY_RUN``) at
  the smoke shapes on the CPU under the interpreter, timed with one round and written to JSON
  like a GPU run, with torch.compile on its ``aot_eager`` backend (inductor's CPU C++ builds
  would take minutes);
* otherwise, without a GPU, nothing is collected and the header says why.

Options: ``--dtype`` (bf16 default), ``--no-tf32``, ``--quick``, ``--convs`` (every conv
layer in eval), ``--contenders`` (which of eager, compile, fastarch, tuned, tma to run),
``--rounds``, ``--time-budget`` (skip what is left after that many seconds, so that a
bounded run ends by itself and writes its JSON).
"""
import os
import signal
import sys
import time

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
# The tests' interpreted tile budget (tests/conftest.py): when one pytest run collects both
# folders, the first import of fastarch fixes it for the whole process.
os.environ["FASTARCH_INTERPRETER_TILE_ELEMENTS"] = "8192"

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from cases import CONTENDERS  # noqa: E402
from fastarch import backend  # noqa: E402
from fastarch.inventory import DTYPES  # noqa: E402

_SESSION_START = time.monotonic()


def pytest_addoption(parser):
    group = parser.getgroup("fastarch benchmarks")
    group.addoption("--smoke", action="store_true",
                    help="tiny shapes through the Triton interpreter (CI); implies "
                         "--benchmark-disable")
    group.addoption("--dry-run", action="store_true",
                    help="a few --quick cases at tiny shapes on the CPU, timed and written to "
                         "JSON like a GPU run (gpu_check.sh --dry-run)")
    group.addoption("--quick", action="store_true",
                    help="only the cases in benchmarks/cases.py QUICK (gpu_check.sh)")
    group.addoption("--convs", action="store_true",
                    help="every conv layer in eval (gpu_check.sh's TMA vs pointer vs cuDNN "
                         "stage; with --dry-run, CONVS_DRY_RUN at tiny shapes)")
    group.addoption("--contenders", default=",".join(CONTENDERS),
                    help="comma-separated subset of eager,compile,fastarch,tuned,tma "
                         "(default: all)")
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
    # A stage cut by SIGINT must end as an interrupted session, which still writes its JSON:
    # restore Python's handler in case the launching shell started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(hookwrapper=True)
def pytest_benchmark_generate_json(config, benchmarks, include_data, machine_info, commit_info):
    """A stage cut by SIGINT leaves the case it was timing without rounds (pytest-benchmark
    would fail to write any JSON) or without its record: drop that one, keep every other."""
    benchmarks[:] = [bench for bench in benchmarks if bench and "case" in bench.extra_info]
    yield


def _benchmarks_run(config) -> bool:
    return HAS_CUDA or config.getoption("--smoke") or config.getoption("--dry-run")


def pytest_report_header(config):
    if not _benchmarks_run(config):
        return ("benchmarks: no CUDA device, so the GPU benchmarks are not collected; "
                "`bash benchmarks/gpu_check.sh --dry-run OUT` runs their whole pipeline on the "
                "CPU, `pytest benchmarks --smoke` runs each case once under the interpreter")
    return None


def pytest_ignore_collect(collection_path, config):
    if collection_path.name == "test_benchmarks.py" and not _benchmarks_run(config):
        return True
    return None


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    """Untimed: one call per case (CI's test command)."""
    return request.config.getoption("--smoke")


@pytest.fixture(scope="session")
def tiny(request) -> bool:
    """The cases at their smoke shapes (``--smoke`` and ``--dry-run``)."""
    return request.config.getoption("--smoke") or request.config.getoption("--dry-run")


@pytest.fixture(scope="session")
def tf32(request) -> bool:
    return not request.config.getoption("--no-tf32")


@pytest.fixture(scope="session")
def bench_dtype(request) -> torch.dtype:
    return DTYPES[request.config.getoption("--dtype")]


@pytest.fixture(scope="session")
def bench_device(tiny, tf32) -> str:
    if tiny:
        return "cuda" if HAS_CUDA else "cpu"
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
