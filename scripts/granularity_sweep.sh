#!/usr/bin/env bash
# Tensor vs row vs block-32 scaling for the narrow formats, laptop scale (docs/results/granularity_sweep):
# E4M3, E3M4, E2M5, E1M6 and E0M7 on every matmul operand of the cpu_quick model, each with
#   tensor   one scale per tensor, current (the tensor's own amax; fp32 scale = max / amax)
#   row      one E8M0 (power-of-two) scale per row of each GEMM's K, exponent rounded down (OCP MX rule)
#   block32  one E8M0 scale per 32 elements of each GEMM's K, rounded down (OCP MX v1.0)
# all three current, so only the granularity differs; plus the fp32 baseline; seeds 42 43 44 each.
# The small configs are written to $OUT/configs and layered over configs/cpu_quick.yaml.
#
#   scripts/granularity_sweep.sh [sweep options, e.g. --seeds 42 --train.max_steps=100]
#   PYTHON=.venv/bin/python OUT=out/granularity JOBS=2 scripts/granularity_sweep.sh
#
# Needs data/shakespeare_complete_char (python data/shakespeare_complete_char/prepare.py).
# About 50 min with JOBS=2 on 2 cores (48 runs). Exit codes as altgrad.sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-out/granularity}
JOBS=${JOBS:-2}
mkdir -p "$OUT/configs"
configs=(configs/baseline.yaml)
for fmt in E4M3 E3M4 E2M5 E1M6 E0M7; do
  for gran in tensor row block; do
    name="$(echo "$fmt" | tr 'A-Z' 'a-z')_${gran/block/block32}"
    printf 'quant:\n  default_format: %s\n  scaling: current\n  granularity: %s\nlog:\n  tags: [granularity, %s]\n' \
      "$fmt" "$gran" "${gran/block/block32}" > "$OUT/configs/$name.yaml"
    configs+=("$OUT/configs/$name.yaml")
  done
done
exec "$PYTHON" -m altgrad.sweep --base configs/cpu_quick.yaml "${configs[@]}" --seeds 42 43 44 --jobs "$JOBS" \
  --out-root "$OUT" "$@"
