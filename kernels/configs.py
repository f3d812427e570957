"""Tuning configs as data, one short named table per kernel family, keyed on the shape.

Under the Triton interpreter (CPU tests) every family uses one big-tile config: the
interpreter costs about a millisecond per program per loop iteration and ignores
num_warps/num_stages, so fewer, larger programs are what make it fast.
"""
from __future__ import annotations

from dataclasses import dataclass


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
