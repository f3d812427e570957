"""What the tests and benchmarks share: float64 references, tolerances by dtype and
reduction length, random inputs, and outcomes compared with torch's (FlagGems' testing/ is
the model)."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

# rtol by the dtype of the result being checked; TF32 is fp32 storage with a 10-bit mantissa.
RTOL: dict[str, float] = {
    "float32": 1e-5,
    "tf32": 1e-3,
    "float16": 1e-2,
    "bfloat16": 1e-2,
}


def tolerance(dtype: torch.dtype | str, reduction_length: int = 1) -> tuple[float, float]:
    """(rtol, atol) for a result in ``dtype`` that sums ``reduction_length`` unit-scale terms:
    atol grows like the rounding error of a sum, with the square root of its length."""
    key = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    rtol = RTOL[key]
    return rtol, rtol * math.sqrt(max(reduction_length, 1))


def assert_close(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype | str,
                 reduction_length: int = 1, name: str = "output") -> None:
    """Compare a kernel result with its float64 reference; the result's dtype is checked too."""
    expected_dtype = torch.float32 if dtype == "tf32" else dtype
    assert actual.dtype == expected_dtype, \
        f"{name}: dtype {actual.dtype}, expected {expected_dtype}"
    assert actual.shape == reference.shape, \
        f"{name}: shape {tuple(actual.shape)}, expected {tuple(reference.shape)}"
    rtol, atol = tolerance(dtype, reduction_length)
    torch.testing.assert_close(actual.detach().cpu().double(), reference.detach().cpu().double(),
                               rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}")


def random_input(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                 channels_last: bool = False, generator: torch.Generator | None = None,
                 requires_grad: bool = False) -> torch.Tensor:
    """Fresh standard-normal data (never zeros), optionally NHWC in memory."""
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.to(device).requires_grad_(requires_grad)


def reference_grads(fn, inputs: list[torch.Tensor], grad_output: torch.Tensor
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``fn`` in float64 on the CPU copies of ``inputs``; return output and input grads."""
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_output.detach().cpu().double())
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_same_outcome(ours: Callable[[], Any], theirs: Callable[[], Any]) -> None:
    """``ours()`` returns exactly what ``theirs()`` returns (a tensor or a tuple of them), or
    raises the exception type it raises."""
    try:
        expected = theirs()
    except Exception as error:  # any type: its type is what ours must raise
        try:
            ours()
        except Exception as mine:
            assert type(mine) is type(error), f"raised {mine!r}, torch raised {error!r}"
            return
        raise AssertionError(f"returned a result, torch raised {error!r}") from None
    actual = ours()
    pairs = zip(actual, expected, strict=True) if isinstance(expected, tuple) \
        else [(actual, expected)]
    for mine, torchs in pairs:
        assert mine.dtype == torchs.dtype and torch.equal(mine, torchs), (mine, torchs)


@contextlib.contextmanager
def cudnn_tf32(enabled: bool) -> Iterator[None]:
    """torch's cuDNN TF32 switch (which fastarch's fp32 convolutions follow) set for a block."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before
