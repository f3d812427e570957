"""Convolution (groups=1) as operators: ``fastarch::conv2d`` (forward with its fused epilogue:
bias, BatchNorm statistics, scale/shift, a residual add, ReLU) and
``fastarch::conv2d_backward`` (dgrad, wgrad, the bias gradient), their shape and autograd
formulas, and the host side of the kernels in ``kernels.conv2d`` /
``kernels.conv2d_backward``: output allocation, the config tables and their choice, the
wgrad split policy, and the TF32 decision (``backend``'s ``conv_operand``, read once per
op, forward and backward alike)."""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from fastarch import arguments, backend, profiling
from fastarch.autotune import Generation, gemm_candidates
from fastarch.kernels.conv2d import (SMALL_C, ConvGeometry, InputNormalization,
                                     forward_launch, row_run_forward_launch, run_channels,
                                     run_copy_shape)
from fastarch.kernels.conv2d_tma import (tma_block_k, tma_dgrad_launches, tma_dgrad_sum_rows,
                                         tma_forward_launch, tma_gradient_supported,
                                         tma_m_tiles, tma_supported)
from fastarch.kernels.conv2d_backward import (dgrad_launch, dgrad_sum_rows, merge_launch,
                                              phase_pixels, row_run_wgrad_launch,
                                              wgrad_launch)
from fastarch.kernels.conv2d_tma_wgrad import tma_wgrad_launch, tma_wgrad_supported
from fastarch.kernels.launch import Launch, TileConfig, interpreter_tile
from fastarch.kernels.nhwc import BatchNormGradEpilogue, GradientPrologue, padded_copy_launch
from fastarch.kernels.runtime import INTERPRETER, empty, memory_format_of, sm_count
from fastarch.kernels.tensor_cores import Operand
from fastarch.kernels.welford import WelfordPartials
from fastarch.ops import relu as relu_ops
from fastarch.ops.common import (ConvWindow, absent, conv_geometry, conv_window, fake_empty,
                                 is_channels_last, memory_format_for, no_double_backward,
                                 no_grads, or_absent, split_reduction, tuned_tile,
                                 weight_grad_format)


# ----------------------------------------------------------------------------- config tables

# fp32 without TF32 has no tensor cores: every kernel gets this one FMA tile.
FMA_TILE = TileConfig("fp32_ieee", 64, 64, 16, num_warps=4, num_stages=2)


def _table(prefix: str, *sixteen_bit: TileConfig) -> dict[str, TileConfig]:
    """The 16-bit tiles, each one's TF32 twin, then the FMA tile (its name after
    ``prefix``), by name. A TF32 twin is its 16-bit tile at most 32 deep: a 128-byte row of
    a stage holds 64 16-bit elements but 32 fp32 ones."""
    twins = [replace(tile, name=tile.name.replace("16bit", "tf32"),
                     block_k=min(tile.block_k, 32)) for tile in sixteen_bit]
    fma = replace(FMA_TILE, name=prefix + FMA_TILE.name)
    return {tile.name: tile for tile in (*sixteen_bit, *twins, fma)}


# Forward, keyed on path ("flat": C < SMALL_C, the row-run loop over the padded copy; "chan":
# K tiles inside one (r, s) tap), output channels (n16 / n64 / n128: 128 and more) and
# operand. Chan tiles are a 128-byte channel row deep; 4 stages of 32 KiB for 128x128x64.
# Flat tiles step one kernel row's S*CP run (``_forward_tile``; 16-byte vectors, cp.async)
# in chunks at most as deep as the tile: 32 at n64, where the MMA work counts (AlexNet's
# 88-element row in 3 chunks of 32 lanes is 9 % padding, 45 % in one of 128); 8 warps keep
# them near 100 registers (4 warps: 160 to 200, the unrolled rows' addresses). 128x256 (the
# prototype's tile) is left out: at 8 warps it reaches 255 registers with the bias epilogue
# and spills with stats or scale/shift + ReLU (checked with ``python -m fastarch
# compile-report``).
CONV_FORWARD = _table("",
    TileConfig("flat_n16_16bit", 128, 16, 64, num_warps=8, num_stages=2),
    TileConfig("flat_n64_16bit", 128, 64, 32, num_warps=8, num_stages=2),
    TileConfig("chan_n64_16bit", 128, 64, 64, num_warps=4, num_stages=4),
    TileConfig("chan_n128_16bit", 128, 128, 64, num_warps=8, num_stages=4))

# The TMA forward's tiles (Hopper, ``kernels.conv2d_tma``): BLOCK_M output pixels of one
# output row x BLOCK_N channels; one warpgroup (4 warps) for 64-pixel tiles, two for 128.
# Their depth is set per layer (``tma_tile``): a channel row of at most 128 bytes that
# divides C. The STATS epilogue's per-channel reductions spill beside an accumulator of 128
# registers a thread (64x256 and 128x256; 128x128 on 4 warps in tf32), and so do the
# residual's loaded values (bf16, sm_90a: 1196 and 1496 spilled bytes at 128x256 and 64x256,
# none at 128x128 with 219 registers), so with either a tile holds at most
# TMA_HEAVY_EPILOGUE_ACCUMULATOR registers of it a thread.
TMA_FORWARD = {tile.name: tile for tile in (
    TileConfig("tma_m128_n256", 128, 256, 64, num_warps=8, num_stages=3, tma=True),
    TileConfig("tma_m128_n128", 128, 128, 64, num_warps=8, num_stages=3, tma=True),
    TileConfig("tma_m64_n256", 64, 256, 64, num_warps=4, num_stages=4, tma=True),
    TileConfig("tma_m64_n128", 64, 128, 64, num_warps=4, num_stages=4, tma=True),
    TileConfig("tma_m128_n64", 128, 64, 64, num_warps=8, num_stages=4, tma=True))}
TMA_HEAVY_EPILOGUE_ACCUMULATOR = 64

# FASTARCH_CONV_ALGO, read per call: ``pointer`` the pointer kernel, ``tma`` the TMA kernel
# wherever ``tma_supported``, ``auto`` both as candidates of the Hopper autotuner (the
# pointer kernel elsewhere, and as the static choice).
CONV_ALGOS = ("auto", "tma", "pointer")

# dgrad is a GEMM over input pixels (M) x input channels (N), stepping BLOCK_K output channels
# of one tap at a time. Keyed on the input channels (n16: C <= 16, n64: C <= 64, else n128)
# and operand, with the forward's tile depths. A first layer's dgrad (C = 1 or 3) pads to a
# 16-wide N tile; it only runs when the image itself requires grad.
CONV_DGRAD = _table("dgrad_",
    TileConfig("dgrad_n16_16bit", 128, 16, 64, num_warps=4, num_stages=4),
    TileConfig("dgrad_n64_16bit", 128, 64, 64, num_warps=4, num_stages=4),
    TileConfig("dgrad_n128_16bit", 128, 128, 64, num_warps=8, num_stages=4))

# wgrad is a GEMM over (r, s, c) flattened (M) x output channels (N), reducing over the
# N*P*Q pixels in BLOCK_K steps, split across programs. An M tile stays inside one tap when C
# is a multiple of BLOCK_M (the kernel then reads one channel run per pixel); a first layer
# (C < SMALL_C) runs M over (r, s, c) of x's padded copy (CP channels: 16-byte vectors, no
# bounds checks), so a 3-channel layer fills its tile with 72 or 968 columns instead of
# padding each tap to 16; any other C spans taps. Keyed on the tile (m128 when C % 128 == 0
# and K_out > 64, or for a first layer's 72 to 968 columns beside 17 to 64 output channels:
# dy is read once per M tile), output channels (n16: K_out <= 16, n64: <= 64, else n128) and
# operand. A tile spanning taps (C >= SMALL_C) gathers x element by element, every thread
# holding each pixel of its warp's columns: it steps FLAT_WGRAD_DEPTH pixels (64 reach 255
# registers in 16-bit and spill at n16; ``python -m fastarch compile-report``).
CONV_WGRAD = _table("wgrad_",
    TileConfig("wgrad_m64_n16_16bit", 64, 16, 64, num_warps=4, num_stages=4),
    TileConfig("wgrad_m64_n64_16bit", 64, 64, 64, num_warps=4, num_stages=4),
    TileConfig("wgrad_m64_n128_16bit", 64, 128, 64, num_warps=4, num_stages=4),
    TileConfig("wgrad_m128_n64_16bit", 128, 64, 64, num_warps=8, num_stages=4),
    TileConfig("wgrad_m128_n128_16bit", 128, 128, 64, num_warps=8, num_stages=4))

FLAT_WGRAD_DEPTH = 32

# The TMA wgrad's tiles (Hopper, ``kernels.conv2d_tma_wgrad``): BLOCK_M channels of one tap x
# BLOCK_N output channels, BLOCK_K output pixels of one row a step. BLOCK_M is capped to
# divide C and BLOCK_K is set per layer (``tma_wgrad_tile``). On VGG conv3_3 in bf16: 114 to
# 124 registers and 2 CTAs an SM, but 204 registers and 1 CTA for 128x256 (a candidate only).
TMA_WGRAD = {tile.name: tile for tile in (
    TileConfig("tma_wgrad_m128_n256", 128, 256, 64, num_warps=8, num_stages=3, tma=True),
    TileConfig("tma_wgrad_m128_n128", 128, 128, 64, num_warps=8, num_stages=3, tma=True),
    TileConfig("tma_wgrad_m128_n64", 128, 64, 64, num_warps=4, num_stages=4, tma=True),
    TileConfig("tma_wgrad_m64_n128", 64, 128, 64, num_warps=4, num_stages=4, tma=True),
    TileConfig("tma_wgrad_m64_n64", 64, 64, 64, num_warps=4, num_stages=4, tma=True))}

# The pointer wgrad's pipeline depth with an input prologue (``wgrad_launches``).
PROLOGUE_WGRAD_STAGES = 2

# The padded copy of a first layer's input: 256 pixels a program.
RUN_COPY = TileConfig("run_copy", block_m=256, num_warps=4)

# The merge of wgrad's split partials: an elementwise pass, 1024 elements a program.
WGRAD_MERGE = TileConfig("merge", block_m=1024)

# Split-K: enough programs for WGRAD_WAVES waves of the GPU, but each split reduces at least
# WGRAD_MIN_SPLIT_STEPS tiles, so its fp32 partial (written once, read once by the merge) stays
# small beside the activations it read. The interpreter splits in at most
# WGRAD_INTERPRETER_SPLITS parts of whole pixel steps.
WGRAD_WAVES = 2
WGRAD_MIN_SPLIT_STEPS = 16
WGRAD_INTERPRETER_SPLITS = 3


# ----------------------------------------------------------------------------- config choice

def forward_tile(channels: int, out_channels: int, reduction: int, operand: Operand,
                 pixels: int, interpreter: bool = INTERPRETER) -> TileConfig:
    """The tile of a conv forward over ``pixels`` = N*P*Q outputs; ``reduction`` is what one
    tile's depth should cover: R*S*C, or for a first layer (C < SMALL_C) one kernel row's
    run of S*CP elements (``_forward_tile``)."""
    flat = channels < SMALL_C
    depth = reduction if flat else channels
    if interpreter:
        return interpreter_tile(pixels, out_channels, depth)
    if operand is Operand.IEEE:
        return _shallow(CONV_FORWARD["fp32_ieee"], depth)
    if flat:
        width = "n16" if out_channels <= 16 else "n64"
    else:
        width = "n64" if out_channels <= 64 else "n128"
    path = "flat" if flat else "chan"
    return _shallow(CONV_FORWARD[f"{path}_{width}_{operand.value}"], depth)


def conv_algo() -> str:
    """``FASTARCH_CONV_ALGO`` (``auto`` when unset)."""
    value = os.environ.get("FASTARCH_CONV_ALGO", "auto").strip().lower()
    if value not in CONV_ALGOS:
        raise ValueError(f"FASTARCH_CONV_ALGO must be one of {', '.join(CONV_ALGOS)}, "
                         f"got {value!r}")
    return value


def tma_tile(base: TileConfig, channels: int, operand: Operand) -> TileConfig:
    """``base`` as deep as a 128-byte channel row (64 16-bit or 32 fp32 elements), at most
    the largest power of two dividing ``channels``."""
    depth = tma_block_k(channels, 64 if operand is Operand.SIXTEEN_BIT else 32)
    name = base.name if depth == base.block_k else f"{base.name}_k{depth}"
    return replace(base, name=name, block_k=depth)


def tma_forward_tile(channels: int, out_channels: int, out_width: int, operand: Operand,
                     stats: bool, interpreter: bool = INTERPRETER, *,
                     heavy_epilogue: bool = False) -> TileConfig:
    """The static TMA tile (``FASTARCH_CONV_ALGO=tma``): 128 pixels of a row where rows are
    wider than 64, else 64; 256 channels where there are as many (without ``stats`` or
    another ``heavy_epilogue``: a residual, a BatchNorm gradient), 64 beside 128 pixels
    where there are at most 64, else 128."""
    if interpreter:
        return replace(interpreter_tile(out_width, out_channels), name="interpreter_tma",
                       block_k=tma_block_k(channels, 128), tma=True)
    width = 128 if out_width > 64 else 64
    if out_channels >= 256 and not stats and not heavy_epilogue:
        height = 256
    elif out_channels <= 64 and width == 128:
        height = 64
    else:
        height = 128
    return tma_tile(TMA_FORWARD[f"tma_m{width}_n{height}"], channels, operand)


def tma_dgrad_tile(channels: int, out_channels: int, phase_width: int, operand: Operand,
                   interpreter: bool = INTERPRETER, *, bn_grad: bool = False) -> TileConfig:
    """The static tile of the TMA input gradient (``FASTARCH_CONV_ALGO=tma``): a forward
    from dy's ``out_channels`` to dx's ``channels`` whose output rows are a stride phase's,
    ``phase_width`` wide (``tma_forward_tile`` without STATS; ``bn_grad``, the BatchNorm
    gradient epilogue, is a heavy one)."""
    return tma_forward_tile(out_channels, channels, phase_width, operand, stats=False,
                            interpreter=interpreter, heavy_epilogue=bn_grad)


def forward_m_tiles(tile: TileConfig, batch: int, out_height: int, out_width: int) -> int:
    """The M tiles of a forward on ``tile``: the STATS partials' rows."""
    if tile.tma:
        return tma_m_tiles(batch, out_height, out_width, tile.block_m)
    return triton.cdiv(batch * out_height * out_width, tile.block_m)


def dgrad_tile(channels: int, out_channels: int, operand: Operand, pixels: int,
               interpreter: bool = INTERPRETER) -> TileConfig:
    """The tile of a conv input gradient; ``pixels`` are those of one stride phase."""
    if interpreter:
        return interpreter_tile(pixels, channels, out_channels)
    if operand is Operand.IEEE:
        return CONV_DGRAD["dgrad_fp32_ieee"]
    width = "n16" if channels <= 16 else "n64" if channels <= 64 else "n128"
    return _shallow(CONV_DGRAD[f"dgrad_{width}_{operand.value}"], out_channels)


def wgrad_tile(channels: int, out_channels: int, operand: Operand, taps: int, pixels: int,
               interpreter: bool = INTERPRETER) -> TileConfig:
    """The tile of a conv weight gradient; ``taps`` is R*S, ``pixels`` N*P*Q."""
    if interpreter:
        # Steps of at most half the pixels: every layer splits, so the merge always runs.
        tile = interpreter_tile(taps * channels, out_channels, triton.cdiv(pixels, 2),
                                long_axis="k")
        # Tiles inside one tap when C is a multiple of 16, as on the GPU for C % 64 == 0,
        # so the tests run both the tap-aligned and the flattened path.
        if channels % 16 == 0:
            tile = replace(tile, block_m=min(channels & -channels, 128))
        return tile
    if operand is Operand.IEEE:
        return CONV_WGRAD["wgrad_fp32_ieee"]
    width = "n16" if out_channels <= 16 else "n64" if out_channels <= 64 else "n128"
    height = "m128" if (width == "n128" and channels % 128 == 0) or (
        width == "n64" and channels < SMALL_C) else "m64"
    tile = CONV_WGRAD[f"wgrad_{height}_{width}_{operand.value}"]
    aligned = channels % tile.block_m == 0 or channels < SMALL_C  # < SMALL_C: the row run
    return tile if aligned else _shallow(tile, FLAT_WGRAD_DEPTH)


def tma_wgrad_depth(out_width: int, operand: Operand) -> int:
    """The TMA wgrad's BLOCK_K: the power of two from 16 to a 128-byte row (64 16-bit or 32
    fp32 pixels) that pads an output row of ``out_width`` pixels least (a row takes
    ceil(Q / BLOCK_K) steps), the deepest on a tie: 64 for Q = 56, 32 for 224, 16 for 14."""
    deepest = 64 if operand is Operand.SIXTEEN_BIT else 32
    depths = [depth for depth in (64, 32, 16) if depth <= deepest]
    return min(depths, key=lambda depth: triton.cdiv(out_width, depth) * depth)


def tma_wgrad_fit(base: TileConfig, channels: int, out_width: int,
                  operand: Operand) -> TileConfig:
    """``base`` with BLOCK_M dividing C and the depth of ``tma_wgrad_depth``."""
    block_m = tma_block_k(channels, base.block_m)
    depth = tma_wgrad_depth(out_width, operand)
    name = base.name + (f"_m{block_m}" if block_m != base.block_m else "") + (
        f"_k{depth}" if depth != base.block_k else "")
    return replace(base, name=name, block_m=block_m, block_k=depth)


def tma_wgrad_tile(channels: int, out_channels: int, out_width: int, operand: Operand,
                   interpreter: bool = INTERPRETER) -> TileConfig:
    """The static TMA wgrad tile (``FASTARCH_CONV_ALGO=tma``): 128 channels of a tap where
    C is a multiple of 128, else 64 (or C's largest power-of-two divisor); 128 output
    channels where there are more than 64, else 64."""
    if interpreter:
        # Few programs and steps: the whole channel run, all output channels, a whole row.
        base = interpreter_tile(out_width, out_channels)
        return TileConfig("interpreter_tma_wgrad", tma_block_k(channels, 128), base.block_n,
                          base.block_m, tma=True)
    height = 128 if channels % 128 == 0 else 64
    width = 128 if out_channels > 64 else 64
    return tma_wgrad_fit(TMA_WGRAD[f"tma_wgrad_m{height}_n{width}"], channels, out_width,
                         operand)


def tma_wgrad_candidates(static: TileConfig, channels: int, out_channels: int,
                         out_width: int, operand: Operand) -> tuple[TileConfig, ...]:
    """The TMA wgrad tiles tried beside ``static``: none wider than the next power of two
    of ``out_channels`` (at least 64), none the same shape as one before it once BLOCK_M is
    capped to divide C."""
    max_n = max(64, triton.next_power_of_2(out_channels))
    tiles = {(static.block_m, static.block_n): static}
    for base in TMA_WGRAD.values():
        if base.block_n <= max_n:
            tile = tma_wgrad_fit(base, channels, out_width, operand)
            tiles.setdefault((tile.block_m, tile.block_n), tile)
    return tuple(tile for tile in tiles.values() if tile is not static)


def wgrad_splits(tiles: int, pixels: int, block_k: int, sms: int,
                 interpreter: bool = INTERPRETER) -> int:
    """How many parts the N*P*Q reduction of a wgrad with ``tiles`` output tiles is split in,
    on a GPU of ``sms`` SMs."""
    steps = triton.cdiv(pixels, block_k)
    if interpreter:
        return max(1, min(steps, WGRAD_INTERPRETER_SPLITS))
    wanted = triton.cdiv(WGRAD_WAVES * sms, max(tiles, 1))
    return max(1, min(wanted, steps // WGRAD_MIN_SPLIT_STEPS))


def wgrad_merge_tile(numel: int, interpreter: bool = INTERPRETER) -> TileConfig:
    """The tile of the merge of ``numel`` elements of wgrad's split partials."""
    return interpreter_tile(numel) if interpreter else WGRAD_MERGE


def _shallow(config: TileConfig, depth: int) -> TileConfig:
    """A reduction shallower than the tile (C = 16 or 32, LeNet's K_out = 6 or 16, a 1x1
    first layer) gets a shallower tile."""
    depth = max(16, triton.next_power_of_2(depth))
    if depth < config.block_k:
        config = replace(config, name=f"{config.name}_k{depth}", block_k=depth)
    return config


# ----------------------------------------------------------------------------- host side

def weight_matrix(weight: Tensor) -> Tensor:
    """[K_out, C, R, S] -> [K_out, R, S, C] contiguous, the forward's [K_out, R*S*C] GEMM
    operand (a view, no copy, for a channels_last weight)."""
    return weight.permute(0, 2, 3, 1).contiguous()


def dgrad_weight(weight: Tensor) -> Tensor:
    """The weight as dgrad's B operand reads it: [R, S, C, K_out] dense, K_out (the GEMM's
    reduction axis) contiguous, the K-major layout the tensor-core operand wants."""
    return weight.permute(2, 3, 1, 0).contiguous()


def _forward_tile(x: Tensor, weight: Tensor, geometry: ConvGeometry, operand: Operand,
                  algo: str, stats: bool, residual: bool = False) -> TileConfig:
    N, C, H, W = x.shape
    P, Q = geometry.output_size(H, W)
    if algo == "tma" and tma_supported(x, weight, geometry, operand):
        return tma_forward_tile(C, weight.shape[0], Q, operand, stats,
                                heavy_epilogue=residual)
    R, S = weight.shape[2:]
    depth = S * run_channels(C, x.dtype) if C < SMALL_C else R * S * C
    return forward_tile(C, weight.shape[0], depth, operand, N * P * Q)


def forward_candidates(static: TileConfig, out_channels: int, pixels: int, stats: bool,
                       generation: Generation) -> tuple[TileConfig, ...]:
    """The forward tiles tried on a GPU of ``generation``: with ``stats`` only those of the
    static tile's height, since the partials' shape (one row per M tile) is fixed before
    the kernel runs (``stats_tiles``)."""
    tiles = gemm_candidates(static, generation, pixels, out_channels)
    return tuple(tile for tile in tiles if not stats or tile.block_m == static.block_m)


def tma_candidates(static: TileConfig, channels: int, out_channels: int, out_width: int,
                   out_m_tiles: Callable[[TileConfig], int], stats: bool, operand: Operand,
                   heavy_epilogue: bool = False) -> tuple[TileConfig, ...]:
    """The TMA tiles tried beside ``static``: 128 pixels wide only on rows wider than 64, no
    wider than the next power of two of ``out_channels`` (at least 64); with ``stats`` only
    those of static's M-tile count, ``out_m_tiles(tile)``; with ``stats`` or another
    ``heavy_epilogue`` (a residual, a BatchNorm gradient) only those that
    ``tma_takes_heavy_epilogue``."""
    max_n = max(64, triton.next_power_of_2(out_channels))
    tiles = (tma_tile(base, channels, operand) for base in TMA_FORWARD.values()
             if (base.block_m == 64 or out_width > 64) and base.block_n <= max_n)
    return tuple(tile for tile in tiles if tile.name != static.name
                 and (not stats or out_m_tiles(tile) == out_m_tiles(static))
                 and (not (stats or heavy_epilogue) or tma_takes_heavy_epilogue(tile)))


def tma_takes_heavy_epilogue(tile: TileConfig) -> bool:
    """Whether the TMA ``tile`` may run the STATS, residual or BatchNorm-gradient epilogue
    (TMA_HEAVY_EPILOGUE_ACCUMULATOR)."""
    return (tile.block_m * tile.block_n // (32 * tile.num_warps)
            <= TMA_HEAVY_EPILOGUE_ACCUMULATOR)


def dgrad_candidates(static: TileConfig, channels: int, pixels: int,
                     generation: Generation) -> tuple[TileConfig, ...]:
    """The dgrad tiles tried on a GPU of ``generation`` (``pixels``: one stride phase's)."""
    return gemm_candidates(static, generation, pixels, channels)


def wgrad_candidates(static: TileConfig, channels: int, out_channels: int, taps: int,
                     generation: Generation) -> tuple[TileConfig, ...]:
    """The wgrad tiles tried on a GPU of ``generation`` (M = taps * C, N = K_out; a first
    layer's C is the channels of its padded copy)."""
    return gemm_candidates(static, generation, taps * channels, out_channels)


def stats_tiles(x: Tensor, weight: Tensor, geometry: ConvGeometry) -> int:
    """The M tiles of the Welford partials the forward writes with ``stats`` (their shape is
    [3, tiles, K_out]): what a shape function needs to know without running it."""
    N, _, H, W = x.shape
    P, Q = geometry.output_size(H, W)
    tile = _forward_tile(x, weight, geometry, backend.conv_operand(x.dtype), conv_algo(),
                         stats=True)
    return forward_m_tiles(tile, N, P, Q)


def conv2d_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], geometry: ConvGeometry,
                   scale: Optional[Tensor], shift: Optional[Tensor], relu: bool,
                   stats: bool, prologue: Optional[InputNormalization] = None, *,
                   residual: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """y = conv2d(x, weight) (+ bias) [* scale + shift] [+ residual] [ReLU] of a 4-D x, in
    x's dtype and memory format (``residual``: y's shape and dtype, any strides), and when
    ``stats`` the Welford partials of conv + bias as one [3, tiles, K_out] fp32 buffer of
    (count, mean, M2). With ``prologue`` the conv reads x as relu?(x * scale[c] + shift[c]),
    applied as its tiles are loaded (a first layer's padded copy applies it), the padding
    still 0."""
    N, _, H, W = x.shape
    K_out = weight.shape[0]
    P, Q = geometry.output_size(H, W)
    y = empty((N, K_out, P, Q), x.dtype, x.device, memory_format_of(x))
    operand = backend.conv_operand(x.dtype)
    row_run = x.shape[1] < SMALL_C
    if row_run:  # a first layer reads a padded copy of x, and the weight as it is
        weight_in, x_in = weight, run_copy(x, geometry, prologue)
    else:
        weight_in, x_in = weight_matrix(weight), x

    def m_tiles(tile: TileConfig) -> int:
        return forward_m_tiles(tile, N, P, Q)

    def launch(tile: TileConfig) -> tuple[Launch, Optional[Tensor]]:
        partials = empty((3, m_tiles(tile), K_out), torch.float32, x.device) if stats else None
        arguments = (x_in, weight_in, bias, scale, shift, relu, y, partials, geometry,
                     operand, tile)
        if row_run and not tile.tma:  # the copy applied the prologue
            return row_run_forward_launch(*arguments, residual=residual), partials
        build = tma_forward_launch if tile.tma else forward_launch
        return build(*arguments, prologue=prologue, residual=residual), partials

    def candidates(generation: Generation) -> tuple[TileConfig, ...]:
        tma = tma_candidates(static, x.shape[1], K_out, Q, m_tiles, stats, operand,
                             heavy_epilogue=residual is not None)
        if static.tma:
            return (static, *tma)
        pointer = forward_candidates(static, K_out, N * P * Q, stats, generation)
        if algo == "auto" and generation is Generation.HOPPER and \
                tma_supported(x, weight, geometry, operand):
            return (static, *tma, *pointer[1:])  # TMA first: inside the "on" mode's share
        return pointer

    algo = conv_algo()
    static = _forward_tile(x, weight, geometry, operand, algo, stats, residual is not None)
    epilogue = "".join(flag for flag, on in (("+bias", bias is not None), ("+stats", stats),
                                              ("+scale", scale is not None),
                                              ("+residual", residual is not None),
                                              ("+relu", relu))
                       if on)
    shape = {"C": x.shape[1], "K": K_out, "RS": f"{weight.shape[2]}x{weight.shape[3]}",
             "stride": geometry.stride, "pixels": triton.next_power_of_2(N * P * Q),
             "operand": operand.value, "epilogue": epilogue,
             **({} if algo == "auto" else {"algo": algo}),  # auto keeps the keys it had
             **prologue_key(prologue)}
    tile = tuned_tile("conv2d_forward", shape, x, static, candidates,
                      lambda tile: [launch(tile)[0]], (y,))
    main, partials = launch(tile)
    main()
    return y, partials


def prologue_key(prologue: Optional[InputNormalization]) -> dict[str, str]:
    """The autotune key's "prologue" entry: none without one (the keys stay as they were)."""
    if prologue is None:
        return {}
    return {"prologue": "relu" if prologue.relu else "affine"}


def run_copy_launch(t: Tensor, geometry: ConvGeometry,
                    prologue: Optional[InputNormalization] = None) -> tuple[Launch, Tensor]:
    """The launch writing the padded copy a first layer reads of x [N, C, H, W] (``t``,
    through ``prologue`` where given; ``conv2d.run_copy_shape``), and the copy."""
    copy = empty(run_copy_shape(t.shape, geometry, t.dtype), t.dtype, t.device)
    tile = interpreter_tile(copy.shape[0] * copy.shape[1] * copy.shape[2]) if INTERPRETER \
        else RUN_COPY
    return padded_copy_launch(t, copy, geometry.padding, tile, prologue), copy


def run_copy(t: Tensor, geometry: ConvGeometry,
             prologue: Optional[InputNormalization] = None) -> Tensor:
    """``run_copy_launch``'s copy, written."""
    launch, copy = run_copy_launch(t, geometry, prologue)
    launch()
    return copy


class BackwardFold(NamedTuple):
    """What a conv's backward folds of the BatchNorms around it (``ops.conv2d_chain``):
    ``grad_prologue``, the batch-statistics term of the input gradient of the BatchNorm
    after the conv, added to dy as the dgrad and wgrad load it; ``input_batch_norm``, the
    (x, mean, normalization) of the BatchNorm (+ ReLU) before it, whose input gradient at
    fixed statistics and sums the dgrad's epilogue writes (``BatchNormGradEpilogue``)."""
    grad_prologue: Optional[GradientPrologue] = None
    input_batch_norm: Optional[tuple[Tensor, Tensor, InputNormalization]] = None

    def epilogue(self, rows: int, channels: int,
                 device: torch.device) -> Optional[BatchNormGradEpilogue]:
        """The dgrad epilogue, with its [rows, 2, channels] fp32 sums allocated."""
        if self.input_batch_norm is None:
            return None
        x, mean, normalization = self.input_batch_norm
        return BatchNormGradEpilogue(x, mean, normalization,
                                     empty((rows, 2, channels), torch.float32, device))

    def key(self) -> dict[str, str]:
        """The autotune key's entries: none without a fold (the keys stay as they were)."""
        marks = [mark for mark, on in (("grad_prologue", self.grad_prologue is not None),
                                       ("bn_grad", self.input_batch_norm is not None)) if on]
        return {"fold": "+".join(marks)} if marks else {}


def sum_rows(rows: Tensor) -> Tensor:
    """The [2, C] fp32 sums of a folded BatchNorm backward's [rows, 2, C] per-program rows
    (a dgrad epilogue's, a max pool gather's), added in row order."""
    count, _, channels = rows.shape
    sums = empty((2, channels), torch.float32, rows.device)
    merge_launch(rows.view(count, 1, 1, 2, channels), sums.view(1, 1, 2, channels),
                 wgrad_merge_tile(sums.numel(), INTERPRETER))()
    return sums


def conv2d_input_grad(dy: Tensor, weight: Tensor, input_shape: torch.Size,
                      memory_format: torch.memory_format, geometry: ConvGeometry,
                      operand: Operand, fold: Optional[BackwardFold] = None
                      ) -> tuple[Tensor, Optional[Tensor]]:
    """dx of a conv2d: ``input_shape`` (N, C, H, W) in ``memory_format``, dy's dtype, and
    with ``fold`` its BatchNorm sums ([2, C] fp32: ``BackwardFold``; else None)."""
    N, C, H, W = input_shape
    dx = empty(input_shape, dy.dtype, dy.device, memory_format)
    K_out = weight.shape[0]
    pixels = phase_pixels(N, H, W, geometry)
    phase_rows, phase_width = (triton.cdiv(size, stride)
                               for size, stride in zip((H, W), geometry.stride))
    fold = fold or BackwardFold()
    tma = tma_gradient_supported(dy, operand, fold.grad_prologue)
    bn_grad = fold.input_batch_norm is not None
    sums: dict[str, Tensor] = {}  # the rows of the tile launched last

    def launches(tile: TileConfig) -> list[Launch]:
        rows = (tma_dgrad_sum_rows if tile.tma else dgrad_sum_rows)(input_shape, geometry,
                                                                    tile)
        epilogue = fold.epilogue(rows, C, dy.device)
        if epilogue is not None:
            sums["rows"] = epilogue.sums
        options = {"grad_prologue": fold.grad_prologue, "epilogue": epilogue}
        if tile.tma:
            return tma_dgrad_launches(dy, weight, dx, geometry, operand, tile, **options)
        return [dgrad_launch(dy, dgrad_weight(weight), dx, geometry, operand, tile,
                             **options)]

    def candidates(generation: Generation) -> tuple[TileConfig, ...]:
        tma_tiles = tma_candidates(
            static, K_out, C, phase_width,
            lambda tile: tma_m_tiles(N, phase_rows, phase_width, tile.block_m), False, operand,
            heavy_epilogue=bn_grad)
        if static.tma:
            return (static, *tma_tiles)
        pointer = dgrad_candidates(static, C, pixels, generation)
        if algo == "auto" and generation is Generation.HOPPER and tma:
            return (static, *tma_tiles, *pointer[1:])  # TMA first, as the forward's
        return pointer

    algo = conv_algo()
    static = (tma_dgrad_tile(C, K_out, phase_width, operand, bn_grad=bn_grad)
              if algo == "tma" and tma else dgrad_tile(C, K_out, operand, pixels))
    shape = {"C": C, "K": K_out, "RS": f"{weight.shape[2]}x{weight.shape[3]}",
             "stride": geometry.stride, "pixels": triton.next_power_of_2(pixels),
             "operand": operand.value,
             **({} if algo == "auto" else {"algo": algo}),  # auto keeps the keys it had
             **fold.key()}
    tile = tuned_tile("conv2d_dgrad", shape, dy, static, candidates, launches, (dx,))
    for launch in launches(tile):
        launch()
    if "rows" not in sums:
        return dx, None
    return dx, sum_rows(sums["rows"])


def wgrad_plan(x: Tensor, dy: Tensor, weight_shape: torch.Size, need_bias_grad: bool,
               geometry: ConvGeometry, operand: Operand, interpreter: bool = INTERPRETER,
               prologue: Optional[InputNormalization] = None,
               grad_prologue: Optional[GradientPrologue] = None,
               dw_format: torch.memory_format = torch.contiguous_format
               ) -> tuple[list[Launch], Tensor, Optional[Tensor]]:
    """The launches of one weight gradient and the dW (in ``dw_format``), db they fill (dW
    and db are allocated here; so is the fp32 partial buffer when the reduction is split); x
    is read through ``prologue``, dy through ``grad_prologue`` where given."""
    K_out, C, R, S = weight_shape
    N, _, P, Q = dy.shape
    tma = tma_wgrad_supported(x, dy, geometry, operand, grad_prologue)

    def candidates(generation: Generation) -> tuple[TileConfig, ...]:
        tma_tiles = tma_wgrad_candidates(static, C, K_out, Q, operand)
        if static.tma:
            return (static, *tma_tiles)
        columns = run_channels(C, x.dtype) if C < SMALL_C else C  # a first layer's copy
        pointer = wgrad_candidates(static, columns, K_out, R * S, generation)
        if algo == "auto" and generation is Generation.HOPPER and tma:
            return (static, *tma_tiles, *pointer[1:])  # TMA first, as the forward's
        return pointer

    algo = conv_algo()
    static = (tma_wgrad_tile(C, K_out, Q, operand, interpreter) if algo == "tma" and tma
              else wgrad_tile(C, K_out, operand, R * S, N * P * Q, interpreter))
    shape = {"C": C, "K": K_out, "RS": f"{R}x{S}", "stride": geometry.stride,
             "pixels": triton.next_power_of_2(N * P * Q), "operand": operand.value,
             **({} if algo == "auto" else {"algo": algo}),  # auto keeps the keys it had
             **prologue_key(prologue), **BackwardFold(grad_prologue).key()}
    tile = tuned_tile("conv2d_wgrad", shape, x, static, candidates,
                      lambda tile: wgrad_launches(x, dy, weight_shape, need_bias_grad,
                                                   geometry, operand, tile, interpreter,
                                                   prologue, grad_prologue, dw_format)[0], ())
    return wgrad_launches(x, dy, weight_shape, need_bias_grad, geometry, operand, tile,
                           interpreter, prologue, grad_prologue, dw_format)


def wgrad_launches(x: Tensor, dy: Tensor, weight_shape: torch.Size, need_bias_grad: bool,
                    geometry: ConvGeometry, operand: Operand, tile: TileConfig,
                    interpreter: bool, prologue: Optional[InputNormalization] = None,
                    grad_prologue: Optional[GradientPrologue] = None,
                    dw_format: torch.memory_format = torch.contiguous_format
                    ) -> tuple[list[Launch], Tensor, Optional[Tensor]]:
    """``wgrad_plan`` on a given tile (its split-K policy, dW in ``dw_format``, db and
    partials allocated).
    A TMA tile splits the N*P output rows, each row ceil(Q / BLOCK_K) steps: the policy
    counts its steps as pixels. x is read through ``prologue`` where given (a pointer tile
    then at most ``PROLOGUE_WGRAD_STAGES`` deep; a first layer's copy applies it), dy
    through ``grad_prologue``."""
    K_out, C, R, S = weight_shape
    N, _, P, Q = dy.shape
    row_run = C < SMALL_C and not tile.tma  # a first layer reads a padded copy of x
    columns = R * S * (run_channels(C, x.dtype) if row_run else C)
    tiles = triton.cdiv(columns, tile.block_m) * triton.cdiv(K_out, tile.block_n)
    copies, x_in = [], x
    if tile.tma:
        steps_pixels = N * P * triton.cdiv(Q, tile.block_k) * tile.block_k
        wanted = wgrad_splits(tiles, steps_pixels, tile.block_k, sm_count(x.device),
                              interpreter)
        splits, per_split = split_reduction(N * P, wanted, 1)
        build = functools.partial(tma_wgrad_launch, prologue=prologue,
                                  grad_prologue=grad_prologue)
    else:
        splits, per_split = split_reduction(
            N * P * Q,
            wgrad_splits(tiles, N * P * Q, tile.block_k, sm_count(x.device), interpreter),
            tile.block_k)
        build = (functools.partial(row_run_wgrad_launch, grad_prologue=grad_prologue)
                 if row_run  # the copy applies the input prologue
                 else functools.partial(wgrad_launch, prologue=prologue,
                                        grad_prologue=grad_prologue))
        if prologue is not None and not row_run:
            # With the transform, 3 or 4 stages take the 16-bit 128x128 tile to 255
            # registers and spills on sm_80, 2 to 171 (``python -m fastarch compile-report``).
            tile = replace(tile, num_stages=min(tile.num_stages, PROLOGUE_WGRAD_STAGES))
        if row_run:
            copy, x_in = run_copy_launch(x, geometry, prologue)
            copies = [copy]
    dw = empty(weight_shape, x.dtype, x.device, dw_format)
    db = empty((K_out,), x.dtype, x.device) if need_bias_grad else None
    dw_rsck = dw.permute(2, 3, 1, 0)  # the (r, s, c, k) order of the GEMM's M x N
    if splits == 1:
        main = build(x_in, dy, dw_rsck[None], None if db is None else db[None], 1, per_split,
                     geometry, operand, tile)
        return [*copies, main], dw, db
    partial = empty((splits, R, S, C, K_out), torch.float32, x.device)
    bias_partial = (empty((splits, 1, 1, 1, K_out), torch.float32, x.device)
                    if need_bias_grad else None)
    main = build(x_in, dy, partial,
                 None if bias_partial is None else bias_partial.view(splits, K_out),
                 splits, per_split, geometry, operand, tile)
    launches = [*copies, main,
                merge_launch(partial, dw_rsck, wgrad_merge_tile(dw.numel(), interpreter))]
    if need_bias_grad:
        launches.append(merge_launch(bias_partial, db.view(1, 1, 1, K_out),
                                     wgrad_merge_tile(K_out, interpreter)))
    return launches, dw, db


def conv2d_weight_grad(x: Tensor, dy: Tensor, weight_shape: torch.Size,
                       geometry: ConvGeometry, need_bias_grad: bool,
                       operand: Operand, prologue: Optional[InputNormalization] = None,
                       grad_prologue: Optional[GradientPrologue] = None,
                       dw_format: torch.memory_format = torch.contiguous_format
                       ) -> tuple[Tensor, Optional[Tensor]]:
    """dW (``weight_shape``, in ``dw_format``) and, if asked, db of a conv2d, both in x's
    dtype, accumulated in fp32; with ``prologue``, of the conv reading x through it (as
    ``conv2d_forward``); with ``grad_prologue``, of dy read through it."""
    launches, dw, db = wgrad_plan(x, dy, weight_shape, need_bias_grad, geometry, operand,
                                  prologue=prologue, grad_prologue=grad_prologue,
                                  dw_format=dw_format)
    for launch in launches:
        launch()
    return dw, db


# ----------------------------------------------------------------------------- operators

@torch.library.custom_op("fastarch::conv2d", mutates_args=())
def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
           shift: Optional[Tensor], stride: list[int], padding: list[int],
           dilation: list[int], padding_end: list[int], relu: bool,
           stats: bool, residual: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """conv2d (groups=1) of a 4-D x with the fused epilogue: y = relu?((conv + bias) * scale +
    shift + residual); with ``stats`` also the Welford partials of conv + bias
    ([3, tiles, K_out] fp32, not differentiable). ``residual``: y's shape and dtype."""
    geometry = conv_geometry(weight.shape, stride, padding, dilation, padding_end)
    y, partials = conv2d_forward(x, weight, bias, geometry, scale, shift, relu, stats,
                                 residual=residual)
    return y, or_absent(partials, x)


def fake_conv2d_outputs(x: Tensor, weight: Tensor, window: list[list[int]],
                        stats: bool) -> tuple[Tensor, Tensor]:
    """The fake (y, partials) of a conv2d operator on x with ``weight`` and ``window``
    (stride, padding, dilation, padding_end)."""
    geometry = conv_geometry(weight.shape, *window)
    shape = (x.shape[0], weight.shape[0], *geometry.output_size(*x.shape[2:]))
    y = fake_empty(shape, x.dtype, x, memory_format_of(x))
    if not stats:
        return y, absent(x)
    return y, fake_empty((3, stats_tiles(x, weight, geometry), weight.shape[0]), torch.float32,
                         x)


@conv2d.register_fake
def _(x, weight, bias, scale, shift, stride, padding, dilation, padding_end, relu, stats,
      residual):
    return fake_conv2d_outputs(x, weight, [stride, padding, dilation, padding_end], stats)


def _conv2d_setup(ctx, inputs, output) -> None:
    x, weight, _, scale, _, *window, relu, _, _ = inputs
    ctx.window = window
    ctx.input_shape, ctx.channels_last = list(x.shape), is_channels_last(x)
    ctx.weight_shape = list(weight.shape)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero gradient written for the partials
    need_dx, need_dw = ctx.needs_input_grad[:2]
    ctx.save_for_backward(x if need_dw else None, weight if need_dx or need_dw else None, scale,
                          output[0] if relu else None)


@profiling.op_range("conv2d.backward")
def _conv2d_grads(ctx, dy: Tensor, unused_partials_grad):
    x, weight, scale, y = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_residual = ctx.needs_input_grad[11]
    if need_residual and y is not None:
        # The residual's gradient is dy through the ReLU (not the scale): mask it once, here.
        dy, y = relu_ops.relu_backward(y, dy), None
    dx = dw = db = None
    if need_dx or need_dw or need_db:
        dx, dw, db = conv2d_backward(dy, x, weight, scale, y, ctx.input_shape,
                                     ctx.channels_last, ctx.weight_shape, *ctx.window, need_dx,
                                     need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            *no_grads(8), dy if need_residual else None)


conv2d.register_autograd(_conv2d_grads, setup_context=_conv2d_setup)


@torch.library.custom_op("fastarch::conv2d_backward", mutates_args=())
def conv2d_backward(dy: Tensor, x: Optional[Tensor], weight: Optional[Tensor],
                    scale: Optional[Tensor], y: Optional[Tensor], input_shape: list[int],
                    channels_last: bool, weight_shape: list[int], stride: list[int],
                    padding: list[int], dilation: list[int], padding_end: list[int],
                    input_grad: bool, weight_grad: bool,
                    bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of ``conv2d``, each a placeholder unless asked for
    (``conv_grads``)."""
    grads = conv_grads(dy, x, weight, scale, y, input_shape, channels_last, weight_shape,
                       (stride, padding, dilation, padding_end), input_grad, weight_grad,
                       bias_grad)
    return tuple(or_absent(grad, dy) for grad in grads)


def conv_grads(dy: Tensor, x: Optional[Tensor], weight: Optional[Tensor],
               scale: Optional[Tensor], y: Optional[Tensor], input_shape: list[int],
               channels_last: bool, weight_shape: list[int], window: ConvWindow,
               input_grad: bool, weight_grad: bool, bias_grad: bool,
               prologue: Optional[InputNormalization] = None
               ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dweight, dbias) of a conv2d forward, None unless asked for; dy goes back through
    the ReLU (``y``, the output, given when it ran) and the constant ``scale``. dx needs
    ``weight``, dweight needs ``x`` (read through the forward's input ``prologue``) and takes
    ``weight``'s layout (``weight_grad_format``)."""
    if y is not None:
        dy = relu_ops.relu_backward(y, dy)  # one pass, NaN passes as in threshold_backward
    if scale is not None:
        dy = (dy.float() * scale.view(1, -1, 1, 1)).to(dy.dtype)
    geometry = conv_geometry(weight_shape, *window)
    operand = backend.conv_operand(dy.dtype)
    dx = dw = db = None
    if input_grad:
        dx, _ = conv2d_input_grad(dy, weight, torch.Size(input_shape),
                                  memory_format_for(channels_last), geometry, operand)
    if weight_grad:
        dw, db = conv2d_weight_grad(x, dy, torch.Size(weight_shape), geometry, bias_grad,
                                    operand, prologue=prologue,
                                    dw_format=weight_grad_format(weight))
    elif bias_grad:
        db = dy.sum((0, 2, 3), dtype=torch.float32).to(dy.dtype)
    return dx, dw, db


@conv2d_backward.register_fake
def _(dy, x, weight, scale, y, input_shape, channels_last, weight_shape, stride, padding,
      dilation, padding_end, input_grad, weight_grad, bias_grad):
    return (fake_empty(input_shape, dy.dtype, dy, memory_format_for(channels_last)) if input_grad
            else absent(dy),
            fake_empty(weight_shape, dy.dtype, dy, weight_grad_format(weight)) if weight_grad
            else absent(dy),
            fake_empty(weight_shape[:1], dy.dtype, dy) if bias_grad else absent(dy))


conv2d_backward.register_autograd(no_double_backward("conv2d"))


# ----------------------------------------------------------------------------- functional

def check_residual(x: Tensor, weight: Tensor, geometry: ConvGeometry,
                   residual: Optional[Tensor]) -> None:
    """Raise ValueError unless ``residual`` is None or a tensor of the conv's output shape,
    x's dtype, on x's device."""
    if residual is None:
        return
    shape = [*x.shape[:-3], weight.shape[0], *geometry.output_size(*x.shape[-2:])]
    if list(residual.shape) != shape or residual.dtype != x.dtype or \
            residual.device != x.device:
        raise ValueError(f"conv2d_fused: expected a residual of its output's shape {shape}, "
                         f"dtype {x.dtype} and device {x.device}, but got "
                         f"{list(residual.shape)}, {residual.dtype} on {residual.device}")


def conv2d_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], geometry: ConvGeometry,
                 scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                 relu: bool = False, stats: bool = False, residual: Optional[Tensor] = None
                 ) -> tuple[Tensor, Optional[WelfordPartials]]:
    """The ``fastarch::conv2d`` operator on a 4-D x (checked arguments), with the statistics
    as ``WelfordPartials`` (None without ``stats``)."""
    y, partials = conv2d(x, weight, bias, scale, shift, *conv_window(geometry), bool(relu),
                         bool(stats), residual)
    return y, WelfordPartials(*partials.unbind(0)) if stats else None


def conv2d_fused_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                       stride: arguments.IntOrPair, padding: arguments.ConvPadding,
                       dilation: arguments.IntOrPair, scale: Optional[Tensor],
                       shift: Optional[Tensor], relu: bool, stats: bool,
                       residual: Optional[Tensor] = None
                       ) -> tuple[Tensor, Optional[WelfordPartials]]:
    """The fallback of ``functional.conv2d_fused``: torch's conv2d, then the epilogue as
    torch ops; the partials are one tile holding the whole output."""
    y = F.conv2d(arguments.batched(x), weight, bias, stride, padding, dilation)
    partials = None
    if stats:
        values = y.detach().to(torch.promote_types(y.dtype, torch.float32))
        var, mean = torch.var_mean(values, dim=(0, 2, 3), unbiased=False)
        count = torch.full_like(mean, y.numel() // y.shape[1])
        partials = WelfordPartials(count[None], mean[None], (var * count)[None])
    if scale is not None:
        channel = (1, -1, 1, 1)
        y = (y * scale.view(channel) + shift.view(channel)).to(y.dtype)
    if residual is not None:
        y = y + arguments.batched(residual)
    if relu:
        y = torch.relu(y)
    return arguments.unbatched_like(x, y), partials
