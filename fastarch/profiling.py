"""Named ranges around fastarch's ops, for torch.profiler traces and Nsight Systems.

``@named("conv2d")`` on an autograd Function runs its forward inside a
``record_function("fastarch::conv2d")`` range and its backward inside
``"fastarch::conv2d.backward"``; the kernels launched there appear under the range (their
own names say which kernel and config). Ranges are entered only while a profiler is
running, so timing runs pay nothing; under ``torch.autograd.profiler.emit_nvtx()`` the same
ranges become NVTX ranges.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

PREFIX = "fastarch::"

FunctionClass = TypeVar("FunctionClass", bound=type)


def op_range(name: str) -> Callable[[Callable], Callable]:
    """Decorate ``fn`` to run inside the range ``fastarch::<name>`` when profiling."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def ranged(*args, **kwargs):
            if not torch.autograd._profiler_enabled():
                return fn(*args, **kwargs)
            with torch.autograd.profiler.record_function(PREFIX + name):
                return fn(*args, **kwargs)
        return ranged
    return decorate


def named(name: str) -> Callable[[FunctionClass], FunctionClass]:
    """Class decorator for a torch.autograd.Function: ranges around forward and backward."""
    def decorate(cls: FunctionClass) -> FunctionClass:
        cls.forward = staticmethod(op_range(name)(cls.forward))
        cls.backward = staticmethod(op_range(f"{name}.backward")(cls.backward))
        return cls
    return decorate
