"""fastarch against PyTorch eager (cuDNN) per layer, timed on a GPU.

Without a GPU every case skips with the reason, except in smoke mode (``--smoke``): tiny shapes
through the Triton interpreter, with ``--benchmark-disable``, so the benchmark code cannot rot.
"""
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--smoke", action="store_true",
                     help="tiny shapes through the Triton interpreter (CI); implies --benchmark-disable")


def pytest_configure(config):
    if config.getoption("--smoke"):
        config.option.benchmark_disable = True


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    return request.config.getoption("--smoke")


@pytest.fixture(scope="session")
def bench_device(smoke) -> str:
    if smoke:
        return "cuda" if HAS_CUDA else "cpu"
    if not HAS_CUDA:
        pytest.skip("no CUDA device: the benchmarks time GPU kernels (run with --smoke "
                    "--benchmark-disable for the interpreter smoke mode)")
    torch.backends.cudnn.benchmark = True
    return "cuda"


sys.path.insert(0, os.path.dirname(__file__))
