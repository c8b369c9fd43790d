#!/usr/bin/env bash
# The original experiment at full size, in one command: nanoGPT's char-level Shakespeare model
# (6 layers, 6 heads, 384 wide, block 256, batch 12, 2000 steps; configs/*.yaml) for the BF16
# baseline and every 8-bit format, all at once (--jobs 9: one GPU holds nine such runs), then
# the report (out/full_size/report/report.md). Seed 42 for every run: same init, same batches.
#
#   scripts/full_size_sweep.sh [--section.key=value ...] [sweep options]
#   PYTHON=.venv/bin/python OUT=out/full_size JOBS=9 scripts/full_size_sweep.sh
#   scripts/full_size_sweep.sh --train.max_steps=500 --seeds 42 43   # shorter (the LR schedule follows), 2 seeds
#
# Needs data/shakespeare_complete_char/{train,val}.bin and meta.pkl (python data/shakespeare_complete_char/prepare.py).
# W&B is off here (the configs say offline); pass --log.wandb_mode=offline to keep W&B files.
# Exit codes as altgrad.sweep: 0 all done, 1 a run failed, 2 bad input (nothing ran), 130 Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-out/full_size}
JOBS=${JOBS:-9}
CONFIGS=(baseline e5m2_fp8 e4m3_e5m2_hybrid e3m4 e2m5 e1m6 e6m1 e7m0 e0m7)
exec "$PYTHON" -m altgrad.sweep $(printf "configs/%s.yaml " "${CONFIGS[@]}") --jobs "$JOBS" --out-root "$OUT" \
  --log.wandb_mode=disabled "$@"
