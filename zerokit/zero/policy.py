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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from zerokit.config import OffloadOptimizerConfig, OffloadParamConfig, ZeroConfig


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
