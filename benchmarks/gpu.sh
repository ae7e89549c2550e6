#!/usr/bin/env bash
# GPU figures in one go (H200 or any CUDA GPU): FedMSA ViT-B at 1024 in bf16 with the
# PyTorch original-style reference on the same GPU, FedSAM likewise, and the image
# encoder forward. Writes one JSON + log per run and a markdown table for BENCHMARKS.md.
#
#   bash benchmarks/gpu.sh                 # all runs
#   OUT=/tmp/gpu bash benchmarks/gpu.sh    # choose the output folder
#   QUICK=1 bash benchmarks/gpu.sh         # the headline FedMSA run only
#   FULL=1 bash benchmarks/gpu.sh          # also the image-encoder forward runs
#
# Needs: jax with a CUDA plugin, flax, optax, torch (CUDA build) and segment-anything 1.0
# (pure Python; installed without dependencies if missing, from WHEELS=<folder> when the
# machine has no package index). ml_collections is optional.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
OUT="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"

# JAX and PyTorch share the GPU in one process: stop XLA from taking 75% up front.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null || true
  "$PY" - <<'PY'
import jax, torch
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
PY
} | tee "$OUT/machine.txt"

if ! "$PY" -c "import segment_anything" 2>/dev/null; then
  if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install --no-deps --no-index --find-links "$WHEELS" segment-anything==1.0
  else
    "$PY" -m pip install --no-deps segment-anything==1.0
  fi
fi

status=0
run() {  # run NAME TIMEOUT_S CONFIG_ARGS
  local name="$1" limit="$2" args="$3"
  echo "=== $name: configs/benchmark.py:$args"
  if ! timeout "$limit" "$PY" -m fedfms_jax.benchmark --config "configs/benchmark.py:$args" \
      --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"; then
    echo "!!! $name failed or timed out (see $OUT/$name.log)"
    status=1
  fi
}

# Headline: FedMSA ViT-B at 1024, bf16 compute with fp32 master weights, 4 clients x batch 4
# (the original's FedMSA batch), 2 local steps; PyTorch reference eager fp32 on the same GPU.
run fedmsa_vit_b_1024_bf16 300 \
  "variant=vit_b,image_size=1024,clients=4,batch=4,steps=2,method=fedmsa,dtype=bfloat16,warmup=1,repeats=5,torch_repeats=3"

if [ -z "${QUICK:-}" ]; then
  # FedSAM (every parameter trained) at the original's batch 6 would need 6 x 4 images
  # in flight; batch 4 keeps the shapes of the FedMSA run.
  run fedsam_vit_b_1024_bf16 300 \
    "variant=vit_b,image_size=1024,clients=4,batch=4,steps=2,method=fedsam,dtype=bfloat16,warmup=1,repeats=5,torch_repeats=3"
fi
if [ -n "${FULL:-}" ]; then
  # Image encoder forward, same dtype on both sides (fp32), then JAX in bf16.
  run encoder_vit_b_1024_fp32 180 "mode=encoder,variant=vit_b,image_size=1024,batch=8,dtype=float32,repeats=10"
  run encoder_vit_b_1024_bf16 180 "mode=encoder,variant=vit_b,image_size=1024,batch=8,dtype=bfloat16,repeats=10,torch=false"
fi

"$PY" -m fedfms_jax.benchmarking.table "$OUT"/*.json | tee "$OUT/table.md"
echo "results in $OUT"
exit $status
