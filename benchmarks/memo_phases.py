"""Where an activation policy's time and memory go on one GPU, iteration by iteration.

    python benchmarks/memo_phases.py --seq 65536 --policy memo
    python benchmarks/memo_phases.py --seq 65536 --policy recompute

The 0.95 B Llama of llama_step.py (built on the GPU, Hugging Face loss over the full logits),
ZeRO-3 on one rank, bf16, micro-batch 1, `activation_memory.policy` as given. For each of
--iterations iterations, each phase synchronised: forward, backward and optimizer seconds, memory
allocated after the forward, the forward's and the backward's peaks (GiB), and the pinned host
allocations so far (torch's host-allocator counters: zerokit's swap space comes from it). Then
the planned alpha, the restore buffers' size in the last backward, and per block what it kept,
sent to host memory and dropped; then one more iteration under the torch profiler, whose top
operators by CPU and by CUDA time are printed. The first memo iteration plans (alpha, restore
offsets) and the second allocates the pinned swap space; the ones after are the steady state.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_step import single_gpu_engine  # noqa: E402

GiB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--policy", default="memo", choices=("memo", "recompute", "swap", "none"))
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    engine = single_gpu_engine({"policy": args.policy})
    model = engine.module

    def step(index: int) -> dict:
        tokens = torch.randint(0, 32000, (1, args.seq), device="cuda", generator=torch.Generator("cuda").manual_seed(index))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = engine(input_ids=tokens, labels=tokens).loss
        torch.cuda.synchronize()
        forward = time.perf_counter()
        after_forward, forward_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.backward(loss)
        torch.cuda.synchronize()
        backward = time.perf_counter()
        backward_peak = torch.cuda.max_memory_allocated()
        engine.step()
        torch.cuda.synchronize()
        return dict(forward_s=round(forward - start, 3), backward_s=round(backward - forward, 3),
                    optimizer_s=round(time.perf_counter() - backward, 3), after_forward_gib=round(after_forward / GiB, 2),
                    forward_peak_gib=round(forward_peak / GiB, 2), backward_peak_gib=round(backward_peak / GiB, 2))  # fmt: skip

    def pinned() -> dict:
        stats = torch.cuda.host_memory_stats()
        return {key: stats.get(key) for key in ("num_host_alloc", "num_host_free", "allocated_bytes.current")}

    manager = engine.activations
    # the buffers are let go at the end of each backward: read their size while the first
    # decoder layer's weight gradient is computed, the last iteration's being the steady state
    restore_bytes = []
    if manager is not None:
        first_weight = next(model.model.layers[0].parameters())
        first_weight.register_hook(lambda grad: restore_bytes.append(manager.restore_buffer_bytes()))
    for index in range(args.iterations):
        print(index, step(index), pinned(), flush=True)
    if manager is not None:
        restore_gib = round(restore_bytes[-1] / GiB, 2) if restore_bytes else None
        print("alpha", manager.alpha, "restore buffers GiB", restore_gib,
              dict(manager.restore_counts))  # fmt: skip
        reports = manager.reports()
        for report in reports[:3] + reports[-3:]:
            print(" ", report.block, report.policy, "kept", round(report.kept_bytes / GiB, 3), "host",
                  round(report.host_bytes / GiB, 3), "dropped", round(report.dropped_bytes / GiB, 3), report.slots,
                  report.swapped_tokens)  # fmt: skip
        for plan in manager.alpha_plans.values():
            print("plan", plan)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        print("profiled", step(args.iterations), flush=True)
    averages = profiler.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
    print(averages.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
