"""Where an op runs, decided in one place.

* CUDA tensors run the compiled Triton kernels.
* CPU tensors run the same kernels under the Triton interpreter when ``TRITON_INTERPRET=1``
  was set before Triton was imported (this is how the tests run without a GPU).
* Anything else (CPU without the interpreter, other devices, dtypes we do not accelerate)
  runs torch's own implementation. Every such call is counted in ``fallback_counts`` so the
  test suite can prove it exercised the Triton kernels and not the fallback.
* Forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``) runs torch's
  implementation too, counted: our operators carry backward formulas only, torch's ops carry
  the forward-mode (jvp) ones, so tangents come out right instead of silently zero.
"""
from __future__ import annotations

import collections
import os
from collections.abc import Sequence

import torch
from torch.autograd import forward_ad

INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Set by the tests: fill every kernel output with NaN (floating) or the most negative
# integer (integral) before the kernel runs, so an element a kernel forgets to write fails.
POISON_OUTPUTS: bool = os.environ.get("FASTARCH_POISON_OUTPUTS", "0") == "1"

ACCELERATED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

fallback_counts: collections.Counter[str] = collections.Counter()


def runs_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s device runs our Triton kernels (compiled or interpreted)."""
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and INTERPRETER


def use_triton(op: str, tensor: torch.Tensor) -> bool:
    """Decide between our kernel and torch's fallback for ``op``; counts every fallback."""
    if runs_triton(tensor) and tensor.dtype in ACCELERATED_DTYPES \
            and not forward_ad_active():
        return True
    count_fallback(op)
    return False


def forward_ad_active() -> bool:
    """Whether forward-mode AD can be carrying tangents: only inside
    ``torch.autograd.forward_ad.dual_level()``, which ``torch.func.jvp`` and ``jacfwd`` enter
    (a dual tensor's tangent does not outlive its level)."""
    return forward_ad._current_level >= 0


def count_fallback(op: str) -> None:
    """Record that ``op`` ran torch's implementation (for arguments we do not accelerate)."""
    fallback_counts[op] += 1


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
          memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Allocate a kernel output (poisoned when ``POISON_OUTPUTS`` is set)."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min)
    return out


def memory_format_of(tensor: torch.Tensor) -> torch.memory_format:
    """channels_last for NHWC-dense 4-D tensors, else contiguous (what torch's pools return)."""
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) \
            and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
