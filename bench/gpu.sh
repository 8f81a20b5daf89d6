#!/usr/bin/env bash
# The benchmarks on one GPU (H100 / H200) with a random model of a real model's shape, built on the spot from a
# config (no internet needed). Prints one table and writes bench/results_gpu.json.
#
#   bash bench/gpu.sh                          # Qwen3-0.6B shape (~20-25 minutes on one H100, not yet run)
#   SIZE=qwen3-4b bash bench/gpu.sh            # Qwen3-4B shape (the dense replication's buyer)
#   bash bench/gpu.sh --only rollouts          # the rollout rows alone, the limit included (~5 minutes)
#   bash bench/gpu.sh --only rollouts,sync     # any bench/run.py flag or key=value override goes last
#
# The rollout limit: beside each lockstep rollout (vLLM, HF) the same engine replays that rollout's requests flat,
# all at once, replies forced to the same lengths (a_vllm_flat, b_hf_flat); `lockstep_over_flat_a` in the ratios is
# the share of vLLM's throughput the multi-turn runner keeps, the number that says whether per-episode asynchronous
# generation is worth building on GPU (on CPU it kept 0.7 of it; see bench/README.md).
#
# Settings: config.yaml's (the paper's run), for one GPU: its 64 products per step are shared by 8 GPUs, so one GPU
# plays 8 products x 8 episodes, 6 rounds, the LLM seller, colocated vLLM (adapter sync, sleep mode) as train.py
# does. Changed, because the model is random: bf16 without quantisation (nothing to quantise from), no fused-expert
# LoRA targets (the shape is dense), and replies capped at 256 tokens (a random model never stops early, so the
# configured 512 would double every episode's length compared with real replies).
# Needs: the GPU stack (requirements.txt), the dataset (NEGO_DATA or .cache/AmazonHistoryPrice), and for the TRL
# row TRL installed next to it (see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE="${SIZE:-qwen3-0.6b}"
PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
  echo "gpu.sh: no NVIDIA GPU visible (nvidia-smi failed)" >&2
  exit 1
}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: torch sees no CUDA device')"
exec "$PYTHON" bench/run.py --device cuda --size "$SIZE" --config config.yaml --out bench/results_gpu.json \
  --repeats "${REPEATS:-2}" --naive-episodes "${NAIVE_EPISODES:-2}" \
  rollout.products_per_step=8 world_size=0 model.quantization=none "model.lora_target_parameters=[]" \
  rollout.buyer_max_tokens=256 seller.max_tokens=256 engine.max_batch_tokens=65536 \
  "$@"
