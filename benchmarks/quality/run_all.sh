#!/bin/sh
# Experiment (a): InfoNCE / PRCL binary / PRCL graded for the given seeds, JOBS runs at a time (one
# thread each), plus the zero-shot row with --zero-shot. Each run appends one line to
# results/minilm.jsonl; `python benchmarks/quality/report.py` then writes the table and the plot.
# Usage: JOBS=3 nice -n 10 sh benchmarks/quality/run_all.sh [--zero-shot] SEED...
set -e
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
if [ "$1" = "--zero-shot" ]; then
  shift
  python run_minilm.py --loss zero-shot
fi
for seed in "$@"; do
  for loss in infonce prcl-binary prcl-graded; do
    echo "$loss $seed"
  done
done | xargs -P "${JOBS:-1}" -L 1 sh -c 'python run_minilm.py --loss "$0" --seed "$1"'
