"""Bytes of model states per rank, known before anything is allocated.

One implementation of the arithmetic serves the engine's early check (`check_fits`) and
`zerokit estimate`: both call `model_state_bytes` on the sharding units of the model (real or
on the meta device). It follows the flat layout of `flat_group.layout` (aligned offsets, the
buffer padded to a multiple of the number of shards) and what `FlatParamGroup` keeps:

| held by a rank                   | kept gathered (stages 0-2, small units) | sharded (stage 3) |
|----------------------------------|-----------------------------------------|-------------------|
| parameters (compute dtype)       | padded buffer                           | frozen shard only |
| fp32 master weights (trainable)  | shard, or nothing if it aliases fp32 params | shard         |
| fp32 reduced gradients           | shard after the unit's backward         | shard             |
| optimizer states (Adam-like)     | two fp32 moments per owned element and one fp32 step per piece |  |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from zerokit.zero.flat_group import ShardingContext, layout
from zerokit.zero.policy import ShardingPolicy
from zerokit.zero.units import UnitSpec

GiB = 1024**3
FP32_BYTES = 4
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32 per owned element
STEP_BYTES = 4  # one fp32 step count per optimizer piece


@dataclass(frozen=True)
class UnitStateBytes:
    """What one sharding unit adds, per rank."""

    name: str
    full_bytes: int  # every parameter of the unit gathered, compute dtype, padded
    shard_bytes: int  # this rank's shard of the unit in compute dtype (the all-gather source)
    gradient_bytes: int  # fp32 reduced gradient shard, held from the unit's backward to the step
    reduce_buffer_bytes: int  # the flat buffer of one reduction of the unit, in reduce dtype
    keeps_gathered: bool
    is_root: bool


@dataclass(frozen=True)
class ModelStateBytes:
    """Per-rank bytes of model states; `gathered` is stage 3's working set of gathered units
    (the root, which stays gathered from forward to backward, plus the largest unit in use and
    one prefetched). Activations are not included."""

    parameters: int
    master_weights: int
    gradients: int
    optimizer_states: int
    gathered: int
    units: tuple[UnitStateBytes, ...]

    def as_dict(self) -> dict[str, int]:
        return {
            "parameters": self.parameters,
            "master_weights": self.master_weights,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "gathered_units": self.gathered,
        }

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())


def model_state_bytes(
    specs: Sequence[UnitSpec],
    policy: ShardingPolicy,
    compute_dtype: torch.dtype,
    num_shards: int,
    shard_index: Optional[int] = None,
    reduce_dtype: torch.dtype = torch.float32,
) -> ModelStateBytes:
    """Model-state bytes of rank `shard_index`, or of the rank holding the most when None
    (ranks differ only by which parameters' alignment padding falls in their shard)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    compute = _element_size(compute_dtype)
    reduce = _element_size(reduce_dtype)
    parameters = master = gradients = 0
    owned = [0] * num_shards  # trainable elements each rank steps
    pieces = [0] * num_shards  # optimizer pieces (parameters with elements in the shard) per rank
    units = []
    for spec in specs:
        keep = policy.keeps_gathered(sum(p.numel() for _, p in spec.params))
        unit_full = unit_shard = unit_grads = unit_reduce = 0
        for trainable in (True, False):
            params = [(name, p) for name, p in spec.params if p.requires_grad == trainable]
            if not params:
                continue
            slots, shard_numel = layout(params, num_shards)
            padded = shard_numel * num_shards
            unit_full += padded * compute
            unit_shard += shard_numel * compute
            if keep:
                parameters += padded * compute
            elif not trainable:
                parameters += shard_numel * compute  # the frozen shard the gathers start from
            if trainable:
                aliased = compute_dtype == torch.float32 and keep
                master += 0 if aliased else shard_numel * FP32_BYTES
                unit_grads += shard_numel * FP32_BYTES
                unit_reduce += padded * reduce
                _add_owned([(s.offset, s.numel) for s in slots], shard_numel, owned, pieces)
        gradients += unit_grads
        units.append(UnitStateBytes(
            name=spec.name or "<root>",
            full_bytes=unit_full,
            shard_bytes=unit_shard,
            gradient_bytes=unit_grads,
            reduce_buffer_bytes=unit_reduce,
            keeps_gathered=keep,
            is_root=spec.name == "",
        ))  # fmt: skip
    per_rank = [ADAM_MOMENTS * FP32_BYTES * o + STEP_BYTES * p for o, p in zip(owned, pieces)]
    optimizer = per_rank[shard_index] if shard_index is not None else max(per_rank)
    return ModelStateBytes(parameters, master, gradients, optimizer, _gathered(units), tuple(units))


def _gathered(units: Sequence[UnitStateBytes]) -> int:
    sharded = [u for u in units if not u.keeps_gathered]
    root = sum(u.full_bytes for u in sharded if u.is_root)
    blocks = sorted((u.full_bytes for u in sharded if not u.is_root), reverse=True)
    return root + sum(blocks[:2])


def _add_owned(slots: list[tuple[int, int]], shard_numel: int, owned: list[int], pieces: list[int]) -> None:
    """Add, per rank, the elements of `slots` (offset, numel) inside its shard and the number of
    slots that reach into it: exactly the pieces `FlatParamGroup` hands the optimizer."""
    for offset, numel in slots:
        if numel == 0:
            continue
        end = offset + numel
        for rank in range(offset // shard_numel, (end - 1) // shard_numel + 1):
            start, stop = rank * shard_numel, (rank + 1) * shard_numel
            owned[rank] += min(end, stop) - max(offset, start)
            pieces[rank] += 1


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_fits(specs: list[UnitSpec], policy: ShardingPolicy, ctx: ShardingContext, stage: int) -> None:
    """Fail before allocating anything if the model states alone cannot fit on the GPU."""
    if ctx.device.type != "cuda":
        return
    need = model_state_bytes(specs, policy, ctx.compute_dtype, ctx.num_shards, ctx.shard_index, ctx.reduce_dtype)
    free, _ = torch.cuda.mem_get_info(ctx.device)
    if need.total > free:
        detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in need.as_dict().items())
        advice = (
            f"raise zero_optimization.stage to {stage + 1}"
            if stage < 3
            else "use more GPUs (ZeRO-3 divides states by their number)"
        )
        raise torch.OutOfMemoryError(
            f"model states need {need.total / GiB:.2f} GiB per rank ({detail} GiB) but {ctx.device} has "
            f"{free / GiB:.2f} GiB free, before any activation: {advice}, or use bf16."
        )
