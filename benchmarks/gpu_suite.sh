#!/usr/bin/env bash
# Everything this repository measures on a 2-GPU machine, in one go: GPU tests, the ZeRO
# comparison of llama_step.py, and the WTA-CRS memory benchmark. Results land in $1 (default out/).
set -u
out=${1:-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
python3 -m pytest -q tests/test_zero_gpu.py tests/test_offload_copy_engine.py tests/test_offload_pinned_pool.py \
  tests/test_wtacrs_linear.py 2>&1 | tail -15
timeout 420 python3 benchmarks/compare.py --gpus 2 --out "$out/zero.jsonl" \
  --systems zerokit-1 zerokit-2 zerokit-3 fsdp2 ddp deepspeed-1 deepspeed-2 deepspeed-3
timeout 240 python3 benchmarks/wtacrs_memory.py --out "$out" --loss-steps 150
