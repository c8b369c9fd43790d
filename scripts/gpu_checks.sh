#!/usr/bin/env bash
# Every owed GPU measurement in one run of <= 8 minutes on a bare H200 (torch 2.11, triton 3.6, empty
# Triton cache, no package registry). Steps run in priority order, each under `timeout` with its own
# budget, and write their results to $OUT as they finish, so a run cut off early still returns what
# it measured:
#   1. tests      CUDA correctness: the GPU-aware test files, representative formats (E4M3, E5M2,
#                 E7M0, E0M7; every format stays covered by the interpreter in CI), one fixed tile
#                 per shape (the kernels' default)
#   2. linear     QuantizedLinear fwd+bwd vs bf16 nn.Linear vs compiled torch fake-quant
#                 (benchmarks/test_bench_linear.py)
#   3. kernels    quantize bandwidth; Triton matmul vs cuBLAS per shape (benchmarks/test_bench_kernels.py)
#   4. sweep      the full-size experiment: BF16 baseline and every 8-bit format, run together
#                 (scripts/full_size_sweep.sh: altgrad.sweep --jobs 9), with its report; cut off at
#                 the budget, the sweep stops its runs cleanly and reports the steps they reached
# Outputs (8 files at most, the device tool's limit): summary.txt, tests.txt, linear.txt,
# linear.json, kernels.txt, kernels.json, sweep.txt, sweep.tar.gz.
#
#   scripts/gpu_checks.sh             # all steps
#   scripts/gpu_checks.sh --dry-run   # list steps, budgets, carry list and commands; run nothing
#   scripts/gpu_checks.sh tests linear   # only these steps
#
# Prepare, here (once per checkout; both paths are git-ignored):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     gfloat==0.5.2 more-itertools==11.2.1 array-api-compat==1.16.0 pytest-benchmark==5.3.1
# (pure-Python wheels, ~230 KB; the image has pytest and py-cpuinfo, which pytest-benchmark imports)
#   python data/shakespeare_complete_char/prepare.py        # data/shakespeare_complete_char/{train,val}.bin, meta.pkl
# The device call (carry list and command line, exactly):
#   run(command="bash scripts/gpu_checks.sh", timeout_s=540,
#       carry=[".whl", "data/shakespeare_complete_char/train.bin", "data/shakespeare_complete_char/val.bin",
#              "data/shakespeare_complete_char/meta.pkl"])
set -uo pipefail
cd "$(dirname "$0")/.."

CARRY=(.whl data/shakespeare_complete_char/train.bin data/shakespeare_complete_char/val.bin data/shakespeare_complete_char/meta.pkl)
TOTAL_BUDGET=480  # seconds for the whole script, setup included
STEPS=(tests linear kernels sweep)
declare -A BUDGET=([setup]=30 [tests]=120 [linear]=100 [kernels]=80 [sweep]=150)
declare -A WHAT=(
  [tests]="CUDA correctness tests (representative formats, fixed tiles)"
  [linear]="QuantizedLinear fwd+bwd vs bf16 nn.Linear vs compiled fake-quant"
  [kernels]="quantize bandwidth; Triton matmul vs cuBLAS per shape"
  [sweep]="full-size BF16 + 8-bit format sweep with report"
)
# formats that stay in the CUDA test run; every other format's parametrisations are deselected
GPU_TEST_FORMATS="E4M3 E5M2 E7M0 E0M7"
GPU_TEST_DESELECT="E3M4 or E2M5 or E1M6 or E6M1 or FNUZ or E4M3_IEEE or E5M2_FN or P3109 or E2M1 or E2M3 or E3M2 or E7M0_NONE"
GPU_TEST_FILES="tests/test_kernels_quantize.py tests/test_kernels_matmul.py tests/test_kernels_block_matmul.py \
tests/test_linear.py tests/test_quantize.py tests/test_model.py tests/test_data.py tests/test_reproducibility.py"
# extra sweep arguments, e.g. SWEEP_ARGS="--train.max_steps=500" (the LR schedule follows)
SWEEP_ARGS=${SWEEP_ARGS:-}
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_checks}
WORK=${WORK:-/tmp/altgrad_gpu_checks}
BENCH_ARGS="-s --benchmark-only --benchmark-columns=min,median,mean,rounds"  # -s: RESULT lines as measured

cmd_for() {
  case $1 in
    tests) echo "$PY -m pytest -q -p no:cacheprovider $GPU_TEST_FILES -k 'not ($GPU_TEST_DESELECT)' \$XDIST" ;;
    linear) echo "$PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_linear.py $BENCH_ARGS --benchmark-json=$OUT/linear.json" ;;
    kernels) echo "$PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_kernels.py $BENCH_ARGS --benchmark-json=$OUT/kernels.json" ;;
    sweep) echo "PYTHON=$PY OUT=$WORK/sweep JOBS=9 bash scripts/full_size_sweep.sh $SWEEP_ARGS" ;;
  esac
}

if [ "${1:-}" = --dry-run ]; then
  sum=${BUDGET[setup]}
  echo "scripts/gpu_checks.sh: total budget ${TOTAL_BUDGET} s (a bare H200, empty Triton cache)"
  echo "carry: ${CARRY[*]}"
  echo "run: bash scripts/gpu_checks.sh   (timeout_s=540)"
  printf '%-2s %-8s %6s  %s\n' "#" step budget what
  printf '%-2s %-8s %5ss  %s\n' 0 setup "${BUDGET[setup]}" "install carried wheels and altgrad (editable, offline); versions"
  i=1
  for s in "${STEPS[@]}"; do
    printf '%-2s %-8s %5ss  %s\n' $i "$s" "${BUDGET[$s]}" "${WHAT[$s]}"
    printf '            $ %s\n' "$(cmd_for "$s")"
    sum=$((sum + ${BUDGET[$s]})); i=$((i + 1))
  done
  echo "sum of budgets: ${sum} s"
  exit 0
fi

SELECTED=("$@")
[ ${#SELECTED[@]} -eq 0 ] && SELECTED=("${STEPS[@]}")
for s in "${SELECTED[@]}"; do
  [[ " ${STEPS[*]} " == *" $s "* ]] || { echo "unknown step '$s' (steps: ${STEPS[*]}, or --dry-run)" >&2; exit 2; }
done

START=$(date +%s)
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
log() { echo "$*" | tee -a "$SUMMARY"; }

# -- 0. setup -------------------------------------------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    || log "warning: could not install the carried wheels (.whl)"
else
  log "warning: no .whl/ carried: the oracle tests that import gfloat will fail"
fi
if ! $PY -c 'import altgrad.kernels.quantize' 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -5 | tee -a "$SUMMARY"
fi
$PY - <<'EOF' | tee -a "$SUMMARY"
import platform, torch, triton
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__} "
      f"cuda {torch.version.cuda} device {dev}")
EOF
date -u +"date %Y-%m-%dT%H:%M:%SZ" | tee -a "$SUMMARY"

XDIST=""
$PY -c 'import xdist' 2>/dev/null && XDIST="-n 8"  # compile the test kernels on 8 cores at once

status=0
for s in "${STEPS[@]}"; do
  [[ " ${SELECTED[*]} " == *" $s "* ]] || continue
  left=$((TOTAL_BUDGET - ($(date +%s) - START)))
  budget=${BUDGET[$s]}
  grace=10; sig=INT
  [ "$s" = sweep ] && { grace=40; sig=TERM; budget=$((left - grace)); }  # the last step takes what is left
  [ "$budget" -gt "$((left - grace))" ] && budget=$((left - grace))
  if [ "$budget" -lt 10 ]; then
    log "step $s: skipped (${left} s left of ${TOTAL_BUDGET} s)"; status=1; continue
  fi
  cmd=$(cmd_for "$s"); cmd=${cmd//\$XDIST/$XDIST}
  log "step $s: budget ${budget} s: $cmd"
  t0=$(date +%s)
  # pytest gets SIGINT: it stops as on Ctrl-C and still writes its summary and benchmark JSON; the
  # sweep gets SIGTERM, forwards it to its runs (they checkpoint and exit) and reports what they reached
  timeout --signal=$sig --kill-after=$((grace - 5)) "$budget" bash -c "$cmd" > "$OUT/$s.txt" 2>&1
  rc=$?
  if [ "$s" = sweep ]; then  # the run directories' metrics and report, in one file
    tar -czf "$OUT/sweep.tar.gz" -C "$WORK" --exclude='*.pt' sweep 2>/dev/null
  fi
  tail -n 3 "$OUT/$s.txt" | sed "s/^/    /" | tee -a "$SUMMARY"
  case $rc in
    0) log "step $s: ok in $(($(date +%s) - t0)) s" ;;
    124|130|137) log "step $s: TIMED OUT after ${budget} s (partial results kept)"; status=1 ;;
    *) log "step $s: FAILED (exit $rc) in $(($(date +%s) - t0)) s"; status=1 ;;
  esac
done
log "total $(($(date +%s) - START)) s of ${TOTAL_BUDGET} s"
exit $status
