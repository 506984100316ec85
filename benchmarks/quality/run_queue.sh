#!/bin/sh
# Run the runs listed in a queue file (one script-and-arguments line each), JOBS at a time, one
# thread each. Usage: JOBS=2 nice -n 10 sh benchmarks/quality/run_queue.sh benchmarks/quality/queues/FILE
set -e
queue=$(realpath "$1")
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
# one line per run, parsed by the shell (quoted arguments such as an --instruction stay one argument)
grep -v '^#' "$queue" | grep . | xargs -d '\n' -P "${JOBS:-1}" -I ARGS sh -c 'eval "python $1" > /dev/null 2>&1 || echo "failed: $1"' _ ARGS
