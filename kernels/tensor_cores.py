"""What the matrix-multiply kernels (conv forward, dgrad, wgrad, linear) share: the dot with
its operand precision, and the host-side choice of that precision from torch's TF32 switches."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastarch import backend


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    """acc + a @ b. The Triton 3.6 interpreter multiplies bf16 operands as their raw uint16
    bits, so interpreted bf16 upcasts first (exact: a bf16 product fits in fp32)."""
    if UPCAST_OPERANDS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def operand_kind(dtype: torch.dtype, allow_tf32: bool) -> str:
    """The config family of a dtype: "16bit", "tf32" or "ieee" (fp32 without tensor cores)."""
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if allow_tf32 else "ieee"


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """The dot's input_precision: fp32 rounds to TF32 only when allowed; 16-bit ignores it."""
    return "ieee" if operand_kind(dtype, allow_tf32) == "ieee" else "tf32"


def upcast_operands(dtype: torch.dtype) -> bool:
    return backend.INTERPRETER and dtype == torch.bfloat16


def cudnn_conv_allows_tf32() -> bool:
    """torch's TF32 switch for convolutions: ``torch.backends.cudnn.allow_tf32`` or the newer
    per-op ``fp32_precision`` ("none" defers to the enclosing backend, then the global).
    Reading ``allow_tf32`` raises in torch 2.13 once the two APIs have been mixed."""
    backends = torch.backends
    if not hasattr(backends.cudnn, "conv"):
        return bool(backends.cudnn.allow_tf32)
    for precision in (backends.cudnn.conv.fp32_precision, backends.cudnn.fp32_precision,
                      backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def matmul_allows_tf32() -> bool:
    """torch's TF32 switch for matmuls (what F.linear on CUDA obeys)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)
