#!/usr/bin/env bash
# Runs the train-step benchmark for a list of configurations, one process each (so the
# allocator's peak memory is per configuration), and prints the table. On the device machine:
#   bash openmoe_jax/bench/run_gpu.sh OUT_DIR "preset batch seq [flags...]" ...
# Each configuration gets at most $BENCH_TIMEOUT seconds (default 170).
set -u
out=${1:?output dir}; shift
mkdir -p "$out"
root=$(cd "$(dirname "$0")/../.." && pwd)
# The repository is not pip-installed there: expose data/ and kernels/ inside the package.
ln -sfn ../kernels "$root/openmoe_jax/kernels"
ln -sfn ../data "$root/openmoe_jax/data"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
py=${PYTHON:-python3}
for cfg in "$@"; do
  set -- $cfg
  preset=$1 batch=$2 seq=$3; shift 3
  echo "=== $preset $batch x $seq $*" | tee -a "$out/log.txt"
  timeout "${BENCH_TIMEOUT:-170}" "$py" -m openmoe_jax.bench.train_step --preset "$preset" \
      --batch "$batch" --seq "$seq" --json "$out/results.jsonl" "$@" 2>&1 \
      | grep -v -i "warning" | tail -n 60 | tee -a "$out/log.txt"
done
"$py" - "$out/results.jsonl" <<'PY'
import json, sys
from openmoe_jax.bench import train_step as b
print(b.TABLE_HEADER)
print("|" + " --- |" * b.TABLE_HEADER.count(" | ") + " --- |")
try:
  rows = [json.loads(l) for l in open(sys.argv[1])]
except FileNotFoundError:
  rows = []
for r in rows:
  print(b.table_row(b.Result(**r)))
PY
