"""The compile report (``python -m fastarch compile-report``): its readers of ptxas logs and
SASS, the occupancy rule and the checks on hand-made inputs; then, marked slow, every shipped
config compiled for Hopper (sm_90a) and the tensor-core families for Ampere (sm_80), with
every check passing."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from functools import partial

import pytest
import torch

from fastarch.autotune import ARCH_PROFILES
from fastarch.compile_report import all_cases, sass
from fastarch.compile_report.arches import ARCHES, ctas_per_sm
from fastarch.compile_report.cases import TileChoice
from fastarch.compile_report.checks import failures
from fastarch.compile_report.machine_code import read_ptxas_log
from fastarch.ops import conv2d as conv_ops

SERIALIZED_LOG = """\
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are \
serialized due to non wgmma instructions defining accumulator registers of a wgmma between \
start and end of the pipeline stage in the function 'gemm'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gemm' for 'sm_90a'
ptxas info    : Function properties for gemm
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 230 registers, used 1 barriers, 64 bytes smem
ptxas info    : Compile time = 372.307 ms
"""


def test_ptxas_log_gives_registers_spills_and_serialization():
    report = read_ptxas_log(SERIALIZED_LOG)
    assert (report.registers, report.stack_bytes, report.spill_bytes,
            report.static_shared_bytes) == (230, 8, 28, 64)
    assert report.wgmma_serialized


def test_a_clean_ptxas_log_has_no_serialization():
    log = SERIALIZED_LOG.split("\n", 1)[1].replace("8 bytes stack", "0 bytes stack")
    report = read_ptxas_log(log.replace(", 64 bytes smem", ""))
    assert not report.wgmma_serialized and report.notes == ()
    assert report.static_shared_bytes == 0 and report.stack_bytes == 0


# An outer loop (0x20 -> 0x90) around an inner one holding the HGMMA (0x40 -> 0x70), then the
# trailing self-branch every kernel ends with, which is no loop.
NESTED_LOOPS = """\
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0030*/                   LDG.E R6, desc[UR4][R8.64] ;
        /*0040*/                   WARPGROUP.ARRIVE ;
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0070*/               @P0 BRA 0x40 ;
        /*0080*/                   STG.E desc[UR4][R10.64], R24 ;
        /*0090*/              @!P1 BRA 0x20 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_the_hot_loop_is_the_innermost_holding_the_matrix_instructions():
    code = sass.instructions(NESTED_LOOPS)
    assert [i.opcode for i in code[4:8]] == ["WARPGROUP", "HGMMA", "WARPGROUP", "BRA"]
    assert sass.loops(code) == [(2, 9), (4, 7)]
    assert sass.hot_loop_instructions(code) == 4
    assert sass.count(code, "HGMMA") == 1 and sass.count(code, "LDG") == 2


# Two loops (0x10-0x40, 0x70-0xa0) and, after the exit, a TMA kernel's mbarrier retry block
# branching back into the first: the span it closes holds both loops' HGMMA.
RETRY_BLOCK = """\
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;
        /*0020*/              @!P0 BRA 0x100 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0040*/               @P1 BRA 0x10 ;
        /*0050*/                   STG.E desc[UR4][R10.64], R24 ;
        /*0060*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0070*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0080*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0090*/                   IADD3 R3, R3, 0x1, RZ ;
        /*00a0*/               @P2 BRA 0x70 ;
        /*00b0*/                   EXIT ;
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;
        /*0110*/                   BRA 0x30 ;
"""


def test_a_retry_block_branching_back_is_not_the_hot_loop():
    code = sass.instructions(RETRY_BLOCK)
    assert (3, 13) in sass.loops(code)  # the retry block's span: every HGMMA
    assert sass.hot_loop_instructions(code) == 4  # 0x70-0xa0: two HGMMA, innermost


def test_without_matrix_instructions_the_hot_loop_is_the_one_with_the_most_loads():
    code = sass.instructions(NESTED_LOOPS.replace("HGMMA.64x128x16.F32.BF16", "FFMA"))
    assert sass.hot_loop_instructions(code) == 8  # the outer loop: its LDG is outside the inner
    assert sass.hot_loop_instructions(code[:4] + code[10:]) is None


@pytest.mark.parametrize("arch, warps, registers, shared, expected", [
    ("sm_80", 4, 32, 0, 16),                 # threads: 2048 / 128
    ("sm_89", 4, 32, 0, 12),                 # threads: 1536 / 128
    ("sm_90a", 1, 16, 0, 32),                # the CTA cap
    ("sm_90a", 8, 230, 131072, 1),           # 7424 registers a warp: 2 warps a sub-partition
    ("sm_80", 4, 128, 0, 4),                 # registers: 4096 a warp, 4 a sub-partition
    ("sm_80", 4, 64, 100 * 1024, 1),         # shared memory: 164 KiB / 101 KiB
    ("sm_90a", 4, 64, 100 * 1024, 2),        # 228 KiB / 101 KiB
    ("sm_89", 4, 64, 100 * 1024, 0),         # over the 99 KiB a CTA may have
    ("sm_90a", 4, 64, 48 * 1024 - 1024, 4),  # the 1 KiB reserved per CTA counts
])
def test_ctas_per_sm_follows_cudas_occupancy_rules(arch, warps, registers, shared, expected):
    assert ctas_per_sm(ARCHES[arch], warps, registers, shared) == expected


CLEAN_ROW = {"config": "linear_forward[m128_n128_16bit]", "dtype": "bfloat16", "spills": 0,
             "stack_bytes": 0, "wgmma_serialized": False, "ptxas_notes": [],
             "shared_bytes": 131072, "hmma": 0}


@pytest.mark.parametrize("fault, problem", [
    ({"error": "PassManager::run failed"}, "does not compile (PassManager::run failed)"),
    ({"spills": 16}, "spills"),
    ({"stack_bytes": 8}, "spills"),
    ({"wgmma_serialized": True, "ptxas_notes": [SERIALIZED_LOG.split("\n")[0][16:]]},
     "wgmma serialized: non wgmma instructions defining accumulator registers"),
    ({"shared_bytes": 227 * 1024 + 16}, "shared memory"),
    ({"hmma": 8}, "HMMA"),
])
def test_each_check_fails_its_row_on_hopper(fault, problem):
    assert failures([CLEAN_ROW], ARCHES["sm_90a"]) == []
    (failure,) = failures([CLEAN_ROW, {**CLEAN_ROW, **fault}], ARCHES["sm_90a"])
    assert failure.startswith("linear_forward[m128_n128_16bit] (bfloat16): ")
    assert problem in failure


def test_hmma_fails_only_on_hopper_and_shared_memory_by_the_arch():
    assert failures([{**CLEAN_ROW, "hmma": 8}], ARCHES["sm_80"]) == []
    assert failures([{**CLEAN_ROW, "shared_bytes": 100 * 1024}], ARCHES["sm_80"]) == []
    assert failures([{**CLEAN_ROW, "shared_bytes": 100 * 1024}], ARCHES["sm_89"])


def test_a_report_of_candidates_keeps_the_static_tiles_and_adds_candidates():
    static = all_cases(["relu"])
    tuned = all_cases(["relu"], TileChoice(ARCH_PROFILES["sm_90a"], candidates=True))
    assert [case.launch.name for case in tuned if not case.candidate] == \
        [case.launch.name for case in static]
    assert not tuned[0].candidate and len(tuned) > len(static)


def test_candidates_that_do_not_fit_the_device_are_left_out_but_the_static_tile_stays():
    static = conv_ops.CONV_FORWARD["chan_n128_16bit"]
    candidates = partial(conv_ops.forward_candidates, static, 256, 64 * 56 * 56, False)
    hopper = ARCH_PROFILES["sm_90a"]
    assert TileChoice(hopper).tiles(static, torch.bfloat16, candidates) == [static]
    assert len(TileChoice(hopper, True).tiles(static, torch.bfloat16, candidates)) > 1
    no_shared_memory = dataclasses.replace(hopper, shared_bytes=0)
    assert TileChoice(no_shared_memory, True).tiles(static, torch.bfloat16, candidates) == \
        [static]


def test_the_tma_kernels_are_built_for_hopper_only():
    def kernels(arch: str) -> set[str]:
        return {case.launch.kernel.__name__
                for case in all_cases(["conv2d"], TileChoice(ARCH_PROFILES[arch]))}
    assert kernels("sm_90a") - kernels("sm_80") == {
        "conv2d_forward_tma_kernel", "conv2d_wgrad_tma_kernel", "zero_fill_kernel"}


# ----------------------------------------------------------------------------- compiled

# The matrix-multiply kernels: on tensor cores except for fp32 without TF32 ("ieee").
GEMM_KERNELS = {"conv2d_forward_kernel", "conv2d_forward_tma_kernel", "conv2d_dgrad_kernel",
                "conv2d_wgrad_kernel", "conv2d_wgrad_tma_kernel", "linear_gemm_kernel"}


def compile_report(tmp_path, arch: str, *options: str) -> list[dict]:
    """Run the command (TRITON_INTERPRET off: the tests' process has it on) and return its
    JSON rows; the table and any failed check are printed (pytest -s shows them)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / f"{arch}.json"
    result = subprocess.run([sys.executable, "-m", "fastarch", "compile-report", "--arch",
                             arch, "--json", str(path), *options], env=env,
                            capture_output=True, text=True, timeout=540)
    print(result.stdout)
    assert result.returncode in (0, 1), result.stderr[-4000:]
    return json.loads(path.read_text())


def assert_tensor_cores_used(rows: list[dict], instruction: str) -> None:
    gemms = [row for row in rows if row["kernel"] in GEMM_KERNELS]
    on_tensor_cores = [row for row in gemms if "ieee" not in row["config"]]
    assert on_tensor_cores and len(on_tensor_cores) < len(gemms)
    assert not [row["config"] for row in on_tensor_cores if not row[instruction]]
    # A first-layer forward loops over its R kernel rows (a constexpr; 3 and 5 on the
    # report's layers), which ptxas unrolls: no loop is left to measure. Every other GEMM
    # keeps its main loop.
    unrolled = [row for row in gemms if row["config"].startswith("conv2d_forward[flat_")]
    assert unrolled and all(row["loop_instructions"] is None for row in unrolled)
    assert not [row["config"] for row in gemms
                if row["loop_instructions"] is None and row not in unrolled]


@pytest.mark.slow  # 166 distinct compilations: about 140 s of CPU (2 cores: half that)
def test_every_shipped_config_passes_the_checks_on_hopper(tmp_path):
    rows = compile_report(tmp_path, "sm_90a")
    # The builders choose the same kernels under the interpreter (only tiles differ).
    assert {row["kernel"] for row in rows} == {case.launch.kernel.__name__
                                               for case in all_cases()}
    assert_tensor_cores_used(rows, "hgmma")
    assert failures(rows, ARCHES["sm_90a"]) == []


@pytest.mark.slow  # 94 distinct compilations: about 100 s of CPU
def test_the_tensor_core_families_pass_the_checks_on_ampere(tmp_path):
    """Only the families whose code differs from Hopper's in kind (mma.sync and cp.async
    pipelines instead of wgmma): the memory-bound kernels, checked on Hopper above, would
    add 72 compilations (about 45 s of CPU); ``compile-report --arch sm_80`` has them."""
    rows = compile_report(tmp_path, "sm_80", "--family", "conv2d", "--family", "linear")
    assert_tensor_cores_used(rows, "hmma")
    assert not [row["config"] for row in rows if row["hgmma"]]
    assert failures(rows, ARCHES["sm_80"]) == []
