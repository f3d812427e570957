"""Compile one ``Launch`` for a GPU generation on a machine without a GPU, as Triton's JIT
would for that launch, and read what ptxas made of it: its log (registers, stack and spills,
performance warnings such as wgmma serialization) and its instructions.

Triton runs ptxas itself and keeps its log only on request (``TRITON_DUMP_PTXAS_LOG``, which
prints it), so the cubin stage is wrapped to capture that print into the compiled kernel's
metadata, which Triton's cache keeps beside the cubin. The instructions are returned raw, to
be disassembled with many others in one ``nvdisasm`` run (``sass.disassemble``): its start-up
costs more than a small kernel's disassembly. TRITON_INTERPRET must be off in the
compiling process (``@triton.jit`` would otherwise hand out interpreter functions)."""
from __future__ import annotations

import contextlib
import io
import re
import struct
from dataclasses import dataclass
from typing import Any

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastarch.compile_report.arches import Arch

PTXAS_LOG = "fastarch_ptxas_log"  # the metadata key the wrapped cubin stage fills

_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                 "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
                 "bool": "i1"}


def triton_type(value: Any) -> str:
    """The Triton signature type a launch argument gets (tensors become typed pointers)."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return "*" + _TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) > 2**31 - 1 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type launch argument {value!r}")


def specialize(launch) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list]]:
    """Signature, constexprs and attributes as Triton's JIT would specialize this launch:
    integers equal to 1 become constants, and pointers (torch allocations are 16-byte
    aligned) and integers divisible by 16 get the divisibility hint that enables vectors."""
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for position, name in enumerate(launch.kernel.arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        value = launch.args[name]
        if isinstance(value, int) and not isinstance(value, bool) and value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
            continue
        signature[name] = triton_type(value)
        if hasattr(value, "shape") or (isinstance(value, int) and not isinstance(value, bool)
                                       and value % 16 == 0):
            attrs[(position,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


@dataclass(frozen=True)
class PtxasReport:
    """What ptxas -v says about the one kernel it compiled."""
    registers: int
    stack_bytes: int
    spill_bytes: int          # spill stores + spill loads
    static_shared_bytes: int
    notes: tuple[str, ...]    # the coded performance notes, e.g. "(C7515) ... serialized ..."

    @property
    def wgmma_serialized(self) -> bool:
        return any(note.startswith("(C7515)") for note in self.notes)


def read_ptxas_log(log: str) -> PtxasReport:
    """Parse ``ptxas -v``'s log of a single-kernel compilation."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads", log)
    used = re.search(r"Used (\d+) registers(.*)", log)
    if frame is None or used is None:
        raise ValueError(f"not a ptxas -v log of one kernel:\n{log}")
    static_shared = re.search(r"(\d+) bytes smem", used.group(2))
    return PtxasReport(
        registers=int(used.group(1)), stack_bytes=int(frame.group(1)),
        spill_bytes=int(frame.group(2)) + int(frame.group(3)),
        static_shared_bytes=int(static_shared.group(1)) if static_shared else 0,
        notes=tuple(re.findall(r"ptxas \w+\s*: (\(C\d+\).*)", log)))


@dataclass(frozen=True)
class MachineCode:
    ptxas: PtxasReport
    dynamic_shared_bytes: int
    code: bytes               # the kernel's instructions (its ELF .text sections)


def _keep_ptxas_log(backend, stages, options, language, capability) -> None:
    """A Triton stages hook: the cubin stage also stores ptxas's log in the metadata."""
    make_cubin = stages["cubin"]

    def cubin_and_log(src, metadata):
        printed = io.StringIO()
        with knobs.nvidia.scope(), contextlib.redirect_stdout(printed):
            knobs.nvidia.dump_ptxas_log = True
            cubin = make_cubin(src, metadata)
        metadata[PTXAS_LOG] = printed.getvalue()
        return cubin

    stages["cubin"] = cubin_and_log


def _compile(launch, arch: Arch, always: bool):
    signature, constexprs, attrs = specialize(launch)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    with knobs.runtime.scope(), knobs.compilation.scope():
        knobs.runtime.add_stages_inspection_hook = _keep_ptxas_log
        knobs.compilation.always_compile = always
        return triton.compile(source, target=GPUTarget("cuda", arch.capability, 32),
                              options={"num_warps": launch.num_warps,
                                       "num_stages": launch.num_stages})


def compile_launch(launch, arch: Arch) -> MachineCode:
    """Compile ``launch`` for ``arch`` (from Triton's cache when it holds this compilation
    with its ptxas log)."""
    compiled = _compile(launch, arch, always=False)
    log = getattr(compiled.metadata, PTXAS_LOG, None)
    if log is None:  # cached by a compilation that did not keep the log
        compiled = _compile(launch, arch, always=True)
        log = getattr(compiled.metadata, PTXAS_LOG)
    return MachineCode(read_ptxas_log(log), compiled.metadata.shared,
                       code_sections(compiled.asm["cubin"]))


def code_sections(cubin: bytes) -> bytes:
    """The instructions of a cubin: its ELF64 ``.text.*`` sections, in section order."""
    if cubin[:5] != b"\x7fELF\x02":
        raise ValueError("not an ELF64 cubin")
    (table,) = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, entries, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<I4xQQQQ", cubin, table + i * entry_size)
                for i in range(entries)]  # name offset, flags, address, offset, size
    names = sections[names_index][3]
    code = b""
    for name, _, _, offset, size in sections:
        label = cubin[names + name:cubin.index(b"\0", names + name)]
        if label.startswith(b".text."):
            code += cubin[offset:offset + size]
    return code
