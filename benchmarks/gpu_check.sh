#!/usr/bin/env bash
# The first (and every) GPU run, in one command, ordered by what its numbers are worth and safe
# to cut at any point: at most 5 minutes on an H100/H200, no network needed.
#
#   bash benchmarks/gpu_check.sh OUT             # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run OUT   # the same stages on the CPU (Triton
#                                                # interpreter, tiny shapes, <= 3 minutes)
#
# Stages, each under a wall-clock cap and stopped with SIGINT (an interrupted pytest session
# still writes its benchmark JSON), the report rewritten after each benchmark stage (the dry
# run's, the same code each time, after its last one or a cut only):
#   1. install (editable; a copy on PYTHONPATH if pip fails)
#   2. benchmarks, PyTorch eager (cuDNN) vs fastarch: VGG16-BN inference first, then the other
#      models, then the layers (benchmarks/cases.py QUICK)
#   2b. every conv layer of VGG16-BN, AlexNet and LeNet-5 in eval: cuDNN, fastarch's pointer
#      kernels and fastarch forced onto the Hopper TMA convolution (FASTARCH_CONV_ALGO=tma),
#      timed side by side (benchmarks/cases.py --convs; the dry run: CONVS_DRY_RUN)
#   3. the same cases as 2 under torch.compile
#   3b. autotuning: the same layers and blocks with fastarch autotuned (each one's first call
#      times its candidates) against the static tables of stage 2; the winners are kept in
#      OUT/autotune/ (every other stage runs the static tables: FASTARCH_AUTOTUNE=off)
#   4. the layer-by-layer profile of VGG16-BN (a row printed as each unit is measured)
#   5. the GPU test subset (tests marked gpu_check: every kernel family once per dtype on the
#      native bf16/fp16 paths, CUDA graphs, convergence), failures named (-rfE); the dry run
#      only collects it, to prove the selection
# SIGINT or SIGTERM to this script stops the running stage the same way, writes the report and
# exits. OUT gets 7 files: check.log (everything printed), bench.json (every stage merged),
# table.md, RESULTS.md (benchmarks/RESULTS.md with this run's section: copy it back),
# roofline.png, profile.txt, tests.log; and on a GPU autotune/ (the tuned winners' cache).
set -uo pipefail

dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
[ $# -eq 1 ] || { echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR" >&2; exit 2; }
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2   # absolute before the cd below
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
scratch=$(mktemp -d)
export PYTHONUNBUFFERED=1
export FASTARCH_AUTOTUNE=off FASTARCH_CACHE_DIR="$out/autotune"
exec > >(tee -i "$out/check.log") 2>&1   # -i: a Ctrl-C to the group must not end the log

if [ $dry_run = 1 ]; then
    budget=${GPU_CHECK_SECONDS:-175}
    bench_cap=55 convs_cap=20 compile_cap=35 tune_cap=20 profile_cap=25 tests_cap=25 case_reserve=8
    bench_flags=(--dry-run --rounds 1)
    profile_args=(lenet5 --batch 2)
    tests_flags=(--collect-only)
else
    budget=${GPU_CHECK_SECONDS:-285}
    bench_cap=100 convs_cap=45 compile_cap=45 tune_cap=35 profile_cap=20 tests_cap=50 case_reserve=20
    bench_flags=(--quick --rounds 15)
    profile_args=(vgg16_bn --batch 64 --reps 10)
    tests_flags=(-n 8 -rfE)
fi
report_reserve=8   # seconds kept back, after every stage, for the report
deadline=$((SECONDS + budget))
interrupted=0 stage_pid="" results=() unreported=0

on_signal() {
    interrupted=1
    if [ -n "$stage_pid" ]; then kill -INT "$stage_pid" 2>/dev/null; fi
}
trap on_signal INT TERM

# capped CAP: CAP, or less where the budget (minus the report's reserve) leaves less.
capped() {
    local left=$((deadline - SECONDS - report_reserve))
    echo $(($1 < left ? $1 : left))
}

# run_stage NAME CAP LOG COMMAND...: run COMMAND for at most CAP seconds (output to LOG, or the
# console for -), stopped with SIGINT (SIGKILL 15 s later if it ignores that); records its status.
run_stage() {
    local name=$1 cap=$2 log=$3 rc
    shift 3
    if [ $interrupted = 1 ] || [ "$cap" -lt 5 ]; then
        echo "== $name: not run ($([ $interrupted = 1 ] && echo interrupted || echo "budget of ${budget} s spent"))"
        results+=("$name=skipped")
        return
    fi
    echo "== $name (at most ${cap} s): $*"
    if [ "$log" = - ]; then
        timeout -s INT -k 15 "$cap" "$@" &
    else
        timeout -s INT -k 15 "$cap" "$@" >"$log" 2>&1 &
    fi
    stage_pid=$!
    wait "$stage_pid"
    rc=$?
    if [ $interrupted = 1 ]; then wait "$stage_pid"; rc=$?; fi   # the trap cut the first wait
    stage_pid=""
    if [ $rc = 124 ]; then echo "== $name: cut at ${cap} s"; fi
    results+=("$name=$rc")
}

# versions: where fastarch is imported from outside the checkout (from /), and the versions;
# fails if it cannot be imported. One interpreter start: each costs seconds.
versions() {
    (cd / && "$python" -c "import torch, triton, numpy, fastarch.kernels
print('fastarch is importable:', fastarch.__file__)
print('torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__,
      '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version())")
}

install() {
    if versions 2>/dev/null; then return; fi
    if ! "$python" -m pip install -q --no-deps --no-build-isolation -e . >"$scratch/pip.log" 2>&1; then
        cat "$scratch/pip.log"
        echo "pip failed: running fastarch from a copy on PYTHONPATH"
        mkdir -p "$scratch/site"
        cp -r fastarch "$scratch/site/fastarch" && cp -r kernels "$scratch/site/fastarch/kernels"
        export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    versions
}

# bench_stage NAME STAGE_JSON CAP CONTENDERS [FLAG...]: one benchmark stage (FLAGs after the
# common ones); its --time-budget starts no case in the last case_reserve seconds, so that
# the session mostly ends by itself.
bench_stage() {
    local cap
    cap=$(capped "$3")
    run_stage "$1" "$cap" - "$python" -m pytest benchmarks/test_benchmarks.py --benchmark-only \
        "${bench_flags[@]}" "${@:5}" --contenders "$4" --time-budget $((cap > case_reserve ? cap - case_reserve : 1)) \
        -v -p no:cacheprovider -p no:xdist --benchmark-json="$2" \
        --benchmark-columns=median,iqr,rounds,iterations
    if [[ ${results[-1]} != *=skipped ]]; then unreported=1; fi
}

# report [last]: the report of the benchmark stages so far, if one ran since the last report;
# the dry run's only at its last stage or after a cut.
report() {
    if [ $unreported = 0 ]; then return; fi
    if [ $dry_run = 1 ] && [ $interrupted = 0 ] && [ "${1:-}" != last ]; then return; fi
    unreported=0
    echo "== report"
    "$python" benchmarks/report.py "$scratch"/bench_*.json --merged "$out/bench.json" \
        --markdown "$out/table.md" --results "$out/RESULTS.md" --png "$out/roofline.png"
    results+=("report=$?")
}

echo "gpu_check $([ $dry_run = 1 ] && echo "--dry-run (CPU, Triton interpreter)" || echo "on the GPU"): $(date -u '+%F %T UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${budget} s"
if [ $dry_run = 0 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
cp benchmarks/RESULTS.md "$out/RESULTS.md"
install

bench_stage "benchmarks eager+fastarch" "$scratch/bench_1_eager_fastarch.json" "$bench_cap" \
    eager,fastarch
report
bench_stage "conv layers: TMA vs pointer vs cuDNN" "$scratch/bench_2_convs.json" "$convs_cap" \
    eager,fastarch,tma --convs
report
bench_stage "benchmarks torch.compile" "$scratch/bench_3_compile.json" "$compile_cap" compile
report
bench_stage "autotune: tuned vs static" "$scratch/bench_4_tuned.json" "$tune_cap" tuned
report last
run_stage profile "$(capped "$profile_cap")" "$out/profile.txt" \
    "$python" -m fastarch profile "${profile_args[@]}"
run_stage tests "$(capped "$tests_cap")" "$out/tests.log" \
    "$python" -m pytest tests --gpu-check -q -p no:cacheprovider "${tests_flags[@]}"
if [ -f "$out/tests.log" ]; then tail -n 15 "$out/tests.log"; fi

echo "== ${results[*]} ($SECONDS s)"
rm -rf "$scratch"
for result in "${results[@]}"; do
    [ "${result#*=}" = 0 ] || exit 1
done
