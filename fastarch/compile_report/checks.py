"""What a config must not do, on any generation: fail to compile, spill registers, serialize
its wgmma (ptxas C7515: each wgmma then waits for the one before), ask for more shared
memory than one CTA may have; and on Hopper, fall back to the pre-Hopper HMMA."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastarch.compile_report.arches import Arch


def problems(row: dict[str, Any], arch: Arch) -> list[str]:
    """What is wrong with one report row (nothing: an empty list)."""
    if row.get("error"):
        return [f"does not compile ({row['error']})"]
    found = []
    if row["spills"] or row["stack_bytes"]:
        found.append(f"spills ({row['spills']} bytes spilled, "
                     f"{row['stack_bytes']} bytes stack frame)")
    if row["wgmma_serialized"]:
        why = next((note for note in row["ptxas_notes"] if note.startswith("(C7515)")), "")
        found.append("wgmma serialized" + (f": {why.split(' due to ')[-1]}" if why else ""))
    if row["shared_bytes"] > arch.shared_per_cta:
        found.append(f"{row['shared_bytes']} bytes of shared memory, over the "
                     f"{arch.shared_per_cta} a CTA may have on {arch.name}")
    if arch.hopper and row["hmma"]:
        found.append(f"{row['hmma']} HMMA (pre-Hopper tensor-core instructions)")
    return found


def failures(rows: Sequence[dict[str, Any]], arch: Arch) -> list[str]:
    """One line per failing row: its config, dtype (and whether it is an autotuning
    candidate), and what is wrong."""
    return [f"{row['config']} ({row['dtype']}{', candidate' if row.get('candidate') else ''}): "
            f"{'; '.join(found)}" for row in rows if (found := problems(row, arch))]
