#!/bin/sh
# Experiment (a): InfoNCE / PRCL binary / PRCL graded for the given seeds (interleaved, so a stopped
# run leaves balanced rows), plus the zero-shot row with --zero-shot. Appends to results/minilm.jsonl;
# `python benchmarks/quality/report.py` then writes the table and the plot.
# Usage: nice -n 10 sh benchmarks/quality/run_all.sh [--zero-shot] SEED...
set -e
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
if [ "$1" = "--zero-shot" ]; then
  shift
  python run_minilm.py --loss zero-shot
fi
for seed in "$@"; do
  for loss in infonce prcl-binary prcl-graded; do
    python run_minilm.py --loss "$loss" --seed "$seed"
  done
done
