"""Every kernel config a launcher can choose, as launches built on meta tensors of
representative layers of LeNet-5, AlexNet and VGG: one builder per family, in the report's
order, each building its launches on the tiles a ``TileChoice`` gives (the static tiles, or
those and the autotuning candidates)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from fastarch.compile_report.cases import HOPPER, Case, TileChoice
from fastarch.compile_report.conv_launches import conv2d_cases
from fastarch.compile_report.linear_launches import linear_cases
from fastarch.compile_report.memory_bound_launches import (avg_pool_cases, batch_norm_cases,
                                                           max_pool_cases, relu_cases)
from fastarch.kernels.launch import Launch

FAMILIES: dict[str, Callable[[TileChoice], list[Case]]] = {
    "max_pool": max_pool_cases,
    "avg_pool": avg_pool_cases,
    "conv2d": conv2d_cases,
    "linear": linear_cases,      # with dropout, which only the classifier runs
    "relu": relu_cases,
    "batch_norm": batch_norm_cases,
}

# The families whose kernels run on tensor cores (HMMA before Hopper, HGMMA on it).
TENSOR_CORE_FAMILIES = ("conv2d", "linear")


def all_cases(families: Sequence[str] = tuple(FAMILIES), choice: TileChoice = HOPPER
              ) -> list[Case]:
    return [case for family in families for case in FAMILIES[family](choice)]


def all_launches(families: Sequence[str] = tuple(FAMILIES)) -> list[Launch]:
    return [case.launch for case in all_cases(families)]
