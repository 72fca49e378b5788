"""ZeRO stages as a policy of the one sharding mechanism.

Every stage flattens each sharding unit's parameters into one padded buffer split evenly
across ranks, reduces gradients into fp32 shards and steps the optimizer over those shards.
The stage only decides three things:

| stage | optimizer states | gradients reduced            | parameters between uses |
|-------|------------------|------------------------------|-------------------------|
| 0     | replicated       | all-reduce at the boundary   | gathered                |
| 1     | sharded          | reduce-scatter at boundary   | gathered                |
| 2     | sharded          | reduce-scatter every backward| gathered                |
| 3     | sharded          | reduce-scatter every backward| sharded (freed)         |

[Note: partial optimizer offload]
offload_optimizer.ratio < 1 offloads the optimizer of some sharding units only (ZeRO-Offload++'s
Twin-Flow); the others keep fp32 masters, moments and gradient shards on the device and are
stepped there, exactly as without offload. The units a forward uses first stay on the device:
their new parameters are the first the next forward needs, so it starts while the CPU still
steps the later ones. Units are placed whole, from the last in forward order backwards, until
the offloaded elements come closest to ratio x all trainable elements (at least one unit). The
choice depends only on the units' sizes, which every rank shares.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

from zerokit.config import OffloadOptimizerConfig, OffloadParamConfig, ZeroConfig
from zerokit.zero.units import in_forward_order


@dataclass(frozen=True)
class ShardingPolicy:
    shard_optimizer: bool
    # Reduce in every backward (gradients stay sharded between micro-steps) instead of letting
    # unsharded gradients accumulate until the accumulation boundary.
    reduce_every_backward: bool
    shard_parameters: bool
    # Stage 3: units smaller than this stay gathered.
    persistence_threshold: int
    prefetch_numel: int
    max_live_numel: int
    reduce_in_flight_numel: int

    @classmethod
    def from_config(cls, zero: ZeroConfig) -> "ShardingPolicy":
        return cls(
            shard_optimizer=zero.stage >= 1,
            reduce_every_backward=zero.stage >= 2 and not zero.reduce_at_boundary_only,
            shard_parameters=zero.stage == 3,
            persistence_threshold=zero.stage3_param_persistence_threshold,
            prefetch_numel=zero.stage3_prefetch_bucket_size,
            max_live_numel=zero.stage3_max_live_parameters,
            reduce_in_flight_numel=zero.reduce_bucket_size,
        )

    def keeps_gathered(self, unit_numel: int) -> bool:
        return not self.shard_parameters or unit_numel < self.persistence_threshold


@dataclass(frozen=True)
class OffloadPolicy:
    """Where this rank's states live besides the device: the optimizer's (fp32 masters and Adam
    moments, with gradients landing in host memory) and the parameter shards' (stage 3)."""

    optimizer: OffloadOptimizerConfig = field(default_factory=OffloadOptimizerConfig)
    params: OffloadParamConfig = field(default_factory=OffloadParamConfig)
    host_memory_budget: Optional[int] = None

    @classmethod
    def from_config(cls, zero: ZeroConfig) -> "OffloadPolicy":
        return cls(zero.offload_optimizer, zero.offload_param, zero.host_memory_budget)

    @property
    def offloads_optimizer(self) -> bool:
        return self.optimizer.device != "none"

    @property
    def offloads_params(self) -> bool:
        return self.params.device != "none"

    @property
    def active(self) -> bool:
        return self.offloads_optimizer or self.offloads_params

    def optimizer_offloaded(self, trainable_numels: Sequence[int]) -> list[bool]:
        """Per sharding unit, listed as plan_units lists them and given by its trainable elements:
        whether its optimizer is offloaded. See [Note: partial optimizer offload]."""
        if not self.offloads_optimizer:
            return [False] * len(trainable_numels)
        forward = in_forward_order(range(len(trainable_numels)))
        count = offloaded_unit_count([trainable_numels[i] for i in forward], self.optimizer.ratio)
        offloaded = set(forward[len(forward) - count :])
        return [index in offloaded for index in range(len(trainable_numels))]


def offloaded_unit_count(sizes: Sequence[int], ratio: float) -> int:
    """How many units, counted back from the last of `sizes` (elements per unit, in forward
    order), offload their optimizer: the boundary whose offloaded elements come closest to
    ratio x all of them (a tie offloads more), with at least one unit that has elements."""
    if not sizes:
        return 0
    offloaded = list(itertools.accumulate(reversed(sizes)))  # elements offloaded by the last 1, 2, ... units
    target = ratio * offloaded[-1]
    reached = next(count for count, total in enumerate(offloaded, 1) if total >= target)
    below = offloaded[reached - 2] if reached > 1 else 0
    if below > 0 and target - below < offloaded[reached - 1] - target:
        return reached - 1
    return reached
