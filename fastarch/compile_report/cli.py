"""``python -m fastarch compile-report --arch sm_80|sm_89|sm_90a [--json PATH] [--candidates]
[--family NAME ...]``: the report as a table, the rows as a JSON list in PATH, then the
failed checks; exit status 1 when any check fails."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from fastarch.autotune import ARCH_PROFILES
from fastarch.compile_report.arches import ARCHES
from fastarch.compile_report.cases import TileChoice
from fastarch.compile_report.checks import failures
from fastarch.compile_report.launches import FAMILIES, all_cases
from fastarch.compile_report.runner import distinct, report

COLUMNS = ("config", "dtype", "num_warps", "num_stages", "registers", "spills", "shared_bytes",
           "hgmma", "hmma", "tma_loads", "wgmma_serialized", "ctas_per_sm",
           "loop_instructions")
HEADERS = ("config", "dtype", "warps", "stages", "regs", "spills", "smem", "hgmma", "hmma",
           "tma", "serialized", "ctas/SM", "loop")


def table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [HEADERS] + [tuple("-" if row[c] is None else str(row[c]) for c in COLUMNS)
                         for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in cells)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastarch compile-report",
        description="Compile every shipped kernel config for a GPU generation (no GPU "
                    "needed) and check it: no spills, no serialized wgmma, shared memory "
                    "within a CTA's limit, no HMMA on Hopper.")
    parser.add_argument("--arch", choices=tuple(ARCHES), default="sm_90a")
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    parser.add_argument("--candidates", action="store_true",
                        help="also every autotuning candidate the arch's generation may time")
    parser.add_argument("--family", action="append", choices=tuple(FAMILIES),
                        help="only this kernel family (repeatable; default: all)")
    parser.add_argument("--workers", type=int, default=None,
                        help="compiling processes (default: CPUs, at most 8)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    arch = ARCHES[args.arch]
    started = time.perf_counter()
    choice = TileChoice(ARCH_PROFILES[arch.name], args.candidates)
    cases = all_cases(args.family or tuple(FAMILIES), choice)
    rows = report(cases, arch, args.workers)
    print(table(rows))
    print(f"\n{len(rows)} launches, {len(distinct(cases)[1])} distinct compilations, for "
          f"{arch.name} in {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    failed = failures(rows, arch)
    if failed:
        print(f"\n{len(failed)} failed checks on {arch.name}:")
        print("\n".join(f"  {line}" for line in failed))
    return 1 if failed else 0
