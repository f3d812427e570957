"""``benchmarks/gpu_check.sh --dry-run``: the GPU check's stages on the CPU (Triton interpreter,
tiny shapes), so that a lent GPU's minutes never go to a script bug. It must finish, write
its seven files (a RESULTS.md section marked as a CPU dry run among them), and, cut by SIGINT
in the middle of its benchmark stage, still leave the report of what had finished."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FILES = {"check.log", "bench.json", "table.md", "RESULTS.md", "roofline.png", "profile.txt",
         "tests.log"}
REPORT_FILES = ("bench.json", "table.md", "RESULTS.md", "roofline.png")
HEADLINE = "vgg16_bn"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the dry run stands in for a GPU: with one, run benchmarks/gpu_check.sh itself")]


def _start(out: Path) -> subprocess.Popen:
    # As from a shell: no test-run settings (pytest-benchmark turns itself off for an xdist
    # worker, which it recognises by PYTEST_XDIST_WORKER).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")
           and k not in ("FASTARCH_POISON_OUTPUTS", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    return subprocess.Popen(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _benchmarks(out: Path) -> dict[tuple[str, str], set[str]]:
    """(case, mode) -> the contenders bench.json holds."""
    found: dict[tuple[str, str], set[str]] = {}
    for entry in json.loads((out / "bench.json").read_text())["benchmarks"]:
        info = entry["extra_info"]
        found.setdefault((info["case"], info["mode"]), set()).add(info["contender"])
    return found


def _assert_report_of(out: Path, cases: dict) -> None:
    assert (out / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = (out / "RESULTS.md").read_text()
    assert "## CPU dry run (Triton interpreter) bfloat16 dry-run" in results
    assert results.startswith("# Benchmark results")  # benchmarks/RESULTS.md, updated
    table = (out / "table.md").read_text()
    for case, mode in cases:
        assert f"| {case} | {mode} |" in table
        assert f"| {case} | {mode} |" in results


def test_dry_run_runs_every_stage_and_writes_the_report(tmp_path):
    run = _start(tmp_path)
    log, _ = run.communicate(timeout=300)
    assert run.returncode == 0, log
    assert {path.name for path in tmp_path.iterdir()} == FILES
    cases = _benchmarks(tmp_path)
    assert next(iter(cases)) == (HEADLINE, "eval")  # the headline comes first
    assert cases[HEADLINE, "eval"] == {"eager", "compile", "fastarch"}
    assert any("tuned" in contenders for contenders in cases.values())  # the autotune stage
    assert cases["vgg16_bn.conv11", "eval"] == {"eager", "fastarch", "tma"}  # the conv stage
    _assert_report_of(tmp_path, cases)
    assert "whole model forward" in (tmp_path / "profile.txt").read_text()
    tests = (tmp_path / "tests.log").read_text()
    assert "tests/test_cuda_graphs.py::test_training_step_replays_equal_to_eager" in tests
    assert "deselected" in tests
    last_line = (tmp_path / "check.log").read_text().rstrip().splitlines()[-1]
    assert "profile=0 tests=0" in last_line, last_line


def test_sigint_in_the_benchmark_stage_keeps_what_finished(tmp_path):
    """Cut as soon as the first case (the headline under eager) is timed: it is kept, the
    fastarch case being timed then is dropped or kept whole, nothing after it ran."""
    run = _start(tmp_path)
    finished = f"test_case[{HEADLINE}-eval-eager] PASSED"
    deadline = time.monotonic() + 200
    log = tmp_path / "check.log"
    while not (log.exists() and finished in log.read_text()):
        assert run.poll() is None and time.monotonic() < deadline, "the headline never finished"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGINT)  # what a Ctrl-C sends: the whole process group
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0, output
    assert "benchmarks torch.compile: not run (interrupted)" in output
    assert set(REPORT_FILES) <= {path.name for path in tmp_path.iterdir()}
    cases = _benchmarks(tmp_path)
    assert list(cases) == [(HEADLINE, "eval")], cases
    assert "eager" in cases[HEADLINE, "eval"] <= {"eager", "fastarch"}
    _assert_report_of(tmp_path, [(HEADLINE, "eval")])
