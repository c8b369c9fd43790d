#!/usr/bin/env bash
# The main job on a CPU (README quick start): prepare the default corpus if it is missing, train
# the high-precision baseline and E5M2 with configs/cpu_quick.yaml (same seed: same init, same
# batches), then print the comparison. About 4 minutes on 2 idle cores.
#
#   scripts/quickstart.sh [--section.key=value ...]     extra overrides go to both runs
#   PYTHON=.venv/bin/python OUT=out/quickstart DATA=data/shakespeare_complete_char scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-out/quickstart}
DATA=${DATA:-data/shakespeare_complete_char}

if [ ! -f "$DATA/train.bin" ] || [ ! -f "$DATA/val.bin" ] || [ ! -f "$DATA/meta.pkl" ]; then
  echo "== preparing $DATA (once)"
  "$PYTHON" data/shakespeare_complete_char/prepare.py --out "$DATA"
fi

run() {  # exit code 3 = diverged: a result for the report, not a failure of the script
  "$PYTHON" train.py configs/cpu_quick.yaml --data.dir="$DATA" --log.out_dir="$OUT" "$@" || [ $? -eq 3 ]
}
echo "== 1/2 baseline, high precision (fp32 on a CPU): $OUT/baseline"
run --log.run_name=baseline "$@"
echo "== 2/2 E5M2 for every matmul operand: $OUT/e5m2"
run --log.run_name=e5m2 --quant.default_format=E5M2 "$@"

echo "== comparison"
"$PYTHON" -m altgrad.report "$OUT/baseline" "$OUT/e5m2" --out "$OUT/report"
