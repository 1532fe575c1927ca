#!/usr/bin/env bash
# The benchmark on a lent GPU machine, one section per process so that a
# section cut short by its time limit loses only itself. Writes one archive,
# $OUT/gpu.tar.gz (results.json + tables.md + plots per section), and a log.
#
#   OUT=/some/dir bash scripts/device_benchmark.sh [steps]
set -u
STEPS=${1:-30}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
RUN=/tmp/gpu_benchmark
mkdir -p "$RUN"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import jax, optax, flax, soap_optax; print("jax", jax.__version__, "optax", optax.__version__, "flax", flax.__version__, jax.devices())' || exit 1
  # Highest value first: the whole training step (the GPU goal; SOAP's
  # trace+lower, compile and first run are timed apart before anything
  # else), then the optimizer step alone, then the refresh solvers.
  for spec in train_step:300 step:170 refresh:80; do
    section=${spec%%:*}; limit=${spec##*:}
    echo "=== $section (limit ${limit}s) $(date +%T)"
    timeout "$limit" python3 scripts/benchmark.py --device gpu \
      --sections "$section" --steps "$STEPS" --out "$RUN/$section"
    echo "=== $section exit $? $(date +%T)"
  done
} 2>&1 | tee "$RUN/log.txt"
tar -czf "$OUT/gpu.tar.gz" -C "$RUN" .
