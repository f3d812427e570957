"""Named ranges around fastarch's ops, for torch.profiler traces and Nsight Systems.

The custom operators appear in a trace under their own names (``fastarch::conv2d``, ...).
``@op_range("conv2d.backward")`` on a function (an operator's backward formula) runs it inside
a ``record_function("fastarch::conv2d.backward")`` range. The kernels launched there appear
under the range (each launch records its own name: kernel and config). Ranges are entered only while a
profiler is running, so timing runs pay nothing; under
``torch.autograd.profiler.emit_nvtx()`` the same ranges become NVTX ranges.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

PREFIX = "fastarch::"

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
