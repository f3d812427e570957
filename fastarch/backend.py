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

import torch
from torch.autograd import forward_ad

from fastarch.kernels.runtime import INTERPRETER, POISON_OUTPUTS, empty, memory_format_of
from fastarch.kernels.tensor_cores import Operand

__all__ = ["INTERPRETER", "POISON_OUTPUTS", "empty", "memory_format_of", "fallback_counts",
           "runs_triton", "accelerates", "use_triton", "forward_ad_active", "count_fallback", "conv_operand",
           "matmul_operand"]

ACCELERATED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

fallback_counts: collections.Counter[str] = collections.Counter()


def runs_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s device runs our Triton kernels (compiled or interpreted)."""
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and INTERPRETER


def accelerates(tensor: torch.Tensor) -> bool:
    """Whether our kernels take ``tensor`` (its device, its dtype, no forward-mode AD);
    counts nothing."""
    return runs_triton(tensor) and tensor.dtype in ACCELERATED_DTYPES \
        and not forward_ad_active()


def use_triton(op: str, tensor: torch.Tensor) -> bool:
    """Decide between our kernel and torch's fallback for ``op``; counts every fallback."""
    if accelerates(tensor):
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


def conv_operand(dtype: torch.dtype) -> Operand:
    """A convolution's operand kind: fp32 rounds to TF32 when torch's cuDNN switch allows it
    (``torch.backends.cudnn.allow_tf32``, or the newer per-op ``fp32_precision``: "none"
    defers to the enclosing backend, then the global). Reading ``allow_tf32`` raises in
    torch 2.13 once the two APIs have been mixed, so the new one is read when it exists."""
    backends = torch.backends
    if not hasattr(backends.cudnn, "conv"):
        return Operand.of(dtype, bool(backends.cudnn.allow_tf32))
    for precision in (backends.cudnn.conv.fp32_precision, backends.cudnn.fp32_precision,
                      backends.fp32_precision):
        if precision != "none":
            return Operand.of(dtype, precision == "tf32")
    return Operand.of(dtype, False)


def matmul_operand(dtype: torch.dtype) -> Operand:
    """A linear layer's operand kind: TF32 when ``torch.backends.cuda.matmul.allow_tf32``
    allows it (what F.linear on CUDA obeys)."""
    return Operand.of(dtype, bool(torch.backends.cuda.matmul.allow_tf32))
