#!/usr/bin/env bash
# GPU figures in one go (H200 or any CUDA GPU), in at most 8 minutes, into one JSON:
#   environment; forward parity of the gpu kernel plan vs the reference plan (float32 on
#   the CPU) and whether cuDNN's fused attention is in the compiled program; FedMSA and
#   FedSAM rounds of ViT-B at 1024 in bf16 (compile time, images/s, MFU, peak memory)
#   beside the PyTorch original-style reference on the same GPU, and the ratio.
#
#   bash benchmarks/gpu.sh                 # everything, <= 8 min (time limits below)
#   OUT=/tmp/gpu bash benchmarks/gpu.sh    # choose the output folder
#   QUICK=1 bash benchmarks/gpu.sh         # parity and the FedMSA round only
#   FULL=1 bash benchmarks/gpu.sh          # also the image-encoder forward runs (+6 min)
#
# Writes $OUT/gpu.json (everything), one JSON + log per part, and $OUT/table.md.
# Needs: jax with a CUDA plugin, flax, optax, torch (CUDA build) and segment-anything 1.0
# (pure Python; installed without dependencies if missing, from WHEELS=<folder> when the
# machine has no package index). ml_collections is optional.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
OUT="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Each side of a round runs in its own process (JAX, then PyTorch), so JAX may take most
# of the GPU; the parity script shares its process with nothing.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
START=$(date +%s)

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null || true
  "$PY" - <<'PY'
import jax, torch
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
PY
} 2>&1 | tee "$OUT/machine.txt"

if ! "$PY" -c "import segment_anything" 2>/dev/null; then
  if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install --no-deps --no-index --find-links "$WHEELS" segment-anything==1.0
  else
    "$PY" -m pip install --no-deps segment-anything==1.0
  fi
fi

status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log, note a failure
  local name="$1" limit="$2"; shift 2
  echo "=== $name ($(( $(date +%s) - START )) s in, limit ${limit} s)"
  if ! timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "!!! $name failed or timed out (see $OUT/$name.log)"
    status=1
  fi
}
bench() {  # bench NAME TIMEOUT_S CONFIG_ARGS
  step "$1" "$2" "$PY" -m fedfms_jax.benchmark --config "configs/benchmark.py:$3" --json "$OUT/$1.json"
}

# Parity: ViT-B at 1024, one image; the float32 reference runs on the CPU (~1 min).
# Limits: 100 + 2 x 180 s + set-up stay within 8 minutes.
step parity 100 "$PY" benchmarks/gpu_parity.py --json "$OUT/parity.json"

# Rounds: 4 clients x batch 4 (the original's FedMSA batch) x 2 local steps, bf16 compute
# with float32 master weights, kernels auto (= gpu: cuDNN attention); the PyTorch
# reference trains eager fp32, clients in turn, on the same GPU in its own process.
ROUND="variant=vit_b,image_size=1024,clients=4,batch=4,steps=2,dtype=bfloat16,warmup=1,repeats=3,torch_repeats=2,eval=false,flops=jaxpr"
bench fedmsa_vit_b_1024_bf16 180 "$ROUND,method=fedmsa"
if [ -z "${QUICK:-}" ]; then
  bench fedsam_vit_b_1024_bf16 180 "$ROUND,method=fedsam"
fi
if [ -n "${FULL:-}" ]; then
  # Image encoder forward, same dtype on both sides (fp32), then JAX in bf16.
  bench encoder_vit_b_1024_fp32 180 "mode=encoder,variant=vit_b,image_size=1024,batch=8,dtype=float32,repeats=10"
  bench encoder_vit_b_1024_bf16 180 "mode=encoder,variant=vit_b,image_size=1024,batch=8,dtype=bfloat16,repeats=10,torch=false"
fi

"$PY" benchmarks/gpu_collect.py "$OUT" "$(( $(date +%s) - START ))" > "$OUT/gpu.json" || status=1
shopt -s nullglob
runs=("$OUT"/*_bf16.json "$OUT"/*_fp32.json)
[ ${#runs[@]} -gt 0 ] && "$PY" -m fedfms_jax.benchmarking.table "${runs[@]}" | tee "$OUT/table.md"
echo "results in $OUT/gpu.json ($(( $(date +%s) - START )) s)"
exit $status
