#!/usr/bin/env bash
# Everything this repository measures on a 2-GPU machine, in one go: GPU tests, the ZeRO
# comparison and the MEMO comparison of llama_step.py, the offload data paths and steps (one GPU),
# and the WTA-CRS memory benchmark. Results land in $1 (default out/); $2 is a directory on a local
# disk for the swap-file benchmarks (default: a temporary directory).
set -u
out=${1:-out}
if [ -n "${2:-}" ]; then
  disk=$2
else
  disk=$(mktemp -d)
  echo "warning: no disk directory (\$2): swap files go to $disk, which may not be on the NVMe drive" >&2
fi
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
here=$(dirname "$0")
python3 -m pytest -q tests/test_zero_gpu.py tests/test_checkpoint_gpu.py tests/test_activations_gpu.py \
  tests/test_offload_gpu.py tests/test_offload_copy_engine.py tests/test_offload_pinned_pool.py \
  tests/test_wtacrs_linear.py tests/test_nn_chunked_loss.py tests/test_offload_delayed_update.py \
  tests/test_wtacrs_no_sync.py tests/test_wtacrs_sampler_graphs.py 2>&1 | tail -15
timeout 420 python3 "$here/compare.py" --gpus 2 --out "$out/zero.jsonl" \
  --systems zerokit-1 zerokit-2 zerokit-3 fsdp2 ddp deepspeed-1 deepspeed-2 deepspeed-3
timeout 300 python3 "$here/compare.py" --gpus 2 --out "$out/memo.jsonl" --systems zerokit-3 \
  -- --seq 16384 --micro-batch 1 --activation-memory memo
timeout 300 python3 "$here/compare.py" --gpus 2 --out "$out/memo.jsonl" --systems fsdp2 zerokit-3 \
  -- --seq 16384 --micro-batch 1 --activation-checkpointing
timeout 300 python3 "$here/compare.py" --gpus 2 --out "$out/memo.jsonl" --systems fsdp2 zerokit-3 \
  -- --seq 16384 --micro-batch 1
# 1 GiB a pass: the default (4 x --size per method and round) runs past the timeout
timeout 120 python3 "$here/offload_io.py" --nvme-path "$disk" --nvme-bytes 1GiB --out "$out/offload_io.jsonl"
for system in zerokit-none zerokit-offload-cpu zerokit-offload-cpu-params deepspeed-2-offload-cpu; do
  timeout 300 python3 "$here/offload_step.py" --system "$system" --model 2.7b >> "$out/offload.jsonl"
done
timeout 600 python3 "$here/wtacrs_memory.py" --out "$out" --loss-steps 150 --steps 10 --rounds 3
