#!/usr/bin/env bash
# One command for a machine with a GPU (no network needed), at most 5 minutes on an H100/H200:
# the test suite on CUDA, the --quick benchmarks (fastarch vs cuDNN eager vs torch.compile),
# a layer-by-layer profile of VGG16-BN, and the summary table printed last.
#   bash benchmarks/gpu_check.sh OUT_DIR
# OUT_DIR gets 8 files: tests.log bench.log bench.json profile.txt trace.json table.md
# roofline.png and RESULTS.md (benchmarks/RESULTS.md with this run's section: copy it back).
# Each stage has a wall-clock cap; the benchmarks also skip what is left after --time-budget so
# that their JSON is always written.
set -uo pipefail
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/fastarch_install.log 2>&1 \
    || { cat /tmp/fastarch_install.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    | tee "$out/tests.log"

timeout 90 python3 -m pytest tests -q -p no:cacheprovider -n 12 >>"$out/tests.log" 2>&1
tests_rc=$?
tail -n 12 "$out/tests.log"

timeout 165 python3 -m pytest benchmarks --benchmark-only --quick --time-budget 140 --rounds 15 \
    -q -p no:cacheprovider -p no:xdist --benchmark-json="$out/bench.json" \
    --benchmark-columns=median,iqr,rounds,iterations >"$out/bench.log" 2>&1
bench_rc=$?
tail -n 4 "$out/bench.log"

timeout 35 python3 -m fastarch profile vgg16_bn --batch 64 --reps 10 \
    --trace "$out/trace.json" >"$out/profile.txt" 2>&1
profile_rc=$?
cat "$out/profile.txt"

cp benchmarks/RESULTS.md "$out/RESULTS.md"
echo
python3 benchmarks/report.py "$out/bench.json" --markdown "$out/table.md" \
    --results "$out/RESULTS.md" --png "$out/roofline.png"
report_rc=$?
echo "tests rc=$tests_rc benchmarks rc=$bench_rc profile rc=$profile_rc report rc=$report_rc"
[ "$tests_rc$bench_rc$profile_rc$report_rc" = 0000 ]
