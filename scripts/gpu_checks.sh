#!/usr/bin/env bash
# Everything still owed on a GPU, in one command (benchmarks/RESULTS.md): the `cuda`-marked
# tests, the kernels' self-checks, the pytest-benchmark suites, and — with `train` as first
# argument — the bf16_baseline vs e5m2_fp8 runs with their report. Writes logs and JSON to $OUT.
#
#   scripts/gpu_checks.sh            # tests + self-checks + benchmarks (≈ 5–8 min on an H100)
#   scripts/gpu_checks.sh train      # the two full training runs + report (needs data bins)
#
# Works offline: altgrad is installed editable with --no-index (setuptools must be present).
# The oracle tests import gfloat, which the lent GPU machine lacks: carry it as wheels, made here
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: -d .whl gfloat==0.5.2 more-itertools array-api-compat
# and name `.whl` in the device call's carry list; this script installs .whl/*.whl when present.
# `train` needs data/shakespeare_char/{train,val}.bin and meta.pkl (carry them, they are ignored).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || { echo "error: could not install altgrad editable (needs setuptools)" >&2; exit 1; }
$PY - <<'EOF' | tee "$OUT/versions.txt"
import platform, torch, triton
print(f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__} "
      f"cuda {torch.version.cuda} device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF

if [ "${1:-}" = train ]; then
  for cfg in bf16_baseline e5m2_fp8; do
    $PY train.py "configs/$cfg.yaml" --log.wandb_mode=disabled 2>&1 | tee "$OUT/train_$cfg.log"
  done
  $PY -m altgrad.report out/bf16_baseline out/e5m2_fp8 --out "$OUT/report" | tee "$OUT/report.txt"
  exit 0
fi

status=0
$PY kernels/quantize.py 2>&1 | tee "$OUT/kernel_quantize.txt" || status=1
$PY kernels/scaled_matmul.py 2>&1 | tee "$OUT/kernel_scaled_matmul.txt" || status=1
# the files with GPU-aware tests (kernels run on CUDA tensors there; `cuda`-marked ones un-skip)
$PY -m pytest -q tests/test_kernels_quantize.py tests/test_kernels_matmul.py tests/test_linear.py \
  tests/test_model.py tests/test_data.py tests/test_reproducibility.py 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
$PY -m pytest -q benchmarks/ --benchmark-only --benchmark-columns=min,median,mean \
  --benchmark-json="$OUT/benchmarks.json" 2>&1 | tee "$OUT/benchmarks.txt" || status=1
exit $status
