#!/bin/sh
# Run the runs listed in a queue file (one script-and-arguments line each), JOBS at a time, one
# thread each. Usage: JOBS=2 nice -n 10 sh benchmarks/quality/run_queue.sh benchmarks/quality/queues/FILE
set -e
queue=$(realpath "$1")
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
# one line per run, parsed by bash: a quoted argument stays one argument, $'…' writes a newline as \n
# (the lines are this repository's own: they are run as written)
grep -v '^#' "$queue" | grep . |
    xargs -d '\n' -P "${JOBS:-1}" -I ARGS bash -c 'eval "python $1" > /dev/null 2>&1 || printf "failed: %s\n" "$1"' _ ARGS
