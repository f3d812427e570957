"""What every family's operators share: placeholders for outputs not asked for, shape-function
allocation, window geometry as operator arguments (schemas carry ints, int lists and
booleans only), the double-backward refusal, the NHWC tile table of the memory-bound
[pixels x channels] kernels (pools, BatchNorm), and how an elementwise op runs in place."""
from collections.abc import Callable
from typing import Optional

import torch
import triton
from torch import Tensor

from fastarch import autotune
from fastarch.arguments import records_grad
from fastarch.kernels.conv2d import ConvGeometry
from fastarch.kernels.launch import Launch, TileConfig, interpreter_tile
from fastarch.kernels.pool_geometry import PoolGeometry
from fastarch.kernels.runtime import INTERPRETER, memory_format_of

PoolWindow = tuple[list[int], list[int], list[int], list[int], bool]
ConvWindow = tuple[list[int], list[int], list[int], list[int]]


def absent(like: Tensor) -> Tensor:
    """The placeholder returned for an output that was not computed."""
    return like.new_empty((0,))


def or_absent(t: Optional[Tensor], like: Tensor) -> Tensor:
    return absent(like) if t is None else t


def is_channels_last(x: Tensor) -> bool:
    return memory_format_of(x) == torch.channels_last


def memory_format_for(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def weight_grad_format(weight: Optional[Tensor]) -> torch.memory_format:
    """A conv's dweight takes its weight's memory format (contiguous where the weight is not
    given), as cuDNN's: autograd then accumulates it without a copy into the layout."""
    return torch.contiguous_format if weight is None else memory_format_of(weight)


def fake_empty(shape, dtype: torch.dtype, like: Tensor,
               memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """An output of a fake (shape) function: what the real op allocates, never filled."""
    return torch.empty(tuple(shape), dtype=dtype, device=like.device,
                       memory_format=memory_format)


def pool_window(geometry: PoolGeometry) -> PoolWindow:
    """A pooling geometry as op arguments: kernel, stride, padding, dilation, ceil_mode."""
    return (list(geometry.kernel), list(geometry.stride), list(geometry.padding),
            list(geometry.dilation), geometry.ceil_mode)


def pool_geometry(kernel: list[int], stride: list[int], padding: list[int],
                   dilation: list[int], ceil_mode: bool) -> PoolGeometry:
    return PoolGeometry(tuple(kernel), tuple(stride), tuple(padding), tuple(dilation),
                        ceil_mode)


def pooled_shape(input_shape, geometry: PoolGeometry) -> tuple:
    return (*input_shape[:2], *geometry.output_size(*input_shape[2:]))


def conv_window(geometry: ConvGeometry) -> ConvWindow:
    """A convolution geometry (its kernel is the weight's) as op arguments."""
    return (list(geometry.stride), list(geometry.padding), list(geometry.dilation),
            list(geometry.end_padding()))


def conv_geometry(weight_shape, stride: list[int], padding: list[int], dilation: list[int],
                   padding_end: list[int]) -> ConvGeometry:
    end = None if list(padding_end) == list(padding) else tuple(padding_end)
    return ConvGeometry(tuple(weight_shape[2:]), tuple(stride), tuple(padding),
                        tuple(dilation), end)


def split_reduction(length: int, parts: int, block: int) -> tuple[int, int]:
    """A reduction of ``length`` in ``parts`` (at most) split-K programs: (parts, length per
    part), each part whole ``block`` steps long and none empty."""
    per_part = max(1, triton.cdiv(triton.cdiv(length, parts), block)) * block
    return max(1, triton.cdiv(length, per_part)), per_part


def no_grads(count: int) -> tuple[None, ...]:
    return (None,) * count


def no_double_backward(forward: str) -> Callable[..., None]:
    """The autograd formula of ``forward``'s backward op: a clear error, since fastarch has
    no kernels for the gradient of a gradient (double backward: a gradient taken with
    ``create_graph=True``, then differentiated again)."""
    def refuse(ctx, *grads):
        raise RuntimeError(
            f"fastarch::{forward}: double backward (differentiating a gradient taken with "
            "create_graph=True) is not supported by fastarch's kernels; compute higher-order "
            f"gradients with torch's own torch.nn.functional.{forward} (or torch.nn layers)")
    return refuse


# The [BLOCK_M pixels x BLOCK_N channels] tile of the memory-bound NHWC kernels, keyed on the
# channel count: the channel block covers C (up to 128) with 16-byte vectors, and the pixel
# block keeps each program near 4096 elements, 16 per thread at 8 warps.
NHWC_TILES: tuple[TileConfig, ...] = (
    TileConfig("c16", block_m=256, block_n=16, num_warps=8),
    TileConfig("c32", block_m=128, block_n=32, num_warps=8),
    TileConfig("c64", block_m=64, block_n=64, num_warps=8),
    TileConfig("c128", block_m=32, block_n=128, num_warps=8),
)


def nhwc_tile(channels: int, pixels: int) -> TileConfig:
    """The tile of a [pixels x channels] elementwise or pooling pass."""
    if INTERPRETER:
        return interpreter_tile(pixels, channels)
    return next((tile for tile in NHWC_TILES if channels <= tile.block_n), NHWC_TILES[-1])


def layout_of(x: Tensor) -> str:
    """The layout part of an autotuning key."""
    if x.dim() == 4 and is_channels_last(x):
        return "channels_last"
    return "contiguous" if x.is_contiguous() else "strided"


def tuned_tile(family: str, shape: dict, x: Tensor, static: TileConfig,
               candidates: autotune.Candidates, build: Callable[[TileConfig], list[Launch]],
               written: tuple[Optional[Tensor], ...]) -> TileConfig:
    """``autotune.choose`` for a launch on x's dtype, layout and device: a trial runs the
    launches ``build`` makes for a candidate with the ``written`` tensors (the outputs and
    state of the real call) swapped for scratch."""
    return autotune.choose(family, shape, x.dtype, layout_of(x), x.device, static, candidates,
                           lambda tile: autotune.scratch_run(build(tile), written))


def run_nhwc(family: str, x: Tensor, channels: int, pixels: int,
             build: Callable[[TileConfig], Launch], written: tuple[Optional[Tensor], ...],
             **shape) -> None:
    """Run the [pixels x channels] launch ``build`` makes, on the tuned NHWC tile (keyed on
    C, pixels to a power of two and ``shape``, e.g. the window)."""
    run_memory_bound(family, x, nhwc_tile(channels, pixels),
                     {"C": channels, "pixels": triton.next_power_of_2(pixels), **shape},
                     build, written)


def run_memory_bound(family: str, x: Tensor, static: TileConfig, shape: dict,
                     build: Callable[[TileConfig], Launch],
                     written: tuple[Optional[Tensor], ...]) -> None:
    """Run the launch ``build`` makes on the tuned tile of a memory-bound pass: ``static``
    or one of its elementwise variants."""
    tile = tuned_tile(family, shape, x, static,
                      lambda generation: autotune.elementwise_candidates(static),
                      lambda tile: [build(tile)], written)
    build(tile)()


def elementwise(x: Tensor, inplace: bool, out_of_place: Callable[[Tensor], Tensor],
                in_place: Callable[[Tensor], None]) -> Tensor:
    """An elementwise op (ReLU, dropout) on the flat storage of x: ``out_of_place(x)``, or x
    itself rewritten when ``inplace`` (after ``arguments.check_inplace``). A tensor that is
    neither contiguous nor channels_last runs on a contiguous copy (written back in place).
    An in-place op that autograd records runs ``out_of_place`` and copies its output into x,
    as torch's in-place ops do (x's version counter moves, its grad_fn becomes the copy's):
    mutable operators carry no autograd formula."""
    if not x.is_contiguous(memory_format=memory_format_of(x)):
        y = out_of_place(x.contiguous())
        return x.copy_(y) if inplace else y
    if not inplace:
        return out_of_place(x)
    if records_grad(x):
        return x.copy_(out_of_place(x))
    in_place(x)
    return x
