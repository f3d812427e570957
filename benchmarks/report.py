"""Turn pytest-benchmark JSON into the results: a markdown table (fastarch static, autotuned
and TMA, eager and compile side by side, printed), a section of benchmarks/RESULTS.md, and a
roofline-style PNG.

    python benchmarks/report.py STAGE.json [STAGE.json ...] [--merged bench.json]
                                [--markdown table.md] [--results RESULTS.md] [--png roofline.png]

Several JSON files (gpu_check.sh's stages) merge into one run, a contender timed again in a
later stage keeping its last time; files a stage never wrote (it was cut before its session
ended) are passed over. A wall time whose kernels took under ``LAUNCH_BOUND`` of it shows the
device time beside it.

A RESULTS.md section is keyed by card, dtype and subset: a new run of the same replaces it,
other sections stay. The PNG plots every case's achieved rate against the card's ceilings
(``fastarch.roofline.CEILINGS``): conv / linear / blocks / models in TFLOP/s over arithmetic
intensity under the roofline, BatchNorm and pools in GB/s under the copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from fastarch.kernels.tensor_cores import Operand
from fastarch.roofline import Ceilings, ceilings_for

CONTENDERS = ("fastarch", "tuned", "tma", "eager", "compile")
LAUNCH_BOUND = 0.8  # device time / wall time below this: the host's launches dominate
ENVIRONMENT = ("gpu", "torch", "triton", "cudnn", "cuda", "dtype", "tf32", "subset")


def summarize(bench: dict) -> dict:
    """The run's environment and one row per (case, mode) with every contender's median."""
    rows: dict[tuple[str, str], dict] = {}
    environment: dict = {}
    for entry in bench["benchmarks"]:
        info = entry["extra_info"]
        environment = environment or {k: info[k] for k in ENVIRONMENT if k in info}
        row = rows.setdefault((info["case"], info["mode"]), {
            "case": info["case"], "mode": info["mode"], "kind": info.get("kind", ""),
            "describe": info.get("describe", ""), "flops": info.get("flops", 0),
            "bytes": info.get("bytes", 0), "contenders": {}})
        metric = "TFLOP/s" if row["flops"] else "GB/s"
        device_s = info.get("device_seconds")
        row["contenders"][info["contender"]] = {
            "median_ms": entry["stats"]["median"] * 1e3, "rate": info.get(metric),
            "device_ms": None if device_s is None else device_s * 1e3}
    for row in rows.values():
        times = {c: v["median_ms"] for c, v in row["contenders"].items()}
        for rival in ("eager", "compile"):
            row[f"speedup_vs_{rival}"] = (times[rival] / times["fastarch"]
                                          if "fastarch" in times and rival in times else None)
        row["tuned_vs_static"] = (times["fastarch"] / times["tuned"]
                                  if "fastarch" in times and "tuned" in times else None)
        row["tma_vs_eager"] = (times["eager"] / times["tma"]
                               if "tma" in times and "eager" in times else None)
    commit = bench.get("commit_info", {}).get("id") or ""
    return {"datetime": bench.get("datetime", ""), "commit": commit[:10],
            "environment": environment, "rows": list(rows.values())}


def operand(environment: dict) -> Operand:
    """The operand kind the run's dtype and TF32 switch made its GEMMs."""
    dtype = getattr(torch, environment.get("dtype", "bfloat16"))
    return Operand.of(dtype, bool(environment.get("tf32")))


def roof_fraction(row: dict, ceilings: Optional[Ceilings], kind: Operand) -> Optional[float]:
    """fastarch's rate as a fraction of the ceiling its metric meets on this card."""
    ours = row["contenders"].get("fastarch")
    if ceilings is None or ours is None or ours["rate"] is None:
        return None
    peak = ceilings.matmul_tflops.get(kind) if row["flops"] else ceilings.copy_gbs
    return ours["rate"] / peak if peak else None


def _cell(contender: Optional[dict], metric: str) -> str:
    if contender is None:
        return "—"
    rate = contender["rate"]
    rate_text = "" if rate is None else f" · {rate:.0f} {metric}" if rate >= 10 \
        else f" · {rate:.3g} {metric}"
    wall, device = contender["median_ms"], contender.get("device_ms")
    device_text = f" (device {device:.4g} ms)" if device is not None \
        and device < LAUNCH_BOUND * wall else ""
    return f"{wall:.4g} ms{device_text}{rate_text}"


def _ratio(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}×"


def header(summary: dict) -> str:
    env = summary["environment"]
    precision = env.get("dtype", "?") + (" (TF32)" if env.get("dtype") == "float32"
                                          and env.get("tf32") else "")
    return (f"{env.get('gpu', '?')} · {precision} · channels_last · {summary['datetime'][:16]} · "
            f"torch {env.get('torch', '?')} · Triton {env.get('triton', '?')} · "
            f"cuDNN {env.get('cudnn', '?')} · CUDA {env.get('cuda', '?')} · "
            f"commit {summary['commit'] or '?'} · {env.get('subset', '?')} run")


def markdown(summary: dict) -> str:
    ceilings = ceilings_for(summary["environment"].get("gpu", ""))
    kind = operand(summary["environment"])
    lines = [header(summary), "",
             "| case | mode | what | fastarch | fastarch autotuned | fastarch TMA | "
             "eager (cuDNN) | torch.compile | fastarch % of roof | vs eager | vs compile | "
             "tuned vs static | TMA vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        metric = "TFLOP/s" if row["flops"] else "GB/s"
        cells = [_cell(row["contenders"].get(c), metric) for c in CONTENDERS]
        fraction = roof_fraction(row, ceilings, kind)
        lines.append(f"| {row['case']} | {row['mode']} | {row['describe']} | "
                     f"{' | '.join(cells)} | "
                     f"{'—' if fraction is None else f'{fraction:.0%}'} | "
                     f"{_ratio(row['speedup_vs_eager'])} | {_ratio(row['speedup_vs_compile'])} | "
                     f"{_ratio(row['tuned_vs_static'])} | {_ratio(row['tma_vs_eager'])} |")
    return "\n".join(lines)


def section_key(summary: dict) -> str:
    env = summary["environment"]
    return f"{env.get('gpu', '?')} {env.get('dtype', '?')} {env.get('subset', '?')}"


def update_results(path: Path, summary: dict, table: str) -> None:
    """Replace this card/dtype/subset's section of RESULTS.md, or append it."""
    key = section_key(summary)
    begin, end = f"<!-- results: {key} -->", "<!-- /results -->"
    section = f"{begin}\n## {key}\n\n{table}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text + ("" if text.endswith("\n") else "\n"))


def roofline_png(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceilings = ceilings_for(summary["environment"].get("gpu", ""))
    kind = operand(summary["environment"])
    compute = [r for r in summary["rows"] if r["flops"]]
    memory = [r for r in summary["rows"] if not r["flops"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5),
                                         gridspec_kw={"width_ratios": [1, 1.3]})
    colours = {"fastarch": "tab:red", "tuned": "tab:orange", "tma": "tab:purple",
               "eager": "tab:blue", "compile": "tab:green"}
    intensities = [r["flops"] / r["bytes"] for r in compute if r["bytes"]]
    if ceilings is not None and ceilings.matmul_tflops.get(kind) and intensities:
        peak, bandwidth = ceilings.matmul_tflops[kind], ceilings.copy_gbs / 1e3  # TB/s
        xs = [min(intensities) / 2, peak / bandwidth, max(intensities) * 2]
        left.plot(xs, [min(peak, bandwidth * x) for x in xs], "k-", lw=1.5,
                  label=f"{ceilings.card} roof: {peak:g} TFLOP/s ({kind.value}), "
                        f"{ceilings.copy_gbs:g} GB/s")
    for contender in CONTENDERS:
        points = [(r["flops"] / r["bytes"], r["contenders"][contender]["rate"]) for r in compute
                  if contender in r["contenders"] and r["bytes"]]
        if points:
            left.scatter(*zip(*points), s=22, c=colours[contender], label=contender, alpha=0.8)
        bars = [(i, r["contenders"][contender]["rate"]) for i, r in enumerate(memory)
                if contender in r["contenders"]]
        if bars:
            right.scatter(*zip(*bars), s=22, c=colours[contender], label=contender, alpha=0.8)
    left.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte, minimum bytes)",
             ylabel="achieved TFLOP/s", title="conv, linear, blocks, models")
    if ceilings is not None:
        right.axhline(ceilings.copy_gbs, color="k", lw=1.5,
                      label=f"{ceilings.card} copy {ceilings.copy_gbs:g} GB/s")
    right.set_xticks(range(len(memory)), [f"{r['case']} {r['mode']}" for r in memory],
                     rotation=75, ha="right", fontsize=7)
    right.set(ylabel="achieved GB/s (bytes read + written once)", title="BatchNorm, pools")
    right.set_ylim(bottom=0)
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(header(summary), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def merge(paths: list[Path]) -> Optional[dict]:
    """One pytest-benchmark document holding the benchmarks of every file that exists (the
    first file's machine and commit info); None when none does."""
    documents = [json.loads(path.read_text()) for path in paths if path.exists()]
    if not documents:
        return None
    merged = dict(documents[0])
    merged["benchmarks"] = [entry for document in documents for entry in document["benchmarks"]]
    return merged


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", nargs="+", type=Path)
    parser.add_argument("--merged", type=Path, help="write the merged JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--results", type=Path, help="update this RESULTS.md")
    parser.add_argument("--png", type=Path, help="write the roofline plot here")
    args = parser.parse_args(argv)
    bench = merge(args.bench_json)
    if bench is None or not bench["benchmarks"]:  # pytest-benchmark writes none when cut hard
        print(f"{', '.join(map(str, args.bench_json))}: no benchmark results (none ran, all "
              "skipped, or every stage was killed before its session ended)", file=sys.stderr)
        return 1
    if args.merged:
        args.merged.write_text(json.dumps(bench, indent=1) + "\n")
    summary = summarize(bench)
    table = markdown(summary)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.results:
        update_results(args.results, summary, table)
    if args.png:
        roofline_png(summary, args.png)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
