"""What the matrix-multiply kernels (conv forward, dgrad, wgrad, linear) share: the dot with
its operand precision, and the operand kind that picks both a config family and that
precision."""
from __future__ import annotations

import enum

import torch
import triton
import triton.language as tl

from .runtime import INTERPRETER


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    """acc + a @ b. The Triton 3.6 interpreter multiplies bf16 operands as their raw uint16
    bits, so interpreted bf16 upcasts first (exact: a bf16 product fits in fp32)."""
    if UPCAST_OPERANDS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


class Operand(enum.Enum):
    """What a GEMM multiplies: 16-bit floats, fp32 rounded to TF32 on tensor cores, or fp32
    in full precision (no tensor cores). Config tables are keyed on it (``.value``)."""
    SIXTEEN_BIT = "16bit"
    TF32 = "tf32"
    IEEE = "ieee"

    @classmethod
    def of(cls, dtype: torch.dtype, allow_tf32: bool) -> Operand:
        """fp32 rounds to TF32 only when torch's switch for the op allows it."""
        if dtype != torch.float32:
            return cls.SIXTEEN_BIT
        return cls.TF32 if allow_tf32 else cls.IEEE

    @property
    def dot_precision(self) -> str:
        """``tl.dot``'s input_precision (16-bit operands ignore it)."""
        return "ieee" if self is Operand.IEEE else "tf32"


def upcast_operands(dtype: torch.dtype) -> bool:
    """Whether ``dot`` must upcast operands of ``dtype`` (interpreted bf16)."""
    return INTERPRETER and dtype == torch.bfloat16
