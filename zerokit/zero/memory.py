"""Bytes of model states per rank, known before anything is allocated."""
from __future__ import annotations

import torch

from zerokit.zero.flat_group import ShardingContext
from zerokit.zero.policy import ShardingPolicy
from zerokit.zero.units import UnitSpec

GiB = 1024**3


def model_state_bytes(specs: list[UnitSpec], policy: ShardingPolicy, ctx: ShardingContext) -> dict[str, int]:
    """Per-rank bytes of parameters, fp32 master weights, fp32 reduced gradients and Adam-like
    optimizer states (two fp32 moments); activations are not included."""
    compute = torch.empty((), dtype=ctx.compute_dtype).element_size()
    shards = ctx.num_shards
    totals = {"parameters": 0, "master_weights": 0, "gradients": 0, "optimizer_states": 0}
    largest_sharded_unit = 0
    for spec in specs:
        trainable = sum(p.numel() for _, p in spec.params if p.requires_grad)
        numel = sum(p.numel() for _, p in spec.params)
        keep = policy.keeps_gathered(numel)
        totals["parameters"] += numel * compute if keep else numel // shards * compute
        if not keep:
            largest_sharded_unit = max(largest_sharded_unit, numel)
        master_aliased = ctx.compute_dtype == torch.float32 and keep
        totals["master_weights"] += 0 if master_aliased else trainable // shards * 4
        totals["gradients"] += trainable // shards * 4
        totals["optimizer_states"] += 2 * trainable // shards * 4
    # one unit in use and one prefetched
    totals["gathered_units"] = 2 * largest_sharded_unit * compute
    return totals


def check_fits(specs: list[UnitSpec], policy: ShardingPolicy, ctx: ShardingContext, stage: int) -> None:
    """Fail before allocating anything if the model states alone cannot fit on the GPU."""
    if ctx.device.type != "cuda":
        return
    need = model_state_bytes(specs, policy, ctx)
    total = sum(need.values())
    free, _ = torch.cuda.mem_get_info(ctx.device)
    if total > free:
        detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in need.items())
        advice = (
            f"raise zero_optimization.stage to {stage + 1}" if stage < 3 else "use more GPUs (ZeRO-3 divides states by their number)"
        )
        raise torch.OutOfMemoryError(
            f"model states need {total / GiB:.2f} GiB per rank ({detail} GiB) but {ctx.device} has "
            f"{free / GiB:.2f} GiB free, before any activation: {advice}, or use bf16."
        )
