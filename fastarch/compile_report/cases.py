"""What the launch builders share: a report case (a launch and the dtype of the data it
moves), the tiles to build each layer's launches on (``TileChoice``), and the meta tensors
launches are built on (shapes and strides, no storage)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastarch import autotune
from fastarch.kernels.launch import Launch, TileConfig


@dataclass(frozen=True)
class Case:
    """One launch to compile, built on a representative layer; ``dtype`` is that of its
    main data tensor (activations, GEMM operands); ``candidate``: its tile is an autotuning
    candidate, not the static one."""
    launch: Launch
    dtype: torch.dtype
    candidate: bool = False


def cases(dtype: torch.dtype, launches: list[Launch], candidate: bool = False) -> list[Case]:
    return [Case(launch, dtype, candidate) for launch in launches]


@dataclass(frozen=True)
class TileChoice:
    """The GPU the launches are built for and the tiles a builder compiles for a launch on
    a representative layer: the static tile its launcher ships and, with ``candidates``,
    every autotuning candidate of the profile's generation that ``autotune.fits`` keeps for
    it, by name."""
    profile: autotune.DeviceProfile
    candidates: bool = False

    @property
    def hopper(self) -> bool:
        return self.profile.generation is autotune.Generation.HOPPER

    def tiles(self, static: TileConfig, dtype: torch.dtype,
              candidates: Callable[[autotune.Generation], Sequence[TileConfig]]
              ) -> list[TileConfig]:
        if not self.candidates:
            return [static]
        size = torch.empty((), dtype=dtype).element_size()
        found = {static.name: static}
        for tile in candidates(self.profile.generation):
            if autotune.fits(tile, size, self.profile):
                found.setdefault(tile.name, tile)
        return list(found.values())

    def elementwise_tiles(self, static: TileConfig, dtype: torch.dtype) -> list[TileConfig]:
        """``tiles`` of a tuned memory-bound kernel (its candidates: ``static``'s
        elementwise variants)."""
        return self.tiles(static, dtype,
                          lambda generation: autotune.elementwise_candidates(static))


# Hopper's static tiles: the launches the compile report checks by default.
HOPPER = TileChoice(autotune.ARCH_PROFILES["sm_90a"])


def meta_tensor(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = True
                ) -> torch.Tensor:
    """A shape-and-stride-only tensor (channels_last when 4-D unless asked otherwise)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def matrix(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A contiguous meta tensor."""
    return meta_tensor(shape, dtype, channels_last=False)
