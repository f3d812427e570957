"""A kernel launch as data: the launchers build one, run it, and the compile report
(``fastarch.compile_report``) compiles the very same record for every config a launcher can
choose.

Every launch declares, for each tensor argument, the ``Extent`` its kernel indexes through
it, and is checked against it before it runs (``Launch.check``): the tensor must be exactly
the view the kernel walks (shape, and the strides the kernel is given or assumes), inside its
storage, on the launch's device and of a dtype the kernel takes. An argument that does not fit
is an error naming it, never an access outside the memory the caller owns."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import triton

from .runtime import INTERPRETER_TILE_ELEMENTS

# What the kernels compute on; the default dtypes of an extent (the data tensors).
FLOATING = (torch.float32, torch.float16, torch.bfloat16)

Stride = Union[int, str]


@dataclass(frozen=True)
class Extent:
    """The elements a kernel touches through one pointer argument.

    The kernel reaches element ``index`` (row-major over ``shape``) at the pointer plus
    sum(index[d] * strides[d]); a stride is the name of the kernel argument that carries it or
    the int the kernel assumes (1 along a dense axis). The tensor passed must be this very
    view: its own elements, in the same row-major order (``shape`` may split or merge the
    tensor's axes, as a reshape would). A ``flat`` extent is walked in memory order instead
    (elementwise kernels): its tensor must be non-overlapping and dense, and every flat tensor
    of a launch must share one layout, so position i is the same element in each.
    ``dtypes``: those the kernel takes."""
    shape: tuple[int, ...]
    strides: tuple[Stride, ...]
    dtypes: tuple[torch.dtype, ...] = FLOATING
    flat: bool = False


def dense(*shape: int, dtypes: tuple[torch.dtype, ...] = FLOATING) -> Extent:
    """A contiguous row-major ``shape``: the layout a kernel assumes for a buffer it
    indexes without strides."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return Extent(tuple(shape), tuple(reversed(strides)), dtypes)


def flat(numel: int, dtypes: tuple[torch.dtype, ...] = FLOATING) -> Extent:
    """``numel`` elements an elementwise kernel walks in memory order."""
    return Extent((numel,), (1,), dtypes, flat=True)


# The placeholder passed for an absent optional argument: never dereferenced, not checked.
UNUSED = Extent((0,), (1,), dtypes=())


def vector(t: torch.Tensor | None, length: int, stride: str,
           dtypes: tuple[torch.dtype, ...] = FLOATING) -> Extent:
    """A [length] vector read at the stride argument named ``stride``; ``UNUSED`` when the
    optional argument ``t`` is absent."""
    return UNUSED if t is None else Extent((length,), (stride,), dtypes)


def _canonical(shape, strides) -> list[tuple[int, int]]:
    """(size, stride) axes with size-1 axes dropped and each axis merged into the one before
    it where the two are contiguous: two views index the same elements in the same row-major
    order exactly when their canonical forms are equal."""
    axes: list[tuple[int, int]] = []
    for size, stride in zip(shape, strides):
        if size == 1:
            continue
        if axes and axes[-1][1] == stride * size:
            axes[-1] = (axes[-1][0] * size, stride)
        else:
            axes.append((size, stride))
    return axes


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill numel consecutive slots, in some order."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    axes = sorted(zip(t.shape, t.stride()), key=lambda axis: -axis[1])
    sizes, strides = [size for size, _ in axes], [stride for _, stride in axes]
    return _canonical(sizes, strides) in ([], [(t.numel(), 1)])


class LaunchArgumentError(RuntimeError):
    """A tensor argument that does not fit what its kernel indexes."""


@dataclass(frozen=True)
class Launch:
    kernel: Any  # a triton JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    extents: dict[str, Extent]  # one per tensor argument
    num_warps: int = 4
    num_stages: int = 1
    name: str = field(default="")

    def __call__(self) -> None:
        self.check()
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

    def check(self) -> None:
        """Raise ``LaunchArgumentError`` naming the first tensor argument that is not the
        view its extent declares, on the launch's device, in its storage."""
        device, flat_layout, checked = None, None, 0
        for name, t in self.args.items():
            if not isinstance(t, torch.Tensor):
                continue
            extent = self.extents.get(name)
            if extent is None:
                self._fail(name, "is a tensor without a declared extent")
            checked += 1
            if extent is UNUSED:
                continue
            device = t.device if device is None else device
            self._check_kind(name, t, extent, device)
            if math.prod(extent.shape) == 0:  # an empty tensor: nothing is dereferenced
                continue
            strides = tuple(self.args[s] if isinstance(s, str) else s for s in extent.strides)
            if extent.flat:
                layout = self._check_flat(name, t, extent)
                if flat_layout is not None and layout != flat_layout:
                    self._fail(name, "is not in the layout of the other elementwise operands "
                                     f"(strides {t.stride()} for shape {list(t.shape)})")
                flat_layout = layout
            elif (extent.shape != t.shape or strides != t.stride()) and \
                    _canonical(extent.shape, strides) != _canonical(t.shape, t.stride()):
                self._fail(name, f"is indexed as shape {list(extent.shape)} with strides "
                                 f"{list(strides)}, but got shape {list(t.shape)} with strides "
                                 f"{list(t.stride())}")
            self._check_storage(name, t, extent.shape, strides)
        if checked != len(self.extents):
            self._fail(", ".join(name for name in self.extents
                                 if not isinstance(self.args.get(name), torch.Tensor)),
                       "has a declared extent but is not a tensor argument")

    def _check_kind(self, name: str, t: torch.Tensor, extent: Extent,
                    device: torch.device) -> None:
        if t.device != device:
            self._fail(name, f"is on {t.device}, the other arguments on {device}")
        if extent.dtypes and t.dtype not in extent.dtypes:
            self._fail(name, f"has dtype {t.dtype}, expected one of "
                             f"{[str(d) for d in extent.dtypes]}")

    def _check_flat(self, name: str, t: torch.Tensor, extent: Extent) -> list:
        if t.numel() != extent.shape[0] or not _is_dense(t):
            self._fail(name, f"must be a dense tensor of {extent.shape[0]} elements, but got "
                             f"shape {list(t.shape)} with strides {list(t.stride())}")
        return _canonical(t.shape, t.stride())

    def _check_storage(self, name: str, t: torch.Tensor, shape: tuple[int, ...],
                       strides: tuple[int, ...]) -> None:
        """The last element the extent reaches lies in the storage (the first is the
        tensor's own: the extent's strides are the tensor's, never negative)."""
        last = t.storage_offset()
        for size, stride in zip(shape, strides):
            last += (size - 1) * stride
        capacity = t.untyped_storage().nbytes() // t.element_size()
        if last >= capacity:
            self._fail(name, f"reaches element {last} of a storage of {capacity}")

    def _fail(self, name: str, problem: str) -> None:
        raise LaunchArgumentError(
            f"{self.name or self.kernel.__name__}: argument {name} {problem}")


@dataclass(frozen=True)
class TileConfig:
    """How a kernel is launched: a [BLOCK_M x BLOCK_N] tile stepping BLOCK_K along its
    reduction (1 along an axis the kernel does not have: an elementwise kernel's block is
    ``block_m``), with its warps and software-pipeline stages. ``tma``: a tile of a family's
    TMA kernel (Hopper tensor descriptors), where the family has one."""
    name: str
    block_m: int
    block_n: int = 1
    block_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    tma: bool = False


def interpreter_tile(m: int | None, n: int | None = None, k: int | None = None, *,
                     long_axis: str = "m", max_long: int | None = None, max_m: int = 128,
                     max_n: int = 128, max_k: int = 128, min_block: int = 16) -> TileConfig:
    """The tile every kernel takes under the Triton interpreter, which costs about 10 ms per
    program per loop iteration whatever the tile holds (and ignores warps and stages): each
    axis a kernel has (an extent; None where it has none: block 1) gets a power of two
    covering it, at least ``min_block``; the short axes (channels, depth) at most their cap
    (``max_m`` ...), and the long one (``long_axis``: pixels or rows, a wgrad's pixel steps)
    as many as ``runtime.INTERPRETER_TILE_ELEMENTS`` allows beside the widest short block
    (and at most ``max_long``): few programs, few loop iterations."""
    extents = {"m": m, "n": n, "k": k}
    caps = {"m": max_m, "n": max_n, "k": max_k}
    blocks = {axis: _block(extent, min_block, caps[axis]) for axis, extent in extents.items()
              if extent is not None and axis != long_axis}
    long_cap = max(min_block, INTERPRETER_TILE_ELEMENTS // max(blocks.values(), default=1))
    if max_long is not None:
        long_cap = min(long_cap, max_long)
    blocks[long_axis] = _block(extents[long_axis] or 1, min_block, long_cap)
    return TileConfig("interpreter", blocks.get("m", 1), blocks.get("n", 1), blocks.get("k", 1))


def _block(extent: int, floor: int, cap: int) -> int:
    return max(floor, min(cap, triton.next_power_of_2(max(extent, 1))))
