"""The GPU generations the compile report targets, with the per-SM limits that decide how
many programs (CTAs) of a compiled kernel fit on one SM, computed as CUDA's occupancy
calculator does (``cuda_occupancy.h``): registers are allocated per warp in units of 256 and
split evenly over the SM's four sub-partitions; every CTA also holds 1 KiB of shared memory
reserved for the system, and shared memory is allocated in 128-byte units."""
from __future__ import annotations

from dataclasses import dataclass

REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256          # registers a warp's allocation is rounded up to
MAX_REGISTERS_PER_THREAD = 255
SUB_PARTITIONS = 4           # each holds a quarter of the register file
RESERVED_SHARED_PER_CTA = 1024
SHARED_UNIT = 128
WARP_SIZE = 32


@dataclass(frozen=True)
class Arch:
    """A compile target: ``capability`` is what Triton's ``GPUTarget`` takes (90 compiles
    for sm_90a, the variant with wgmma and TMA)."""
    name: str
    capability: int
    max_threads_per_sm: int
    max_ctas_per_sm: int
    shared_per_sm: int       # bytes, the largest carve-out, the 1 KiB per CTA included
    shared_per_cta: int      # bytes a kernel may allocate (the opt-in maximum)

    @property
    def hopper(self) -> bool:
        return self.capability >= 90


KIB = 1024
ARCHES: dict[str, Arch] = {arch.name: arch for arch in (
    Arch("sm_80", 80, max_threads_per_sm=2048, max_ctas_per_sm=32, shared_per_sm=164 * KIB,
         shared_per_cta=163 * KIB),                                      # A100
    Arch("sm_89", 89, max_threads_per_sm=1536, max_ctas_per_sm=24, shared_per_sm=100 * KIB,
         shared_per_cta=99 * KIB),                                       # L40S, RTX 4090
    Arch("sm_90a", 90, max_threads_per_sm=2048, max_ctas_per_sm=32, shared_per_sm=228 * KIB,
         shared_per_cta=227 * KIB),                                      # H100, H200
)}


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def ctas_per_sm(arch: Arch, num_warps: int, registers: int, shared_bytes: int) -> int:
    """How many CTAs of ``num_warps`` warps, ``registers`` registers a thread and
    ``shared_bytes`` of shared memory are resident on one SM of ``arch`` at once (0: the
    kernel cannot launch)."""
    if registers > MAX_REGISTERS_PER_THREAD or shared_bytes > arch.shared_per_cta:
        return 0
    by_threads = arch.max_threads_per_sm // (num_warps * WARP_SIZE)
    registers_per_warp = _round_up(max(registers, 1) * WARP_SIZE, REGISTER_UNIT)
    warps_per_sub_partition = REGISTERS_PER_SM // SUB_PARTITIONS // registers_per_warp
    by_registers = warps_per_sub_partition * SUB_PARTITIONS // num_warps
    shared = _round_up(shared_bytes + RESERVED_SHARED_PER_CTA, SHARED_UNIT)
    by_shared = arch.shared_per_sm // shared
    return min(arch.max_ctas_per_sm, by_threads, by_registers, by_shared)
