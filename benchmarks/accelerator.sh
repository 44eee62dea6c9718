#!/usr/bin/env bash
# The PPO-iteration benchmark at ~100M–1B scale in bfloat16 on an accelerator host (GPU or TPU), one JSON
# file per model in OUT_DIR:
#
#     benchmarks/accelerator.sh [OUT_DIR]        # default benchmarks/results
#
# Models: llama-1b (Llama 3.2 1B's shape, 1.24B) and gpt2-medium (355M); global batch 64 sequences of
# prompt 128 + response 128, 4 epochs × 4 minibatches, data parallel over every device JAX sees. MFU is
# reported against a bf16 matmul timed in the same run and against PEAK_TFLOPS (per device; default 989,
# an H100/H200 SXM's dense bf16 datasheet figure). Runs from a checkout without installing: the
# interpreter in PYTHON (default python3) needs jax, flax, optax and chex.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
python="${PYTHON:-python3}"
peak="${PEAK_TFLOPS:-989}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$python" - <<'EOF'
import flax, jax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)
print("devices", jax.devices())
EOF

status=0
for preset in llama-1b gpt2-medium; do
  file="$out/ppo_iteration_${preset}_bf16_$(date +%Y%m%d).json"
  echo "== $preset -> $file"
  if "$python" benchmarks/ppo_iteration.py --preset "$preset" --dtype bfloat16 --batch 64 --prompt 128 \
      --response 128 --epochs 4 --minibatches 4 --iterations "${ITERATIONS:-3}" --peak-tflops "$peak" \
      >"$file.tmp"; then
    mv "$file.tmp" "$file" && cat "$file"
  else
    status=1
    echo "$preset failed" >&2
    rm -f "$file.tmp"
  fi
done
exit "$status"
