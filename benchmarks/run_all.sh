#!/usr/bin/env bash
# Runs every benchmark and writes its JSON under benchmarks/results/ (replacing earlier results).
#
#   benchmarks/run_all.sh            # full sizes (tens of minutes on a 2-core CPU)
#   SMOKE=1 benchmarks/run_all.sh    # small sizes, a few minutes; results in *_smoke.json
#
# gpu.py runs at full size when an NVIDIA GPU is visible (nvidia-smi and a CUDA jaxlib), and with
# --smoke on the CPU otherwise. PYTHON selects the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
SMOKE="${SMOKE:-0}"

run() {
  echo
  echo "=== $* ($(uptime | sed 's/.*load average/load average/'))"
  "$PY" "$@"
}

have_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
    "$PY" -c 'import jax, sys; sys.exit(0 if jax.devices()[0].platform == "gpu" else 1)' \
      >/dev/null 2>&1
}

if [[ "$SMOKE" == "1" ]]; then
  run benchmarks/logps_memory.py --smoke --overwrite
  run benchmarks/sampling.py --rounds 4 --torch-rounds 1 --runs 1 --overwrite \
    --out benchmarks/results/sampling_smoke.json
  run benchmarks/train_step.py --smoke --overwrite
  run benchmarks/layer_modes.py --smoke --overwrite
else
  run benchmarks/logps_memory.py --overwrite
  run benchmarks/sampling.py --runs 5 --overwrite
  run benchmarks/train_step.py --overwrite
  if [[ -d models/smollm2 ]]; then  # scripts/fetch_smollm2.py, then distfair convert gguf-to-flax
    run benchmarks/layer_modes.py --model models/smollm2 --overwrite
  else
    echo "(models/smollm2 absent: layer_modes.py needs a converted model; see README)"
  fi
fi
if have_gpu; then
  run benchmarks/gpu.py --overwrite
else
  echo "(no NVIDIA GPU visible to JAX: gpu.py runs with --smoke on the CPU)"
  run benchmarks/gpu.py --smoke --overwrite
fi
