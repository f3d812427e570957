"""The harness: on a machine without a GPU the kernels run on CPU tensors under the Triton
interpreter, which must be switched on before triton is imported; with a GPU the same tests
run compiled kernels on CUDA. Every kernel output is NaN-poisoned before the kernel runs."""
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["FASTARCH_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402

from fastarch import backend  # noqa: E402


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def seeded() -> None:
    """A fixed seed per test: fresh random data, reproducible failures."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def no_silent_fallback(request):
    """A test exercises our kernels unless it says otherwise: any torch fallback fails it."""
    before = dict(backend.fallback_counts)
    yield
    if request.node.get_closest_marker("torch_fallback") is None:
        assert dict(backend.fallback_counts) == before, (
            f"ran torch's fallback instead of a Triton kernel: {dict(backend.fallback_counts)}")
