"""`zerokit plan`: the MEMO plan of a model (swap fraction alpha and the bi-level memory plan)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from planner import ProfileConfig
from zerokit.profiler.estimate import DTYPES
from zerokit.profiler.memo_plan import MemoPlan, PlanRequest, memo_plan
from zerokit.profiler.models import ModelSourceError, resolve_model
from zerokit.profiler.presets import PRESETS
from zerokit.profiler.sizes import parse_size

MiB = 2**20


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="run the MEMO planner for a model: swap fraction alpha and the memory plan of one iteration",
        description="Profiles one block of the model on this machine's device, plans alpha from the host link's "
        "bandwidth and host memory, and solves the bi-level memory plan of the blocks' activations.",
    )
    parser.add_argument(
        "--model", required=True,
        help=f"a preset ({', '.join(PRESETS)}), a Hugging Face config.json (or its directory), or module:function",
    )  # fmt: skip
    parser.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--micro-batch", type=int, required=True, help="sequences per micro-step")
    parser.add_argument("--alpha", type=float, help="use this swap fraction instead of planning it")
    parser.add_argument("--bandwidth", help="host link bandwidth, e.g. 25GB (per second); measured when omitted")
    parser.add_argument("--host-memory", help="host memory for swapped activations (default: what is available now)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype (default bf16)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to profile the block on (default: cuda when available, else cpu)",
    )  # fmt: skip
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per memory-plan solve (default 10)")
    parser.add_argument("--out", type=Path, help="save the plan as JSON here")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        request = PlanRequest(
            micro_batch=args.micro_batch,
            seq=args.seq,
            dtype=DTYPES[args.dtype],
            device=args.device,
            alpha=args.alpha,
            bandwidth=parse_size(args.bandwidth) if args.bandwidth else None,
            host_memory=parse_size(args.host_memory) if args.host_memory else None,
            time_limit_s=args.time_limit,
            profile=ProfileConfig(warmup=1, repeats=3),
        )
        plan = memo_plan(resolve_model(args.model), request)
    except (ModelSourceError, ValueError) as error:
        print(f"zerokit plan: {error}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if args.out is not None:
        args.out.write_text(json.dumps(plan.to_json(), indent=2))
        print(f"saved: {args.out}")
    return 0


def format_plan(plan: MemoPlan) -> str:
    request, sizes, alpha = plan.request, plan.sizes, plan.alpha
    dtype = str(request.dtype).removeprefix("torch.")
    iteration = plan.iteration
    lines = [
        f"MEMO plan for {plan.model}: {plan.blocks} blocks, micro-batch {request.micro_batch} x {request.seq} tokens, "
        f"{dtype} on {plan.profile.device}",
        f"one block: forward {plan.profile.forward_s * 1e3:.2f} ms, backward {plan.profile.backward_s * 1e3:.2f} ms; "
        f"saved for backward {sizes.saved / MiB:.2f} MiB (input {sizes.inputs / MiB:.2f}, attention "
        f"{sizes.attention / MiB:.2f}, other {sizes.other / MiB:.2f})",
    ]
    if plan.alpha_given:
        lines.append(f"alpha = {alpha.alpha:.3f} (given)")
    else:
        lines.append(
            f"alpha = {alpha.alpha:.3f} (limited by {alpha.limited_by}; host link {plan.bandwidth / 1e9:.1f} GB/s "
            f"{plan.bandwidth_source}, host memory {plan.host_memory / 2**30:.1f} GiB)"
            + ("" if alpha.mandatory_fits else "; the input and attention swaps alone do not fit: expect stalls")
        )
    lines.append(f"memory plan of the blocks' activations: arena {iteration.arena_bytes / MiB:.2f} MiB")
    for name in ("forward", "backward"):
        level1 = iteration.level1[f"block0.{name}"]
        lines.append(f"  level 1, one block's {name}: {_facts(level1)}")
    level2 = iteration.level2
    lines.append(f"  level 2, the iteration ({len(level2.tensors)} blocks and tensors): {_facts(level2)}")
    lines.append(f"  solved in {plan.solve_s:.2f} s")
    return "\n".join(lines)


def _facts(plan) -> str:
    return (
        f"peak {plan.peak_bytes / MiB:.2f} MiB (lower bound {plan.lower_bound_bytes / MiB:.2f}), {plan.method}, "
        f"gap {plan.gap * 100:.1f}%, {plan.solve_time_s:.2f} s"
    )
