"""The two numbers of a roofline: what a layer must cost at least, and what a card can do.

A ``Cost`` counts the floating-point operations a layer must compute and the fewest bytes it
must move through device memory (each input, weight and output once). Convolutions and
linear layers are judged in TFLOP/s, everything else (BatchNorm, pools, ReLU, dropout) in
GB/s. ``CEILINGS`` holds the rates measured on the cards this project is lent, with how and when
each was measured; a card not listed has no ceilings (its "% of roofline" is unknown).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import nn

from fastarch.kernels.tensor_cores import Operand

COMPUTE_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class Cost:
    flops: int = 0
    bytes: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    @property
    def metric(self) -> str:
        """How the work is judged: arithmetic when there is any, else memory traffic."""
        return "TFLOP/s" if self.flops else "GB/s"

    def rate(self, seconds: float) -> float:
        """Achieved TFLOP/s or GB/s (see ``metric``) for a run of ``seconds``."""
        return (self.flops / 1e12 if self.flops else self.bytes / 1e9) / seconds


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _weights(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _matmul_flops(module: nn.Module, output_shape: tuple[int, ...]) -> int:
    """2 * outputs * reduction length: conv (per output, C/groups * R * S) and linear (K)."""
    if isinstance(module, nn.Conv2d):
        reduction = module.in_channels // module.groups * math.prod(module.kernel_size)
    else:
        reduction = module.in_features
    return 2 * _numel(output_shape) * reduction


def forward_cost(module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                 element_size: int) -> Cost:
    """One leaf layer's forward: input, weights and output each moved once."""
    moved = (_numel(input_shape) + _weights(module) + _numel(output_shape)) * element_size
    flops = _matmul_flops(module, output_shape) if isinstance(module, COMPUTE_LAYERS) else 0
    return Cost(flops, moved)


def backward_cost(module: nn.Module, input_shape: tuple[int, ...],
                  output_shape: tuple[int, ...], element_size: int,
                  input_grad: bool = True) -> Cost:
    """One leaf layer's backward: the output gradient and what the layer must re-read in,
    the gradients out. Conv / linear: data grad (when ``input_grad``) + weight grad, each a
    forward's FLOPs; BatchNorm re-reads its input; the others map dy to dx."""
    x, y, w = _numel(input_shape), _numel(output_shape), _weights(module)
    if isinstance(module, COMPUTE_LAYERS):
        flops = _matmul_flops(module, output_shape) * (2 if input_grad else 1)
        moved = y + x + w + w + (x if input_grad else 0)
        return Cost(flops, moved * element_size)
    rereads = x if isinstance(module, nn.modules.batchnorm._BatchNorm) else 0
    return Cost(0, (y + x + rereads) * element_size)


@dataclass(frozen=True)
class Ceilings:
    """A card's measured ceilings: device copy bandwidth (bytes read + written) and dense
    matrix rates by operand kind."""
    card: str
    copy_gbs: float
    matmul_tflops: dict[Operand, float]
    source: str

    def peak(self, cost: Cost, operand: Operand) -> Optional[float]:
        """The ceiling ``cost`` is judged against, in its own metric."""
        return self.matmul_tflops.get(operand) if cost.flops else self.copy_gbs


# bf16/fp16, tf32 and full-precision fp32 dense GEMM rates (TFLOP/s), measured on an H200.
_RATES = {Operand.SIXTEEN_BIT: 798.0, Operand.TF32: 372.0, Operand.IEEE: 51.0}

# Matched against torch.cuda.get_device_name() in order ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
# Every number is measured, on the machines lent to this project, not a datasheet figure.
CEILINGS = (
    # The bf16 matrix ceiling is an 8192^3 GEMM on random data: a 702 TFLOP/s bf16 figure
    # measured first was below what cuDNN itself reached on VGG conv3_3 (0.302 ms, 784 TFLOP/s).
    Ceilings("H200", 4276.0, _RATES,
             "measured on an NVIDIA H200 (torch 2.11 + CUDA 13.0): device-to-device copy "
             "(bytes read + written) and the tf32 / fp32 GEMM rates as triton.testing.do_bench "
             "medians, recorded 2026-11-26; bf16: 8192^3 GEMM on random data, 769-798 "
             "TFLOP/s, 2026-11-04"),
    # Same SMs as the H200, so the tf32 / fp32 matrix rates are taken from it (unmeasured here).
    Ceilings("H100", 3000.0, _RATES,
             "measured on an NVIDIA H100 on 2026-11-13: device-to-device copy 3.0 TB/s, bf16 "
             "8192^3 GEMM on random data 798 TFLOP/s; tf32 / fp32 are the H200's"),
)


def ceilings_for(device_name: str) -> Optional[Ceilings]:
    return next((c for c in CEILINGS if c.card in device_name), None)
