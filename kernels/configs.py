"""Tuning configs as data, one short named table per kernel family, keyed on the shape.

Under the Triton interpreter (CPU tests) every family uses one big-tile config: the
interpreter costs about a millisecond per program per loop iteration and ignores
num_warps/num_stages, so fewer, larger programs are what make it fast.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PoolConfig:
    """A [BLOCK_M pixels x BLOCK_C channels] tile; channels are the contiguous axis in NHWC."""
    name: str
    block_m: int
    block_c: int
    num_warps: int


# Keyed on the channel count: the channel block covers C (up to 128) with 16-byte vectors,
# and the pixel block keeps each program near 4096 elements, 16 per thread at 8 warps.
POOL_CONFIGS: dict[str, PoolConfig] = {
    "c16": PoolConfig("c16", block_m=256, block_c=16, num_warps=8),
    "c32": PoolConfig("c32", block_m=128, block_c=32, num_warps=8),
    "c64": PoolConfig("c64", block_m=64, block_c=64, num_warps=8),
    "c128": PoolConfig("c128", block_m=32, block_c=128, num_warps=8),
}


def pool_config(channels: int, interpreter: bool, pixels: int) -> PoolConfig:
    if interpreter:
        block_c = _pow2_at_least(channels, 1)
        block_m = min(_pow2_at_least(pixels, 16), max(16, 8192 // block_c))
        return PoolConfig("interpreter", block_m=block_m, block_c=block_c, num_warps=4)
    if channels <= 16:
        return POOL_CONFIGS["c16"]
    if channels <= 32:
        return POOL_CONFIGS["c32"]
    if channels <= 64:
        return POOL_CONFIGS["c64"]
    return POOL_CONFIGS["c128"]


def _pow2_at_least(n: int, floor: int) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


# ----------------------------------------------------------------------------- conv forward

@dataclass(frozen=True)
class ConvConfig:
    """An implicit-GEMM tile: BLOCK_M output pixels x BLOCK_N output channels, stepping
    BLOCK_K along the reduction (R*S*C)."""
    name: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Inputs with fewer channels than this take the flattened-K path (the reduction runs over
# (r, s, c) together), so a 3-channel first layer does not pad every tap to a 16-wide K tile.
CONV_SMALL_C = 16

# Keyed on path ("flat": C < 16; "chan": C >= 16, K tiles inside one (r, s) tap), output
# channels (n16 / n64 / n128: 128 and more) and operand type (16bit; tf32; fp32 without TF32
# has no tensor cores and gets one FMA tile). 16-bit chan tiles are 64 deep (a 128-byte
# channel row), fp32 ones 32 deep (same bytes per stage); 4 stages of 32 KiB for 128x128x64.
# Flat tiles gather 2-byte elements (no cp.async, so no software pipeline: one stage) and
# need 8 warps to stay under 128 registers. 128x256 (the prototype's tile) is left out: at
# 8 warps it reaches 255 registers with the bias epilogue and spills with stats or
# scale/shift + ReLU (checked with ``python -m fastarch.sm90``).
CONV_FORWARD_CONFIGS: dict[str, ConvConfig] = {config.name: config for config in (
    ConvConfig("flat_n16_16bit", 128, 16, 32, num_warps=8, num_stages=1),
    ConvConfig("flat_n64_16bit", 128, 64, 32, num_warps=8, num_stages=1),
    ConvConfig("chan_n64_16bit", 128, 64, 64, num_warps=4, num_stages=4),
    ConvConfig("chan_n128_16bit", 128, 128, 64, num_warps=8, num_stages=4),
    ConvConfig("flat_n16_tf32", 128, 16, 32, num_warps=8, num_stages=1),
    ConvConfig("flat_n64_tf32", 128, 64, 32, num_warps=8, num_stages=1),
    ConvConfig("chan_n64_tf32", 128, 64, 32, num_warps=4, num_stages=4),
    ConvConfig("chan_n128_tf32", 128, 128, 32, num_warps=8, num_stages=4),
    ConvConfig("fp32_ieee", 64, 64, 16, num_warps=4, num_stages=2),
)}


def conv_forward_config(in_channels: int, out_channels: int, reduction: int, operand: str,
                        interpreter: bool, pixels: int) -> ConvConfig:
    """The tile for a conv forward; ``operand`` is "16bit", "tf32" or "ieee" and
    ``reduction`` is R*S*C."""
    flat = in_channels < CONV_SMALL_C
    if interpreter:
        depth = reduction if flat else in_channels
        return ConvConfig("interpreter", block_m=min(_pow2_at_least(pixels, 16), 128),
                          block_n=min(_pow2_at_least(out_channels, 16), 128),
                          block_k=min(_pow2_at_least(depth, 16), 128),
                          num_warps=4, num_stages=1)
    if operand == "ieee":
        config = CONV_FORWARD_CONFIGS["fp32_ieee"]
    elif flat:
        width = "n16" if out_channels <= 16 else "n64"
        config = CONV_FORWARD_CONFIGS[f"flat_{width}_{operand}"]
    else:
        width = "n64" if out_channels <= 64 else "n128"
        config = CONV_FORWARD_CONFIGS[f"chan_{width}_{operand}"]
    # A reduction shallower than the tile (C = 16 or 32, a 1x1 first layer) gets a shallower tile.
    depth = max(16, _pow2_at_least(reduction if flat else in_channels, 1))
    if depth < config.block_k:
        config = replace(config, name=f"{config.name}_k{depth}", block_k=depth)
    return config


# ----------------------------------------------------------------------------- conv backward

# dgrad is a GEMM over input pixels (M) x input channels (N), stepping BLOCK_K output channels
# of one tap at a time. Keyed on the input channels (n16: C <= 16, n64: C <= 64, else n128)
# and operand type, with the forward's tile depths (64 for 16-bit, 32 for tf32). A first
# layer's dgrad (C = 1 or 3) pads to a 16-wide N tile; it only runs when the image itself
# requires grad.
CONV_DGRAD_CONFIGS: dict[str, ConvConfig] = {config.name: config for config in (
    ConvConfig("dgrad_n16_16bit", 128, 16, 64, num_warps=4, num_stages=4),
    ConvConfig("dgrad_n64_16bit", 128, 64, 64, num_warps=4, num_stages=4),
    ConvConfig("dgrad_n128_16bit", 128, 128, 64, num_warps=8, num_stages=4),
    ConvConfig("dgrad_n16_tf32", 128, 16, 32, num_warps=4, num_stages=4),
    ConvConfig("dgrad_n64_tf32", 128, 64, 32, num_warps=4, num_stages=4),
    ConvConfig("dgrad_n128_tf32", 128, 128, 32, num_warps=8, num_stages=4),
    ConvConfig("dgrad_fp32_ieee", 64, 64, 16, num_warps=4, num_stages=2),
)}

# wgrad is a GEMM over (r, s, c) flattened (M) x output channels (N), reducing over the
# N*P*Q pixels in BLOCK_K steps, split across programs. An M tile stays inside one tap when C
# is a multiple of BLOCK_M (the kernel then reads one channel run per pixel); otherwise
# (C = 1, 3, 6, ...) it spans taps so a 3-channel layer fills its tile with 27 or 363 real
# (r, s, c) columns instead of padding each tap to 16. Keyed on the tile (m128 only when
# C % 128 == 0 and K_out > 64), output channels (n16: K_out <= 16, n64: <= 64, else n128) and
# operand type.
CONV_WGRAD_CONFIGS: dict[str, ConvConfig] = {config.name: config for config in (
    ConvConfig("wgrad_m64_n16_16bit", 64, 16, 64, num_warps=4, num_stages=4),
    ConvConfig("wgrad_m64_n64_16bit", 64, 64, 64, num_warps=4, num_stages=4),
    ConvConfig("wgrad_m64_n128_16bit", 64, 128, 64, num_warps=4, num_stages=4),
    ConvConfig("wgrad_m128_n128_16bit", 128, 128, 64, num_warps=8, num_stages=4),
    ConvConfig("wgrad_m64_n16_tf32", 64, 16, 32, num_warps=4, num_stages=4),
    ConvConfig("wgrad_m64_n64_tf32", 64, 64, 32, num_warps=4, num_stages=4),
    ConvConfig("wgrad_m64_n128_tf32", 64, 128, 32, num_warps=4, num_stages=4),
    ConvConfig("wgrad_m128_n128_tf32", 128, 128, 32, num_warps=8, num_stages=4),
    ConvConfig("wgrad_fp32_ieee", 64, 64, 16, num_warps=4, num_stages=2),
)}

# Split-K: enough programs for WGRAD_WAVES waves of the GPU, but each split reduces at least
# WGRAD_MIN_SPLIT_STEPS tiles, so its fp32 partial (written once, read once by the merge) stays
# small beside the activations it read. The interpreter splits in at most
# WGRAD_INTERPRETER_SPLITS parts of WGRAD_INTERPRETER_STEP-pixel steps: enough to exercise the
# merge on test-sized layers, cheap to run.
WGRAD_WAVES = 2
WGRAD_MIN_SPLIT_STEPS = 16
WGRAD_INTERPRETER_SPLITS = 3
WGRAD_INTERPRETER_STEP = 64  # pixels per step: small enough that tests reach the merge


def conv_dgrad_config(in_channels: int, out_channels: int, operand: str, interpreter: bool,
                      pixels: int) -> ConvConfig:
    """The tile for a conv input gradient; ``operand`` is "16bit", "tf32" or "ieee" and
    ``pixels`` the input pixels of one stride phase."""
    if interpreter:
        return ConvConfig("interpreter", block_m=min(_pow2_at_least(pixels, 16), 256),
                          block_n=min(_pow2_at_least(in_channels, 16), 128),
                          block_k=min(_pow2_at_least(out_channels, 16), 128),
                          num_warps=4, num_stages=1)
    if operand == "ieee":
        return CONV_DGRAD_CONFIGS["dgrad_fp32_ieee"]
    width = "n16" if in_channels <= 16 else "n64" if in_channels <= 64 else "n128"
    return _shallow(CONV_DGRAD_CONFIGS[f"dgrad_{width}_{operand}"], out_channels)


def conv_wgrad_config(in_channels: int, out_channels: int, operand: str, interpreter: bool,
                      taps: int, pixels: int) -> ConvConfig:
    """The tile for a conv weight gradient; ``taps`` is R*S, ``pixels`` N*P*Q."""
    if interpreter:
        # Tiles inside one tap when C is a multiple of 16, as on the GPU for C % 64 == 0,
        # so the tests run both the tap-aligned and the flattened path.
        block_m = (_pow2_dividing(in_channels, 128) if in_channels % 16 == 0
                   else min(_pow2_at_least(taps * in_channels, 16), 128))
        return ConvConfig("interpreter", block_m=block_m,
                          block_n=min(_pow2_at_least(out_channels, 16), 128),
                          block_k=min(_pow2_at_least(pixels, 16), WGRAD_INTERPRETER_STEP),
                          num_warps=4, num_stages=1)
    if operand == "ieee":
        return CONV_WGRAD_CONFIGS["wgrad_fp32_ieee"]
    width = "n16" if out_channels <= 16 else "n64" if out_channels <= 64 else "n128"
    height = "m128" if width == "n128" and in_channels % 128 == 0 else "m64"
    return CONV_WGRAD_CONFIGS[f"wgrad_{height}_{width}_{operand}"]


def conv_wgrad_splits(tiles: int, pixels: int, block_k: int, interpreter: bool,
                      sm_count: int) -> int:
    """How many parts the N*P*Q reduction of a wgrad with ``tiles`` output tiles is split in."""
    steps = -(-pixels // block_k)
    if interpreter:
        return max(1, min(steps, WGRAD_INTERPRETER_SPLITS))
    wanted = -(-WGRAD_WAVES * sm_count // max(tiles, 1))
    return max(1, min(wanted, steps // WGRAD_MIN_SPLIT_STEPS))


def _pow2_dividing(n: int, cap: int) -> int:
    """The largest power of two that divides ``n``, at most ``cap``."""
    return min(n & -n, cap)


def _shallow(config: ConvConfig, depth: int) -> ConvConfig:
    """A reduction shallower than the tile (K_out = 6 or 16 in LeNet) gets a shallower tile."""
    depth = _pow2_at_least(depth, 16)
    if depth < config.block_k:
        config = replace(config, name=f"{config.name}_k{depth}", block_k=depth)
    return config


# ----------------------------------------------------------------------------- batch norm

# The elementwise BatchNorm kernels (apply, dx, BatchNorm fused into the following pool) and
# the per-tile reductions (Welford statistics, backward sums) share one [BLOCK_M pixels x
# BLOCK_C channels] tile, keyed on the channel count like the pools: 16-byte channel vectors,
# about 4096 elements a step, 16 per thread at 8 warps. A reduction program steps through
# several pixel blocks (one tile of partials per program), so the fp32 partials stay small.
BATCH_NORM_CONFIGS: dict[str, PoolConfig] = {
    "c16": PoolConfig("c16", block_m=256, block_c=16, num_warps=8),
    "c32": PoolConfig("c32", block_m=128, block_c=32, num_warps=8),
    "c64": PoolConfig("c64", block_m=64, block_c=64, num_warps=8),
    "c128": PoolConfig("c128", block_m=32, block_c=128, num_warps=8),
}

# The partial merges (statistics finalize, backward sums) read [BLOCK_M tiles x BLOCK_C
# channels] of partials a step; a few hundred tiles make a handful of steps.
BATCH_NORM_MERGE_CONFIG = PoolConfig("merge", block_m=64, block_c=32, num_warps=4)

# Reductions aim at about BATCH_NORM_REDUCTION_PROGRAMS programs (several waves of 132 SMs,
# a function of the shape only, so results do not depend on the card), each stepping through
# at least BATCH_NORM_MIN_TILE_STEPS pixel blocks. The interpreter takes 2 steps per tile and
# merges 2 tiles per step, so small test shapes still run both levels of every merge.
BATCH_NORM_REDUCTION_PROGRAMS = 1024
BATCH_NORM_MIN_TILE_STEPS = 4
BATCH_NORM_INTERPRETER_TILE_STEPS = 2
BATCH_NORM_INTERPRETER_MERGE = PoolConfig("interpreter_merge", block_m=2, block_c=128,
                                          num_warps=4)


def batch_norm_config(channels: int, interpreter: bool, pixels: int,
                      reduction: bool = False) -> PoolConfig:
    """The [pixels x channels] tile of an elementwise or (``reduction``) per-tile BN kernel."""
    if interpreter:
        block_c = _pow2_at_least(channels, 1)
        cap = 64 if reduction else max(16, 8192 // block_c)  # reductions: several blocks
        return PoolConfig("interpreter", block_m=min(_pow2_at_least(pixels, 16), cap),
                          block_c=block_c, num_warps=4)
    for config in BATCH_NORM_CONFIGS.values():
        if channels <= config.block_c:
            return config
    return BATCH_NORM_CONFIGS["c128"]


def batch_norm_merge_config(channels: int, interpreter: bool) -> PoolConfig:
    if interpreter:
        return replace(BATCH_NORM_INTERPRETER_MERGE, block_c=_pow2_at_least(channels, 1))
    return BATCH_NORM_MERGE_CONFIG


def batch_norm_tile_steps(pixels: int, channels: int, config: PoolConfig,
                          interpreter: bool) -> int:
    """How many BLOCK_M pixel blocks one reduction program (one tile of partials) covers."""
    blocks = max(1, -(-pixels // config.block_m))
    if interpreter:
        return min(blocks, BATCH_NORM_INTERPRETER_TILE_STEPS)
    channel_blocks = -(-channels // config.block_c)
    wanted_tiles = max(1, BATCH_NORM_REDUCTION_PROGRAMS // channel_blocks)
    return min(blocks, max(BATCH_NORM_MIN_TILE_STEPS, -(-blocks // wanted_tiles)))


# Elementwise kernels (ReLU, standalone dropout) run on the flat storage of a dense tensor:
# BLOCK elements a program.
@dataclass(frozen=True)
class ElementwiseConfig:
    name: str
    block: int
    num_warps: int


RELU_CONFIG = ElementwiseConfig("block4096", block=4096, num_warps=8)


def relu_config(numel: int, interpreter: bool) -> ElementwiseConfig:
    if interpreter:
        return ElementwiseConfig("interpreter", block=min(_pow2_at_least(numel, 16), 1 << 16),
                                 num_warps=4)
    return RELU_CONFIG


# ----------------------------------------------------------------------------- linear

@dataclass(frozen=True)
class GemmConfig:
    """A [BLOCK_M x BLOCK_N] output tile of a linear-layer GEMM, stepping BLOCK_K."""
    name: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Keyed on columns (n16: N <= 16, LeNet's 10-class head, whatever M), alignment, dropout,
# rows (m64: M <= 64, a small batch; m128 otherwise) and operand type. The one GEMM kernel
# runs all three products: forward (M = batch, N = out features, K = in), input grad
# (M = batch, N = in, K = out) and weight grad (M = out, N = in, K = batch).
# * A row stride that is not a multiple of 16 elements (LeNet's 120 and 84 features, the
#   1000-class head) rules out 16-byte loads and stores; per-element addresses then fill the
#   registers of the larger tiles, so such GEMMs take the "unaligned" tile.
# * Philox keeps four words per element live: a dropout epilogue over the 64 elements a
#   thread of an n128 tile holds needs 255 registers, so dropout takes an n64 tile.
# 16-bit tiles are 64 deep, tf32 ones 32 deep (the same 128 bytes a row per stage); fp32
# without TF32 has no tensor cores and gets one FMA tile. Register counts: python -m
# fastarch.sm90.
LINEAR_GEMM_CONFIGS: dict[str, GemmConfig] = {config.name: config for config in (
    GemmConfig("m64_n64_16bit", 64, 64, 64, num_warps=4, num_stages=4),
    GemmConfig("m64_n128_16bit", 64, 128, 64, num_warps=4, num_stages=4),
    GemmConfig("m128_n16_16bit", 128, 16, 64, num_warps=4, num_stages=4),
    GemmConfig("m128_n64_16bit", 128, 64, 64, num_warps=8, num_stages=4),
    GemmConfig("m128_n128_16bit", 128, 128, 64, num_warps=8, num_stages=4),
    GemmConfig("unaligned_16bit", 128, 64, 32, num_warps=8, num_stages=3),
    GemmConfig("m64_n64_tf32", 64, 64, 32, num_warps=4, num_stages=4),
    GemmConfig("m64_n128_tf32", 64, 128, 32, num_warps=4, num_stages=4),
    GemmConfig("m128_n16_tf32", 128, 16, 32, num_warps=4, num_stages=4),
    GemmConfig("m128_n64_tf32", 128, 64, 32, num_warps=8, num_stages=4),
    GemmConfig("m128_n128_tf32", 128, 128, 32, num_warps=8, num_stages=4),
    GemmConfig("unaligned_tf32", 128, 64, 32, num_warps=8, num_stages=3),
    GemmConfig("fp32_ieee", 64, 64, 16, num_warps=4, num_stages=2),
)}

# The classifier layers the table is meant for: name -> (batch, in features, out features).
LINEAR_LAYERS: dict[str, tuple[int, int, int]] = {
    "alexnet_fc6_b64": (64, 9216, 4096),
    "alexnet_fc6_b256": (256, 9216, 4096),
    "fc7_b64": (64, 4096, 4096),
    "fc7_b256": (256, 4096, 4096),
    "fc8_b64": (64, 4096, 1000),
    "fc8_b256": (256, 4096, 1000),
    "lenet_fc1_b1024": (1024, 400, 120),
    "lenet_fc2_b1024": (1024, 120, 84),
    "lenet_fc3_b1024": (1024, 84, 10),
}

# Split-K: at batch 64 a 4096-feature layer has 32 output tiles for 132 SMs and a reduction
# of 9216, so the reduction is split until the programs fill one wave, each split keeping at
# least LINEAR_MIN_SPLIT_STEPS BLOCK_K steps. The interpreter splits in two once there are
# LINEAR_INTERPRETER_SPLIT_STEPS steps: enough for the tests to reach the split path.
LINEAR_MIN_SPLIT_STEPS = 8
LINEAR_INTERPRETER_SPLIT_STEPS = 4


def linear_gemm_config(M: int, N: int, K: int, operand: str, aligned: bool, dropout: bool,
                       interpreter: bool) -> GemmConfig:
    """The tile for C[M, N] = A[M, K] @ B[K, N]; ``operand`` is "16bit", "tf32" or "ieee",
    ``aligned`` whether every operand's row stride is a multiple of 16 elements, ``dropout``
    whether the epilogue runs dropout."""
    if interpreter:
        return GemmConfig("interpreter", block_m=min(_pow2_at_least(M, 16), 64),
                          block_n=min(_pow2_at_least(N, 16), 128),
                          block_k=min(_pow2_at_least(K, 16), 128), num_warps=4, num_stages=1)
    if operand == "ieee":
        return LINEAR_GEMM_CONFIGS["fp32_ieee"]
    if N <= 16:
        return LINEAR_GEMM_CONFIGS[f"m128_n16_{operand}"]
    if not aligned:
        return LINEAR_GEMM_CONFIGS[f"unaligned_{operand}"]
    height = "m64" if M <= 64 else "m128"
    width = "n64" if dropout else "n128"
    return LINEAR_GEMM_CONFIGS[f"{height}_{width}_{operand}"]


def linear_split_k(tiles: int, K: int, block_k: int, interpreter: bool, sm_count: int) -> int:
    """How many parts the K reduction of a GEMM with ``tiles`` output tiles is split in."""
    steps = -(-K // block_k)
    if interpreter:
        return 2 if steps >= LINEAR_INTERPRETER_SPLIT_STEPS else 1
    return max(1, min(sm_count // max(tiles, 1), steps // LINEAR_MIN_SPLIT_STEPS))


@dataclass(frozen=True)
class RowTileConfig:
    """A [BLOCK_M rows x BLOCK_N columns] tile of an elementwise pass over a 2-D tensor (the
    linear backward's masked output gradient and bias partials, the split-K epilogue)."""
    name: str
    block_m: int
    block_n: int
    num_warps: int


# 4096 elements a program, 16 a thread; BLOCK_N = 256 keeps a row's loads 512 bytes wide.
LINEAR_ROW_TILE = RowTileConfig("rows16_cols256", block_m=16, block_n=256, num_warps=8)


def linear_row_tile_config(M: int, N: int, interpreter: bool) -> RowTileConfig:
    if interpreter:
        return RowTileConfig("interpreter", block_m=min(_pow2_at_least(M, 16), 64),
                             block_n=min(_pow2_at_least(N, 16), 256), num_warps=4)
    return LINEAR_ROW_TILE


# Philox costs ~100 integer ops an element, so dropout is compute-bound: 8 elements a thread.
DROPOUT_CONFIG = ElementwiseConfig("block2048", block=2048, num_warps=8)


def dropout_config(numel: int, interpreter: bool) -> ElementwiseConfig:
    if interpreter:
        return ElementwiseConfig("interpreter", block=min(_pow2_at_least(numel, 16), 65536),
                             num_warps=4)
    return DROPOUT_CONFIG
