"""What the report reads from a kernel's SASS: how many of each instruction it has, and how
long the body of its hottest loop is. ``disassemble`` runs nvdisasm (shipped with Triton) on
the raw instructions of many kernels at once: one run per CPU, not one per kernel, since
each run first spends about half a second starting up."""
from __future__ import annotations

import bisect
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import triton

# "/*3f00*/   @!P5 BRA 0x3270 ;" -> address, opcode (with its modifiers), operands.
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)"
                          r"\s*([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")

MMA = ("HGMMA", "HMMA")
GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str     # the base opcode, modifiers dropped: "HGMMA", "BRA", "LDG"
    operands: str


def instructions(sass: str) -> list[Instruction]:
    """The instructions of a disassembled kernel, in address order."""
    return [Instruction(int(address, 16), opcode.split(".")[0], operands.strip())
            for address, opcode, operands in _INSTRUCTION.findall(sass)]


def disassemble(codes: Sequence[bytes], arch_name: str, processes: int = 1
                ) -> list[list[Instruction]]:
    """The instructions of each raw code blob (a kernel's ``.text`` sections) for
    ``arch_name`` ("sm_90a"), addressed from 0 within its kernel: the blobs are laid end to
    end in ``processes`` files, each disassembled by one nvdisasm run, in parallel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "nvdisasm")
    groups = [list(range(len(codes)))[part::processes] for part in range(processes)]
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for part, group in enumerate(groups):
            path = os.path.join(tmp, f"part{part}")
            with open(path + ".bin", "wb") as f:
                f.write(b"".join(codes[i] for i in group))
            with open(path + ".sass", "w") as out:  # a file: a full pipe would stall the run
                runs.append(subprocess.Popen(
                    [tool, "--binary", arch_name.replace("sm_", "SM"), "--no-dataflow",
                     path + ".bin"], stdout=out, stderr=subprocess.PIPE, text=True)
                    if os.path.getsize(path + ".bin") else None)
        outputs = []
        for part, run in enumerate(runs):
            errors = run.communicate()[1] if run else ""
            if run and run.returncode:
                raise RuntimeError(f"nvdisasm failed ({run.returncode}): {errors}")
            with open(os.path.join(tmp, f"part{part}.sass")) as f:
                outputs.append(f.read())
    kernels: list[list[Instruction]] = [[] for _ in codes]
    for group, sass in zip(groups, outputs):
        _split(instructions(sass), group, codes, kernels)
    return kernels


def _split(code: list[Instruction], group: list[int], codes: Sequence[bytes],
           kernels: list[list[Instruction]]) -> None:
    """Deal the instructions of blobs laid end to end back to their kernels, rebased."""
    addresses = [instruction.address for instruction in code]
    start = 0
    for index in group:
        end = start + len(codes[index])
        kernels[index] = [Instruction(i.address - start, i.opcode, _rebase(i, start))
                          for i in code[bisect.bisect_left(addresses, start):
                                        bisect.bisect_left(addresses, end)]]
        start = end


def _rebase(instruction: Instruction, start: int) -> str:
    if instruction.opcode != "BRA" or not start:
        return instruction.operands
    return _TARGET.sub(lambda m: hex(int(m.group(1), 16) - start), instruction.operands)


def count(code: Sequence[Instruction], *opcodes: str) -> int:
    return sum(instruction.opcode in opcodes for instruction in code)


def loops(code: Sequence[Instruction]) -> list[tuple[int, int]]:
    """The (first, last) index of every loop: a branch back to an earlier instruction (the
    loop's head) closes it; of several branches back to one head, the last."""
    index_of = {instruction.address: i for i, instruction in enumerate(code)}
    last_branch: dict[int, int] = {}
    for i, instruction in enumerate(code):
        target = _TARGET.search(instruction.operands) if instruction.opcode == "BRA" else None
        head = index_of.get(int(target.group(1), 16)) if target else None
        if head is not None and head < i:
            last_branch[head] = i
    return sorted(last_branch.items())


def hot_loop_instructions(code: Sequence[Instruction]) -> Optional[int]:
    """The instruction count of the hottest loop's body, head to closing branch: of the
    innermost loops holding matrix instructions (or, in a kernel whose loops hold none,
    global loads), the one holding the most, the shortest of equals; None without a loop.

    Innermost: holding no other such loop. A TMA kernel's mbarrier retry blocks, placed
    after the epilogue, branch back into the main loop: the span they close reaches over
    the rest of the kernel (every later loop included) and is no loop of its own."""
    spans = loops(code)
    weighed = MMA if any(count(code[first:last + 1], *MMA) for first, last in spans) \
        else GLOBAL_LOADS
    holding = [span for span in spans if count(code[span[0]:span[1] + 1], *weighed)]
    innermost = [outer for outer in holding if not any(
        inner != outer and outer[0] <= inner[0] and inner[1] <= outer[1] for inner in holding)]
    if not innermost:
        return None
    first, last = max(innermost, key=lambda span: (count(code[span[0]:span[1] + 1], *weighed),
                                                   span[0] - span[1]))
    return last - first + 1
