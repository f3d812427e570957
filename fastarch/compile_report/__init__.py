"""The compile report: every kernel config a launcher can choose, compiled without a GPU for
Ampere (sm_80), Ada (sm_89) or Hopper (sm_90a), and what the hardware would get from each
launch: registers, spills, shared memory, CTAs per SM, the matrix instructions (HGMMA or
HMMA), TMA loads, whether ptxas serialized the wgmma pipeline, and the instruction count of
the hottest loop. ``python -m fastarch compile-report --arch sm_90a`` (``cli``).

* ``launches``: the cases, built per family on representative layers (``*_launches.py``);
* ``machine_code``: one launch compiled for one arch, its ptxas log and SASS (``sass``);
* ``runner``: every distinct compilation once, in a process pool, one row per launch;
* ``checks``: what fails a row; ``arches``: the targets and their occupancy rules.
"""
from fastarch.compile_report.arches import ARCHES, Arch
from fastarch.compile_report.checks import failures
from fastarch.compile_report.launches import FAMILIES, all_cases, all_launches
from fastarch.compile_report.runner import report

__all__ = ["ARCHES", "Arch", "FAMILIES", "all_cases", "all_launches", "failures", "report"]
