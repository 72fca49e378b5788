"""Whether an activation policy's forward and backward are bound by the host or by the GPU.

    python benchmarks/memo_host_time.py --policy memo
    python benchmarks/memo_host_time.py --policy memo --chunked 4096 --keep-last 0
    python benchmarks/memo_host_time.py --policy recompute

The 0.95 B Llama of llama_step.py on one GPU, ZeRO-3, bf16, micro-batch 1. After three warm-up
iterations, four iterations are timed phase by phase (medians printed): how long the host takes
to queue the forward and the backward (`fwd_host`, `bwd_host`: until the call returns) and how
long each phase takes to finish on the GPU (`fwd`, `bwd`: synchronised). A forward whose host
time nears its GPU time starves the GPU. Then eight steps run back to back without
synchronisation for the step time (`step_s`, `tok_s`). One JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_step import loss_of, single_gpu_engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--policy", default="memo", choices=("memo", "recompute", "swap", "none"))
    parser.add_argument("--alpha", type=float, help="memo's swapped fraction of tokens (default: planned)")
    parser.add_argument("--keep-last", type=int, help="blocks at the end that keep their activations (default 2)")
    parser.add_argument("--chunked", type=int, metavar="TOKENS", help="the loss over chunks of this many tokens")
    args = parser.parse_args()
    section = None
    if args.policy != "none":
        options = {"keep_last": args.keep_last} if args.keep_last is not None else {}
        section = {"policy": args.policy, "alpha": args.alpha, **options}
    engine = single_gpu_engine(section, args.chunked)

    def tokens(index: int) -> torch.Tensor:
        generator = torch.Generator("cuda").manual_seed(index)
        return torch.randint(0, 32000, (1, args.seq), device="cuda", generator=generator)

    def phases(index: int) -> dict:
        batch = tokens(index)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_of(engine(input_ids=batch, labels=batch))
        forward_queued = time.perf_counter()
        torch.cuda.synchronize()
        forward = time.perf_counter()
        engine.backward(loss)
        backward_queued = time.perf_counter()
        torch.cuda.synchronize()
        backward = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        return dict(fwd_host=forward_queued - start, fwd=forward - start, bwd_host=backward_queued - forward,
                    bwd=backward - forward, opt=time.perf_counter() - backward)  # fmt: skip

    for index in range(3):
        phases(index)
    timed = [phases(index) for index in range(3, 7)]
    batches = [tokens(index) for index in range(7, 15)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        engine.backward(loss_of(engine(input_ids=batch, labels=batch)))
        engine.step()
    torch.cuda.synchronize()
    step = (time.perf_counter() - start) / len(batches)
    print(json.dumps({
        "policy": args.policy, "alpha": args.alpha, "keep_last": args.keep_last, "chunked": args.chunked,
        "seq": args.seq, "step_s": round(step, 4), "tok_s": round(args.seq / step),
        "alpha_used": engine.activations.alpha if engine.activations else None,
        "phases": {name: round(statistics.median(t[name] for t in timed), 4) for name in timed[0]},
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
