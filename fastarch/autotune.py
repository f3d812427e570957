"""Tile choice on the user's GPU: every kernel family's launcher asks ``choose`` for its tile.

``choose`` returns the static table's tile (the seed) unless tuning is on, in which case the
first call of a new launch key times the family's candidates for this GPU's generation
(pruned by shared memory and registers before anything is compiled) and remembers the
fastest, in memory and on disk: one JSON file per device under the user cache directory
(``FASTARCH_CACHE_DIR`` overrides it), written atomically under a file lock so several
processes (DDP ranks) can share it. The next run reads the winner back without timing.

``FASTARCH_AUTOTUNE``: ``off`` (the static table, nothing read or written), ``on`` (the
default: at most ``ON_CANDIDATES`` candidates a key) or ``max`` (every candidate).

Nothing is timed under the Triton interpreter, during CUDA-graph capture or while
``torch.compile`` traces: there a cached winner is used where one exists, else the static
tile. A trial writes only buffers of its own (``Trial``): running statistics, in-place
outputs and dropout seeds are touched once, by the real call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import triton

from fastarch import __version__
from fastarch.kernels.launch import Launch, TileConfig
from fastarch.kernels.runtime import INTERPRETER

ON_CANDIDATES = 6
MODES = ("off", "on", "max")

# A trial: given a candidate tile, a callable running that tile's launches on buffers of its
# own (never the caller's outputs or state).
Trial = Callable[[TileConfig], Callable[[], None]]
# A family's candidate tiles for a GPU generation, its static tile first.
Candidates = Callable[["Generation"], Sequence[TileConfig]]
# A timer: the milliseconds one run of the callable takes.
Timer = Callable[[Callable[[], None]], float]


class Generation(str, Enum):
    """The GPU generations whose candidate lists differ: cp.async tiles (Ampere, Ada) and
    wgmma tiles (Hopper)."""
    AMPERE = "ampere"
    HOPPER = "hopper"

    @classmethod
    def of(cls, capability: tuple[int, int]) -> "Generation":
        return cls.HOPPER if capability[0] >= 9 else cls.AMPERE


@dataclass(frozen=True)
class DeviceProfile:
    """What pruning and the cache's key need to know about a device."""
    name: str
    capability: tuple[int, int]
    shared_bytes: int  # the most shared memory one program may allocate
    registers: int = 65536  # 32-bit registers per SM

    @property
    def generation(self) -> Generation:
        return Generation.of(self.capability)

    @property
    def slug(self) -> str:
        name = "".join(ch if ch.isalnum() else "-" for ch in self.name).strip("-").lower()
        return f"{name}-sm{self.capability[0]}{self.capability[1]}"


# Per-program shared memory by architecture, where a device cannot be asked (the compile
# report's targets; a CPU stands in as Hopper).
ARCH_PROFILES = {
    "sm_80": DeviceProfile("A100", (8, 0), 163 * 1024),
    "sm_89": DeviceProfile("L40", (8, 9), 99 * 1024),
    "sm_90a": DeviceProfile("H100", (9, 0), 227 * 1024),
}


def device_profile(device: torch.device) -> DeviceProfile:
    if device.type != "cuda":
        return ARCH_PROFILES["sm_90a"]
    return _cuda_profile(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _cuda_profile(index: int) -> DeviceProfile:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    registers = getattr(props, "regs_per_multiprocessor", 0) or 65536
    return DeviceProfile(props.name, (props.major, props.minor), shared, registers)


# ----------------------------------------------------------------------------- pruning

# A tensor-core tile's fp32 accumulator may hold at most this many registers a thread (the
# rest of the 255 hold operand fragments and addresses); an elementwise tile at most this
# many elements a thread (a 3x3 pool window at 32 spills).
MAX_ACCUMULATOR_REGISTERS = 128
MAX_ELEMENTS_PER_THREAD = 16


def shared_bytes(tile: TileConfig, element_size: int) -> int:
    """The operand staging a GEMM-like tile needs: one [BLOCK_M + BLOCK_N, BLOCK_K] stage of
    each operand per pipeline stage (0 for a tile without a reduction axis)."""
    if tile.block_k == 1:
        return 0
    return max(tile.num_stages, 1) * (tile.block_m + tile.block_n) * tile.block_k * element_size


def fits(tile: TileConfig, element_size: int, profile: DeviceProfile) -> bool:
    """Whether ``tile`` can run on ``profile``'s device without spilling or failing to
    launch, judged before compiling it."""
    per_thread = tile.block_m * tile.block_n / (32 * tile.num_warps)
    if tile.block_k == 1:
        return per_thread <= MAX_ELEMENTS_PER_THREAD
    return (shared_bytes(tile, element_size) <= profile.shared_bytes
            and per_thread <= MAX_ACCUMULATOR_REGISTERS
            and 32 * tile.num_warps * min(per_thread, 255) <= profile.registers)


# ----------------------------------------------------------------------------- the choice

def mode() -> str:
    value = os.environ.get("FASTARCH_AUTOTUNE", "on").strip().lower()
    if value not in MODES:
        raise ValueError(f"FASTARCH_AUTOTUNE must be one of {', '.join(MODES)}, got {value!r}")
    return value


def runs_kernels(device: torch.device) -> bool:
    """Whether compiled kernels run on ``device``: a GPU, not the interpreter (whose tile is
    its own rule's) nor a meta tensor (the compile report's)."""
    return device.type == "cuda" and not INTERPRETER


def tuning_blocked() -> bool:
    """Whether timing candidates is not allowed now: while torch.compile traces, or while a
    CUDA graph is being captured (a cached winner or the static tile is used instead)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def launch_key(family: str, shape: dict[str, Any], dtype: torch.dtype, layout: str) -> str:
    """The cache key of one launch: the family, the shape quantities that change its best
    tile, dtype and layout, and the Triton and fastarch versions (the device is the file)."""
    quantities = ",".join(f"{name}={value}" for name, value in shape.items())
    return (f"{family}[{quantities}] {str(dtype).removeprefix('torch.')} {layout} "
            f"triton={triton.__version__} fastarch={__version__}")


def choose(family: str, shape: dict[str, Any], dtype: torch.dtype, layout: str,
           device: torch.device, static: TileConfig, candidates: Candidates,
           trial: Trial) -> TileConfig:
    """The tile for one launch of ``family``: the static one when tuning is off, else the
    cached winner for its key, else (where timing is allowed) the fastest of the device
    generation's ``candidates`` that fit the device, timed now and cached; the static one
    where nothing is known. The static tile is ``static``, or where the device cannot hold
    it (Ada's 99 KiB of shared memory) the first candidate that fits."""
    tune = mode()
    if not runs_kernels(device):
        return static
    profile = device_profile(device)
    key = launch_key(family, shape, dtype, layout)
    decision = (cache_dir(), profile.slug, tune, static.name, key)
    if decision in _DECIDED:  # every launch after a layer's first: no list, no file
        return _DECIDED[decision]
    by_name = {tile.name: tile for tile in (static, *candidates(profile.generation))}
    pool = [tile for tile in by_name.values() if fits(tile, dtype.itemsize, profile)]
    seed = pool[0] if pool else static
    if tune == "off":
        _DECIDED[decision] = seed
        return seed
    cached = by_name.get(_cache_for(profile).winner(key))
    if cached is not None:
        _DECIDED[decision] = cached
        return cached
    if tuning_blocked():  # not remembered: the first call outside tunes
        return seed
    if tune == "on":
        pool = pool[:ON_CANDIDATES]
    winner = seed if len(pool) < 2 else _fastest(trial, pool, key, profile)
    _DECIDED[decision] = winner
    return winner


def _fastest(trial: Trial, pool: Sequence[TileConfig], key: str,
             profile: DeviceProfile) -> TileConfig:
    """Time every tile of ``pool`` and store the winner under ``key`` in the device's cache."""
    times = {tile.name: _time(trial, tile) for tile in pool}
    winner = min(pool, key=lambda tile: times[tile.name])
    _cache_for(profile).store(key, winner, times)
    return winner


def _time(trial: Trial, tile: TileConfig) -> float:
    """The milliseconds a candidate takes; infinity for one that fails to compile or run (a
    candidate the pruning could not rule out, e.g. over the register file)."""
    try:
        return TIMER(trial(tile))
    except Exception as error:  # noqa: BLE001 -- any failing candidate just loses
        print(f"fastarch autotune: {tile.name} failed ({type(error).__name__}: {error})",
              file=sys.stderr)
        return float("inf")


def _do_bench(run: Callable[[], None]) -> float:
    return triton.testing.do_bench(run, warmup=5, rep=20)


# Replaced by a fake clock in the tests.
TIMER: Timer = _do_bench


# ----------------------------------------------------------------------------- the cache

def cache_dir() -> Path:
    """``FASTARCH_CACHE_DIR``, else the user cache directory's ``fastarch`` folder."""
    if os.environ.get("FASTARCH_CACHE_DIR"):
        return Path(os.environ["FASTARCH_CACHE_DIR"])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastarch"


class TuningCache:
    """The winners of one device: a JSON object {key: {"config", "tile", "times_ms"}} in
    ``path``, read once, then rewritten (merged with what other processes stored meanwhile)
    on every new winner."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = _read(path)

    def winner(self, key: str) -> str | None:
        entry = self.entries.get(key)
        return entry.get("config") if isinstance(entry, dict) else None

    def store(self, key: str, tile: TileConfig, times_ms: dict[str, float]) -> None:
        entry = {"config": tile.name, "tile": asdict(tile),
                 "times_ms": {name: (t if t != float("inf") else None)
                              for name, t in times_ms.items()}}
        self.entries[key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.path.with_suffix(".lock")):
                merged = {**_read(self.path), key: entry}
                _write_atomically(self.path, merged)
            self.entries = {**merged, **self.entries}
        except OSError as error:  # a read-only cache directory: remember in memory only
            print(f"fastarch autotune: cannot write {self.path} ({error})", file=sys.stderr)


_CACHES: dict[Path, TuningCache] = {}
# The tile each (cache directory, device, mode, static tile, key) got in this process.
_DECIDED: dict[tuple, TileConfig] = {}


def _cache_for(profile: DeviceProfile) -> TuningCache:
    path = cache_dir() / f"autotune-{profile.slug}.json"
    if path not in _CACHES:
        _CACHES[path] = TuningCache(path)
    return _CACHES[path]


def forget_loaded_caches() -> None:
    """Drop the caches read into memory and the choices made, so the next choice rereads
    the files."""
    _CACHES.clear()
    _DECIDED.clear()


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError):  # absent, or unreadable: start empty
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_atomically(path: Path, entries: dict[str, Any]) -> None:
    """Write to a temporary file beside ``path`` and rename it over ``path``: a reader sees
    the old file or the new one, never half of one."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock across processes (POSIX ``flock``; elsewhere the atomic rename
    alone keeps the file whole, though two writers may then drop each other's entry)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- candidates

# The GEMM-like tiles (BLOCK_M, BLOCK_N, warps, stages) tried beside a family's static tile,
# best guess first. Hopper: wgmma tiles, one warpgroup (4 warps) up to 128x128 and two
# consumer warpgroups (8 warps) for 128x256 and 256x128; Ampere and Ada: cp.async tiles of
# 4 or 8 warps, with fewer stages where Ada's 99 KiB of shared memory is the limit.
GEMM_SHAPES: dict[Generation, tuple[tuple[int, int, int, int], ...]] = {
    Generation.HOPPER: ((128, 256, 8, 3), (128, 128, 4, 4), (128, 128, 8, 3), (64, 128, 4, 4),
                        (128, 64, 4, 4), (256, 128, 8, 3), (64, 64, 4, 4), (64, 256, 4, 3),
                        (128, 32, 4, 4), (128, 16, 4, 4), (256, 64, 8, 3)),
    Generation.AMPERE: ((128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4),
                        (64, 64, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3), (64, 64, 4, 2),
                        (128, 32, 4, 4), (128, 16, 4, 4), (256, 64, 8, 3)),
}


def gemm_candidates(static: TileConfig, generation: Generation, m: int, n: int
                    ) -> tuple[TileConfig, ...]:
    """``static`` and the generation's GEMM shapes at ``static``'s depth, for an output of
    ``m`` x ``n``: no block wider than the next power of two of its extent (at least 16),
    and a single stage where ``static`` has one (a synchronous gather, not a pipeline)."""
    max_m, max_n = (max(16, triton.next_power_of_2(extent)) for extent in (m, n))
    tiles = [static]
    for block_m, block_n, warps, stages in GEMM_SHAPES[generation]:
        if block_m > max_m or block_n > max_n:
            continue
        stages = 1 if static.num_stages == 1 else stages
        name = f"{static.name}:m{block_m}_n{block_n}_w{warps}_s{stages}"
        tile = TileConfig(name, block_m, block_n, static.block_k, warps, stages)
        if (block_m, block_n, warps, stages) != (static.block_m, static.block_n,
                                                 static.num_warps, static.num_stages):
            tiles.append(tile)
    return tuple(tiles)


# The elementwise and NHWC tiles: elements a program (BLOCK_M x BLOCK_N) and warps.
ELEMENTWISE_SHAPES: tuple[tuple[int, int], ...] = (
    (4096, 8), (2048, 4), (8192, 16), (1024, 4), (2048, 8), (1024, 2), (512, 4))


def elementwise_candidates(static: TileConfig) -> tuple[TileConfig, ...]:
    """``static`` and tiles of the same channel block (``block_n``) holding more or fewer
    elements a program, with 2 to 16 warps."""
    tiles = [static]
    for elements, warps in ELEMENTWISE_SHAPES:
        block_m = max(1, elements // static.block_n)
        if (block_m, warps) != (static.block_m, static.num_warps):
            tiles.append(TileConfig(f"{static.name}:m{block_m}_w{warps}", block_m,
                                    static.block_n, 1, warps, 1))
    return tuple(tiles)


def scratch_run(launches: Sequence[Launch], written: Sequence[torch.Tensor]
                ) -> Callable[[], None]:
    """A callable running ``launches`` with every argument that shares memory with a
    ``written`` tensor (the caller's outputs and state) swapped for a scratch tensor of the
    same shape and strides: a trial that leaves the caller's tensors untouched."""
    storages = {t.untyped_storage().data_ptr() for t in written if t is not None}
    scratch: dict[int, torch.Tensor] = {}

    def private(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or \
                value.untyped_storage().data_ptr() not in storages:
            return value
        if id(value) not in scratch:
            scratch[id(value)] = torch.empty_strided(value.shape, value.stride(),
                                                     dtype=value.dtype, device=value.device)
        return scratch[id(value)]

    trials = [dataclasses.replace(launch, args={name: private(value)
                                                for name, value in launch.args.items()})
              for launch in launches]

    def run() -> None:
        for launch in trials:
            launch()
    return run
