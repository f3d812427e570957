"""A kernel launch as data: the launchers build one, run it, and the Hopper compile check
(``fastarch.sm90``) compiles the very same record for every config a launcher can choose."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton


@dataclass(frozen=True)
class Launch:
    kernel: Any  # a triton JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 1
    name: str = field(default="")

    def __call__(self) -> None:
        if any(g == 0 for g in self.grid):
            return
        if torch.autograd._profiler_enabled():  # traces show the kernel and its config
            with torch.autograd.profiler.record_function(self.name or self.kernel.__name__):
                self._launch()
        else:
            self._launch()

    def _launch(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs,
                               num_warps=self.num_warps, num_stages=self.num_stages)


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
