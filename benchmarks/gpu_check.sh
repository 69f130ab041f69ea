#!/usr/bin/env bash
# One prepared GPU check (issue 15), ≤ 8 minutes on one GPU. From the repository root:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]              # OUT_DIR defaults to $OUT, else .bench/gpu-check
#   DEVICE=cpu TINY=1 bash benchmarks/gpu_check.sh out  # smoke test of every step on a CPU
#
# Steps (each under its own time limit; a failed step is logged and the rest still run):
#   1. MoE layer fwd+bwd in bf16: per-expert loop vs grouped_mm vs the dense MLP at equal active FLOPs,
#      64 images × 197 tokens, d=768, E=32, k=2, every router            → moe_layer.json
#   2. the README recovery demo with --device cuda --precision bf16        → finetune.json
#   3. a bf16 Mixtral conversion of a small LLaMA: `ckptforge verify` (fp32 on CPU: verify has no
#      device option) and dense vs MoE logits on the GPU in bf16 with transformers' eager and
#      grouped_mm experts                                                  → mixtral.json
#   4. the same finetune under FSDP (benchmarks/accelerate_fsdp.yaml, one process; accelerate runs
#      FSDP only on GPUs, so on a CPU this step logs finetune's one-line refusal)        → fsdp.json
# and writes gpu_check.json + gpu_check.md (the table for docs/benchmarks.md) in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-.bench/gpu-check}}"
DEVICE="${DEVICE:-cuda}"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LIMIT_SCALE=1
if [ "${TINY:-0}" = 1 ]; then
  LIMIT_SCALE=5  # a small, shared CPU: the limits are for one GPU
  MOE_ARGS=(--tiny); STEPS=4; EVAL_EVERY=2; PRECISION=fp32; MIXTRAL_ARGS=(--tiny)
else
  MOE_ARGS=(--images 64 --tokens 197 --experts 32 --top-k 2 --repeats 5); STEPS=200; EVAL_EVERY=20
  PRECISION=bf16; MIXTRAL_ARGS=()
fi

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log, report
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$((limit * LIMIT_SCALE))" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s (log: $OUT_DIR/$name.log)"
}

step environment 30 python benchmarks/gpu_check.py environment --device "$DEVICE" --out "$OUT_DIR"
step moe_layer 180 python benchmarks/moe_layer.py --device "$DEVICE" --dtype bf16 "${MOE_ARGS[@]}" \
  --json "$OUT_DIR/moe_layer.json"
step upcycle_demo 40 python -m ckptforge upcycle examples/tiny-vit-mnist --experts 4 --top-k 2 --drop-ratio 0.5 \
  --out "$WORK/tiny-vit-moe" --force -q
step finetune_demo 120 bash -c "python -m ckptforge finetune '$WORK/tiny-vit-moe' --data examples/mnist-samples \
  --steps $STEPS --eval-every $EVAL_EVERY --lr 1e-3 --batch-size 32 --compare examples/tiny-vit-mnist --scratch \
  --device $DEVICE --precision $PRECISION --report '$WORK/finetune' --json > '$OUT_DIR/finetune.json'"
step mixtral 90 python benchmarks/gpu_check.py mixtral --device "$DEVICE" --work "$WORK" --out "$OUT_DIR" \
  "${MIXTRAL_ARGS[@]}"
step fsdp_finetune 120 bash -c "accelerate launch --config_file benchmarks/accelerate_fsdp.yaml -m ckptforge finetune \
  '$WORK/tiny-vit-moe' --data examples/mnist-samples --steps $STEPS --eval-every $EVAL_EVERY --lr 1e-3 --batch-size 32 \
  --device $DEVICE --precision $PRECISION --report '$WORK/fsdp' --json > '$OUT_DIR/fsdp.json'"
python benchmarks/gpu_check.py summary --out "$OUT_DIR"
