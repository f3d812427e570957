"""Every config a launcher can choose compiles for Hopper (sm_90a) without a GPU: no register
spills, and the matrix instructions are Hopper's HGMMA, never the older HMMA. Run with -s to
see the register report."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # ptxas over every config: about a minute


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fastarch.sm90", "--json"], env=env,
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    for row in rows:
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    return rows


def test_every_kernel_family_is_compiled(reports):
    from fastarch.sm90 import FAMILY_LAUNCHES
    names = {row["name"].split("[")[0] for row in reports}
    assert len(reports) >= 2 * len(FAMILY_LAUNCHES)
    assert {"max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward",
            "avg_pool2d_backward", "adaptive_avg_pool2d_forward",
            "adaptive_avg_pool2d_backward"} <= names


def test_no_register_spills(reports):
    spilled = [row["name"] for row in reports
               if row["stack_bytes"] or row["spill_loads"] or row["spill_stores"]]
    assert not spilled, f"register spills in {spilled}"


def test_no_pre_hopper_mma(reports):
    assert not [row["name"] for row in reports if row["hmma"]]
