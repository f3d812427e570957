#!/usr/bin/env bash
# One command for a machine with a GPU (no network needed): the test suite on CUDA, then the
# benchmarks against PyTorch, the table printed last; JSON and logs go to the output folder.
#   bash benchmarks/gpu_check.sh OUT_DIR        (about 3-5 minutes on an H100/H200)
set -uo pipefail
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
    || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

timeout 200 python3 -m pytest tests -q -x -p no:cacheprovider -n 4 >"$out/tests.log" 2>&1
tests_rc=$?
tail -n 15 "$out/tests.log"

timeout 240 python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out/bench.json" >"$out/bench.log" 2>&1
bench_rc=$?
tail -n 5 "$out/bench.log"
python3 benchmarks/report.py "$out/bench.json" --summary "$out/summary.json" \
    --markdown "$out/table.md"
echo "tests rc=$tests_rc benchmarks rc=$bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
