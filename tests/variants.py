"""Parametrizations that thin a product whose last factor is independent of the others.

Some factors change no kernel path in combination with the case and the variant they are
crossed with: the memory layout of a convolution (its kernels take any strides: the layout
changes the addresses they compute, never which code runs), a linear's bias (an add in the
epilogue and a column sum, the same in every dtype and shape), the dtype of a convolution
epilogue (applied to the fp32 accumulator). Running every case in every variant *and* every
value of such a factor repeats each path once per value; ``alternating`` runs every case in
every variant with the factor rotating instead, so that each case and each variant still
meet every value (the GPU check, ``tests/conftest.py``, runs one parametrization of each
dtype and layout)."""
from collections.abc import Iterable, Sequence

import pytest


def alternating(cases: Iterable[str], variants: Iterable[str], values: Sequence[str]) -> list:
    """pytest params (case, variant, value), with ids ``case-variant-value``: every case in
    every variant, the value rotating with both (a case in as many variants as there are
    values meets each of them, and so does a variant over as many cases)."""
    variants = list(variants)
    return [pytest.param(case, variant, values[(i + j) % len(values)],
                         id=f"{case}-{variant}-{values[(i + j) % len(values)]}")
            for i, case in enumerate(cases) for j, variant in enumerate(variants)]
