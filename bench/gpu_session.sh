#!/usr/bin/env bash
# One GPU session in under 8 minutes: the CUDA-only tests, the SD 2.1-base training benchmark
# (ours with and without the latent cache vs diffusers' loop, checkpointing off/on) and the
# sampling benchmark (batched vs one image per call), on random SD 2.1-base-shaped weights.
#
#   bash bench/gpu_session.sh [OUT_DIR]        # default bench/results/gpu
#
# Needs a CUDA torch and this project's Python dependencies (or wheels of them in .whl/,
# installed into /tmp/site first). Each step has its own time limit and writes its log and
# JSON into OUT_DIR as it goes, so a step that fails or times out leaves the others' results.
set -uo pipefail
out=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/machine.txt"
$py - <<'EOF' 2>&1 | tee -a "$out/machine.txt" || exit 3
import accelerate, diffusers, torch, transformers
import idc_diffusion.cli, idc_diffusion.train.fine_tune  # noqa: F401  (fails fast on a missing dep)
print(f"torch {torch.__version__} cuda {torch.version.cuda} diffusers {diffusers.__version__} "
      f"transformers {transformers.__version__} accelerate {accelerate.__version__}")
assert torch.cuda.is_available(), "no CUDA device visible"
EOF

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local began=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - began)) s"
  tail -n 25 "$out/$name.log"
}

step test_gpu 120 $py -m pytest tests/test_gpu.py -q -p no:cacheprovider
step gpu_train_sd21 300 $py bench/gpu_train_sd21.py --out "$out/gpu_train_sd21.json"
step gpu_sample 120 $py bench/bench_sample.py --model random-sd21 --device cuda \
  --images 16 --batch 8 --out "$out/gpu_sample.json"
