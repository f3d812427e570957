"""Compile every kernel config a launcher can choose for Hopper (sm_90a) on a machine with no
GPU, and report what the hardware would get: registers, spills, shared memory, and whether
the matrix instructions are the fast ones (HGMMA) or not (HMMA).

    python -m fastarch.sm90            # table
    python -m fastarch.sm90 --json     # one JSON object per line

Each kernel family exposes ``sm90_launches()``: the ``Launch`` records its launcher builds for
each config in its table, on meta tensors. TRITON_INTERPRET must be off in this process
(``@triton.jit`` would otherwise hand out interpreter functions that cannot be compiled).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

# The kernel families whose configs are checked; each module has sm90_launches().
KERNEL_MODULES = (
    "fastarch.kernels.max_pool",
    "fastarch.kernels.avg_pool",
    "fastarch.kernels.conv2d_forward",
    "fastarch.kernels.conv2d_dgrad",
    "fastarch.kernels.conv2d_wgrad",
    "fastarch.kernels.linear",
    "fastarch.kernels.batch_norm",
    "fastarch.kernels.relu",
)

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


def all_launches() -> list:
    launches = []
    for module_name in KERNEL_MODULES:
        launches.extend(importlib.import_module(module_name).sm90_launches())
    return launches


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


def compile_launch(launch) -> dict[str, Any]:
    """Compile one Launch for sm_90a and read its resource usage and SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialize(launch)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": launch.num_warps,
                                       "num_stages": launch.num_stages})
    resources, sass = _cuobjdump(compiled.asm["cubin"])
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", resources)
    return {
        "name": launch.name,
        "num_warps": launch.num_warps,
        "num_stages": launch.num_stages,
        "registers": int(usage.group(1)),
        "stack_bytes": int(usage.group(2)),
        "shared_bytes": compiled.metadata.shared,
        "spill_loads": len(re.findall(r"\bLDL\b", sass)),
        "spill_stores": len(re.findall(r"\bSTL\b", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
    }


def _cuobjdump(cubin: bytes) -> tuple[str, str]:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        resources = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                                   text=True, check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True,
                              check=True).stdout
    return resources, sass


def _compile_index(index: int) -> dict[str, Any]:
    return compile_launch(all_launches()[index])


def compile_all(workers: int | None = None) -> list[dict[str, Any]]:
    count = len(all_launches())
    workers = workers or min(os.cpu_count() or 1, 8)
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_compile_index, range(count)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel config")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    reports = compile_all()
    if args.json:
        for report in reports:
            print(json.dumps(report))
        return 0
    columns = ("name", "num_warps", "num_stages", "registers", "stack_bytes", "shared_bytes",
               "spill_loads", "spill_stores", "hgmma", "hmma")
    widths = [max(len(c), *(len(str(r[c])) for r in reports)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for report in reports:
        print("  ".join(str(report[c]).ljust(w) for c, w in zip(columns, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
