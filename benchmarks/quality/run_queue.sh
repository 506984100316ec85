#!/bin/sh
# Run the runs listed in a queue file (one script-and-arguments line each), JOBS at a time, one
# thread each. Usage: JOBS=2 nice -n 10 sh benchmarks/quality/run_queue.sh benchmarks/quality/queues/FILE
set -e
queue=$(realpath "$1")
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
grep -v '^#' "$queue" | grep . | xargs -P "${JOBS:-1}" -I ARGS sh -c 'python ARGS > /dev/null 2>&1 || echo "failed: ARGS"'
