"""Compile every case for one GPU generation, each distinct compilation once, in a process
pool, and describe each launch in one row."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

from fastarch.compile_report import sass
from fastarch.compile_report.arches import Arch, ctas_per_sm
from fastarch.compile_report.cases import Case
from fastarch.compile_report.machine_code import MachineCode, compile_launch, specialize
from fastarch.kernels.launch import Launch


def compile_key(launch: Launch) -> tuple:
    """Everything the binary depends on: two launches with equal keys compile to the same
    code (kernel, constexprs, the JIT's signature specialization, warps and stages)."""
    signature, constexprs, attrs = specialize(launch)
    return (launch.kernel.__module__, launch.kernel.__name__,
            tuple(signature.items()), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
            tuple(sorted(attrs)), launch.num_warps, launch.num_stages)


FIELDS = ("registers", "spills", "stack_bytes", "shared_bytes", "hgmma", "hmma", "tma_loads",
          "wgmma_serialized", "ctas_per_sm", "loop_instructions", "ptxas_notes")


def describe(launch: Launch, arch: Arch, code: MachineCode | str,
             instructions: Sequence[sass.Instruction]) -> dict[str, Any]:
    """What the hardware gets from ``launch`` compiled for ``arch``, by the report's names;
    for a launch that did not compile (``code`` is then the error), None and the error."""
    if isinstance(code, str):
        return {**dict.fromkeys(FIELDS), "error": code}
    shared = code.dynamic_shared_bytes + code.ptxas.static_shared_bytes
    return {
        "registers": code.ptxas.registers,
        "spills": code.ptxas.spill_bytes,
        "stack_bytes": code.ptxas.stack_bytes,
        "shared_bytes": shared,
        "hgmma": sass.count(instructions, "HGMMA"),
        "hmma": sass.count(instructions, "HMMA"),
        "tma_loads": sass.count(instructions, "UTMALDG"),
        "wgmma_serialized": code.ptxas.wgmma_serialized,
        "ctas_per_sm": ctas_per_sm(arch, launch.num_warps, code.ptxas.registers, shared),
        "loop_instructions": sass.hot_loop_instructions(instructions),
        "ptxas_notes": list(code.ptxas.notes),
        "error": None,
    }


# What a forked worker compiles: set before the pool starts, read by index (launches hold
# JIT functions and meta tensors, which do not pickle).
_JOBS: list[Launch] = []
_ARCH: list[Arch] = []


def _compile_job(index: int) -> MachineCode | str:
    """The machine code of job ``index``, or why it did not compile: the exception and the
    last errors Triton's passes wrote to stderr (captured, not shown)."""
    with tempfile.TemporaryFile("w+") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            return compile_launch(_JOBS[index], _ARCH[0])
        except Exception as error:  # noqa: BLE001 -- a failed compilation is a report row
            log.seek(0)
            notes = [line.strip() for line in log if re.search(r"\b(error|note):", line)]
            return "; ".join([f"{type(error).__name__}: {error}".splitlines()[0], *notes[-2:]])
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def describe_all(launches: Sequence[Launch], arch: Arch, workers: int | None = None
                 ) -> list[dict[str, Any]]:
    """``describe`` of each launch, compiled in ``workers`` forked processes (default: the
    CPU count, at most 8), then disassembled by as many nvdisasm runs."""
    _JOBS[:], _ARCH[:] = launches, [arch]
    workers = max(1, min(workers or min(os.cpu_count() or 1, 8), len(launches)))
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        codes = list(pool.map(_compile_job, range(len(launches))))
    disassembled = sass.disassemble([code.code if isinstance(code, MachineCode) else b""
                                     for code in codes], arch.name, workers)
    return [describe(launch, arch, code, instructions)
            for launch, code, instructions in zip(launches, codes, disassembled)]


def distinct(cases: Sequence[Case]) -> tuple[list[Case], list[Launch]]:
    """The cases with repeats dropped (same config name, same binary), and one launch per
    distinct compilation among them."""
    rows: dict[tuple, Case] = {}
    compilations: dict[tuple, Launch] = {}
    for case in cases:
        key = compile_key(case.launch)
        rows.setdefault((case.launch.name, key), case)
        compilations.setdefault(key, case.launch)
    return list(rows.values()), list(compilations.values())


def report(cases: Sequence[Case], arch: Arch, workers: int | None = None
           ) -> list[dict[str, Any]]:
    """One row per distinct case: the launch, its arch and dtype, and ``describe``'s
    fields, each distinct compilation compiled once."""
    kept, compilations = distinct(cases)
    described = dict(zip((compile_key(launch) for launch in compilations),
                         describe_all(compilations, arch, workers)))
    return [{"kernel": case.launch.kernel.__name__, "config": case.launch.name,
             "arch": arch.name, "dtype": str(case.dtype).removeprefix("torch."),
             "candidate": case.candidate, "num_warps": case.launch.num_warps,
             "num_stages": case.launch.num_stages,
             **described[compile_key(case.launch)]}
            for case in kept]
