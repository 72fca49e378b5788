"""The few collectives the sharding engine issues, over one process group.

A world of one needs no process group: every collective becomes a local copy or a no-op, so a
plain `python train.py` runs the same code as `torchrun`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# torch >= 2.12 renamed the flat collectives; older releases only have the *_tensor names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Collectives:
    def __init__(self, group: Optional[dist.ProcessGroup], rank: int, world_size: int):
        self.group = group
        self.rank = rank
        self.world_size = world_size

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor) -> None:
        """output[r*n:(r+1)*n] = shard of rank r; `shard` may be that slice of `output` itself."""
        if self.world_size == 1:
            if shard.data_ptr() != output.data_ptr():
                output.copy_(shard)
            return
        _all_gather_flat(output, shard, group=self.group)

    def reduce_scatter(self, output: torch.Tensor, flat: torch.Tensor) -> None:
        """output = sum over ranks of flat[rank*n:(rank+1)*n]."""
        if self.world_size == 1:
            output.copy_(flat)
            return
        _reduce_scatter_flat(output, flat, op=dist.ReduceOp.SUM, group=self.group)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op, group=self.group)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        if self.world_size > 1:
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group)
