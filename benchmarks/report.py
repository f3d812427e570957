"""Turn pytest-benchmark JSON into a side-by-side table (markdown, printed) and a summary JSON.

    python benchmarks/report.py bench.json [--summary summary.json] [--markdown table.md]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def rows_by_case(bench: dict) -> dict[str, dict[str, dict]]:
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    for entry in bench["benchmarks"]:
        info = entry["extra_info"]
        cases[info["case"]][info["contender"]] = {
            "median_ms": entry["stats"]["median"] * 1e3,
            "GB/s": info.get("GB/s"), "TFLOP/s": info.get("TFLOP/s")}
    return cases


def summarize(bench: dict) -> dict:
    cases = rows_by_case(bench)
    summary = {"machine": bench.get("machine_info", {}).get("node"),
               "datetime": bench.get("datetime"), "environment": {}, "cases": {}}
    if bench["benchmarks"]:
        info = bench["benchmarks"][0]["extra_info"]
        summary["environment"] = {k: info[k] for k in ("gpu", "torch", "triton", "cudnn")
                                  if k in info}
    for case, contenders in cases.items():
        ours, eager = contenders.get("fastarch"), contenders.get("eager")
        speedup = eager["median_ms"] / ours["median_ms"] if ours and eager else None
        summary["cases"][case] = {**{name: c for name, c in contenders.items()},
                                  "speedup_vs_eager": speedup}
    return summary


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [f"{env.get('gpu', '?')} · torch {env.get('torch', '?')} · triton "
             f"{env.get('triton', '?')} · cuDNN {env.get('cudnn', '?')} · {summary['datetime']}",
             "",
             "| case | fastarch ms | rate | eager ms | rate | speedup |",
             "|---|---|---|---|---|---|"]
    for case, row in summary["cases"].items():
        cells = []
        for contender in ("fastarch", "eager"):
            c = row.get(contender)
            if c is None:
                cells += ["—", "—"]
                continue
            rate = (f"{c['GB/s']:.0f} GB/s" if c.get("GB/s")
                    else f"{c['TFLOP/s']:.1f} TFLOP/s" if c.get("TFLOP/s") else "—")
            cells += [f"{c['median_ms']:.4f}", rate]
        speedup = row["speedup_vs_eager"]
        speedup_cell = f"{speedup:.2f}×" if speedup else "—"
        lines.append(f"| {case} | {' | '.join(cells)} | {speedup_cell} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json")
    parser.add_argument("--summary", help="write the summary JSON here")
    parser.add_argument("--markdown", help="write the markdown table here")
    args = parser.parse_args()
    with open(args.bench_json) as f:
        summary = summarize(json.load(f))
    table = markdown(summary)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
