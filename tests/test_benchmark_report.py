"""The benchmark report turns pytest-benchmark JSON into the side-by-side table."""
import importlib.util
import pathlib

REPORT = pathlib.Path(__file__).parents[1] / "benchmarks" / "report.py"


def _report_module():
    spec = importlib.util.spec_from_file_location("report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(case, contender, median_s, gbs):
    return {"stats": {"median": median_s},
            "extra_info": {"case": case, "contender": contender, "GB/s": gbs,
                           "gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0",
                           "cudnn": "91900"}}


def test_table_puts_contenders_side_by_side_with_speedup():
    report = _report_module()
    bench = {"datetime": "2026-11-26T12:00:00", "benchmarks": [
        _entry("maxpool forward", "fastarch", 2e-4, 3000.0),
        _entry("maxpool forward", "eager", 8e-4, 750.0),
        _entry("avgpool backward", "eager", 1e-4, 100.0),
    ]}
    summary = report.summarize(bench)
    assert summary["cases"]["maxpool forward"]["speedup_vs_eager"] == 4.0
    assert summary["cases"]["avgpool backward"]["speedup_vs_eager"] is None
    table = report.markdown(summary).splitlines()
    assert table[0].startswith("NVIDIA H200 · torch 2.11.0")
    assert "| maxpool forward | 0.2000 | 3000 GB/s | 0.8000 | 750 GB/s | 4.00× |" in table
    assert "| avgpool backward | — | — | 0.1000 | 100 GB/s | — |" in table
