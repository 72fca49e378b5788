"""What WTA-CRS sampling costs on top of its matmuls: one layer's forward + backward.

    python benchmarks/wtacrs_overhead.py                      # CPU, the default shapes
    python benchmarks/wtacrs_overhead.py --device cuda --steps 20 --rounds 5

For each shape and dtype: the time of one forward + backward (input requiring grad, as inside a
model) of exact nn.Linear, then of WTACRSLinear at each keep ratio, without and with the
gradient-norm cache (sample indices set each step, as a training loop does). Steps run back to
back and the device is synchronised only around a round of them, so a step that makes the host
wait for the device costs what it costs in training; each figure is the best round's mean.
"floor" is the time of the three matmuls the sampled layer must do (forward, ∇H, and ∇W over its
k rows): the gap between a WTA-CRS time and the floor is the sampling overhead. "sample" is
keep_rows alone, as the layers call it (on CUDA through the sampler's graphs). Prints one JSON
line per row.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout; an install wins
import zerokit.nn as znn  # noqa: E402
from zerokit.nn.function import keep_rows  # noqa: E402
from zerokit.nn.sampler_graphs import SamplerGraphs  # noqa: E402
from zerokit.nn.sampling import row_budget  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEQ = 2048  # tokens per sample, for the cache's sample indices


def seconds_per_step(step: Callable[[], None], device: torch.device, steps: int, rounds: int) -> float:
    """Best over ``rounds`` of the mean time of ``steps`` back-to-back steps, after one warm-up step."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    best = math.inf
    for _ in range(rounds):
        synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def layer_step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, indices: Optional[list[int]] = None):
    def step() -> None:
        if indices is not None:
            znn.set_sample_indices(layer, indices)  # a new batch: applies the norms of the last backward
        layer.weight.grad = None
        x.grad = None
        layer(x).backward(grad_out)

    return step


def floor_step(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, k: int):
    rows, grads = x.detach().reshape(-1, x.shape[-1])[:k], grad_out.reshape(-1, grad_out.shape[-1])[:k]

    def step() -> None:
        F.linear(x.detach(), weight.detach())
        grad_out @ weight.detach()
        grads.t() @ rows

    return step


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    timing = dict(device=device, steps=args.steps, rounds=args.rounds)
    for out_features in args.out_features:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            shape = (args.tokens // SEQ, SEQ) if args.tokens % SEQ == 0 else (1, args.tokens)
            x = torch.randn(*shape, args.in_features, device=device, dtype=dtype, requires_grad=True)
            grad_out = torch.randn(*shape, out_features, device=device, dtype=dtype)
            exact = nn.Linear(args.in_features, out_features, bias=False, device=device, dtype=dtype)
            exact_s = seconds_per_step(layer_step(exact, x, grad_out), **timing)
            for keep in args.keep:
                k = row_budget(keep, args.tokens)
                floor_s = seconds_per_step(floor_step(x, exact.weight, grad_out, k), **timing)
                sampler = SamplerGraphs()
                sample_s = seconds_per_step(lambda: keep_rows(x.detach(), keep, 0, None, sampler), **timing)
                row = {
                    "device": str(device), "tokens": args.tokens, "in": args.in_features, "out": out_features,
                    "dtype": dtype_name, "keep": keep, "exact_ms": round(exact_s * 1e3, 2),
                    "floor_ms": round(floor_s * 1e3, 2), "sample_ms": round(sample_s * 1e3, 2),
                }
                for name, indices in (("wtacrs", None), ("wtacrs_cache", list(range(shape[0])))):
                    layer = znn.WTACRSLinear.from_linear(exact, keep_ratio=keep)
                    seconds = seconds_per_step(layer_step(layer, x, grad_out, indices), **timing)
                    row[f"{name}_ms"] = round(seconds * 1e3, 2)
                    row[f"{name}_vs_exact"] = round(seconds / exact_s, 3)
                print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--in-features", type=int, default=2048)
    parser.add_argument("--out-features", type=int, nargs="+", default=[2048, 5632])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.3, 0.1])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=2, help="back-to-back steps per timed round")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (the best one counts)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
