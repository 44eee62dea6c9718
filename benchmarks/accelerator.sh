#!/usr/bin/env bash
# The accelerator checks of the throughput work, as one script that finishes in a few minutes on one GPU
# (or TPU) host, so that it can be rerun at once. One JSON file per check in OUT_DIR, named after the card:
#
#     benchmarks/accelerator.sh [--smoke] [OUT_DIR]        # default OUT_DIR: benchmarks/results
#
# 1. decode vs the memory-bandwidth bound (generation.py): llama-1b shape (1.24B), bfloat16, prompt 128 +
#    128 new tokens, batch 64 and 256; JSON "decode.fraction_of_bound" (targets >= 0.5 and >= 0.6),
#    "decode.loop_copies" (must be []), the copy-bandwidth probe, and group sampling's shared prefill.
# 2. compile time against depth (compile_depth.py): generation and PPO update at 6/12/24 layers, blocks
#    scanned / default / unrolled, generation tokens/s of each and what each decode loop copies per step
#    (JSON "targets", "decode_loop_copies"); on a GPU once more for the scanned decode with XLA's
#    dynamic-slice fusion on (compile_depth_dsfusion_CARD.json).
# 3. the PPO iteration (ppo_iteration.py): llama-1b, bfloat16, global batch 64 x (128 + 128), 4 epochs x 4
#    minibatches: update MFU vs the in-run bf16 matmul and PEAK_TFLOPS (default 989, H100/H200 SXM dense
#    bf16), and the bfloat16 first-minibatch ratio error ("first_minibatch_ratio_error"; the old log-probs are
#    recomputed in the update's micro-batch shapes: target <= 1e-6).
# 4. the iteration MFU (issue 13 section 1): the same shape at 1 and at 4 epochs, the sampled log-probs as the
#    old ones (--logprobs-from rollout); JSON "iteration_mfu" (necessary FLOPs / (iteration time x the in-run
#    matmul peak); target >= 0.6 at 1 epoch), "phase_share", "matmul_probe"; the 1-epoch run profiles one
#    more iteration ("op_profile": each phase's time by kind of op, model region and pass, and its top ops;
#    the trace and the optimised programs go to a temporary directory named in the JSON).
# 5. the bfloat16 ratio check as a test on this device (tests/steps/test_experience.py -k bfloat16: first
#    minibatch mean |r - 1| <= 1e-6), when pytest is installed: ratio_check_CARD_STAMP.txt.
#
# --smoke: tiny shapes, runs on a CPU in a few minutes, only to check that the script and its JSON work.
# Runs from a checkout without installing: the interpreter in PYTHON (default python3) needs jax, flax,
# optax and chex (transformers and torch are not needed: the PyTorch baseline is skipped here).
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi
out="${1:-benchmarks/results}"
python="${PYTHON:-python3}"
peak="${PEAK_TFLOPS:-989}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

card=$("$python" - <<'EOF'
import re, jax, flax, optax
import sys
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, file=sys.stderr)
print("devices", jax.devices(), file=sys.stderr)
print(re.sub(r"[^a-z0-9]+", "_", jax.devices()[0].device_kind.lower()).strip("_"))
EOF
) || { echo "JAX does not start" >&2; exit 1; }
backend=$("$python" -c "import jax; print(jax.default_backend())")
stamp="$(date +%Y%m%d)"
[[ $smoke == 1 ]] && stamp="smoke"
status=0

ratio_check() {  # the bfloat16 first-minibatch ratio test, on this device
  local file="$out/ratio_check_${card}_${stamp}.txt"
  if ! "$python" -c "import pytest" 2>/dev/null; then echo "== ratio_check skipped: no pytest"; return; fi
  echo "== ratio_check -> $file"
  if "$python" -m pytest -q -p no:cacheprovider tests/steps/test_experience.py -k bfloat16 >"$file" 2>&1; then
    tail -n 1 "$file"
  else
    status=1
    echo "ratio_check failed (see $file)" >&2
  fi
}

run() {  # run NAME ARGS...: the JSON on stdout goes to OUT_DIR/NAME_CARD_STAMP.json
  local name="$1"; shift
  local file="$out/${name}_${card}_${stamp}.json"
  echo "== $name -> $file"
  local start=$SECONDS
  if "$python" "$@" >"$file.tmp"; then
    mv "$file.tmp" "$file" && cat "$file"
  else
    status=1
    echo "$name failed" >&2
    rm -f "$file.tmp"
  fi
  echo "== $name took $((SECONDS - start)) s"
}

if [[ $smoke == 1 ]]; then
  gen=(--preset tiny --layers 2 --vocab 512 --prompt 16 --new 8 --repeats 2 --no-torch --bandwidth-mib 64)
  run generation_decode_b4 benchmarks/generation.py "${gen[@]}" --batch 4 --group-prefill \
    --group-prompts 2 --group-prompt-len 16 --group-size 4
  run compile_depth benchmarks/compile_depth.py --layers 2 4 --repeats 1 --skip-throughput
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_dynamic_slice_fusion=true" run compile_depth_dsfusion \
    benchmarks/compile_depth.py --layers 2 4 --variants scan --skip-ppo --skip-throughput
  run ppo_iteration_tiny_bf16 benchmarks/ppo_iteration.py --preset tiny --vocab 512 --dtype bfloat16 \
    --batch 4 --prompt 8 --response 8 --epochs 1 --minibatches 1 --iterations 1 --peak-tflops "$peak"
  run ppo_iteration_mfu_tiny_bf16_e2 benchmarks/ppo_iteration.py --preset tiny --vocab 512 --dtype bfloat16 \
    --batch 4 --prompt 8 --response 8 --epochs 2 --minibatches 2 --iterations 1 --logprobs-from rollout \
    --profile "$(mktemp -d)"
  ratio_check
  exit "$status"
fi

gen=(--preset llama-1b --dtype bfloat16 --prompt 128 --new 128 --repeats 5 --no-torch)
run generation_decode_llama-1b_bf16_b64 benchmarks/generation.py "${gen[@]}" --batch 64 --group-prefill
run generation_decode_llama-1b_bf16_b256 benchmarks/generation.py "${gen[@]}" --batch 256
run compile_depth benchmarks/compile_depth.py --layers 6 12 24 --repeats 3
# The scanned decode step on XLA:GPU with dynamic-slice fusion (its matmuls read the layer's weight and cache
# slices in place): does it copy nothing per step ("decode_loop_copies") and decode as fast as unrolled?
if [[ "$backend" == gpu ]]; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_dynamic_slice_fusion=true" run compile_depth_dsfusion \
    benchmarks/compile_depth.py --layers 6 12 24 --repeats 3 --variants scan unrolled --skip-ppo
fi
run ppo_iteration_llama-1b_bf16 benchmarks/ppo_iteration.py --preset llama-1b --dtype bfloat16 --batch 64 \
  --prompt 128 --response 128 --epochs 4 --minibatches 4 --iterations "${ITERATIONS:-2}" --peak-tflops "$peak"
for epochs in 1 4; do
  profile=()
  [[ $epochs == 1 ]] && profile=(--profile "$(mktemp -d)")
  run "ppo_iteration_mfu_llama-1b_bf16_e$epochs" benchmarks/ppo_iteration.py --preset llama-1b --dtype bfloat16 \
    --batch 64 --prompt 128 --response 128 --epochs "$epochs" --minibatches 4 --iterations "${ITERATIONS:-2}" \
    --logprobs-from rollout --peak-tflops "$peak" "${profile[@]}"
done
ratio_check
exit "$status"
