"""Two device buffers that swapped activations are restored into (one with
activation_memory.restore_buffers 1), reserved when a backward starts and let go when it ends:
between backward passes the memory serves the forward and the loss's backward (the step's peak,
with the logits' gradient), which never restore.

Block calls that restore from host memory alternate between the buffers in forward order, so
backward restores the next block (prefetch) into one buffer while the current block reads the
other; with one buffer a block is restored once the block after it has finished. Within a
buffer, a block's restored tensors sit at offsets planned by dynamic storage allocation
(planner.solve_dsa) from their sizes and lifetimes; plans are cached per problem, in memory and,
with a cache directory, as JSON (planner.PlanCache). A buffer is reused only after
the block that used it is released (see manager.py), so no copy overwrites tensors in use. A
block whose buffer is still in use restores into memory from the allocator instead.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from planner import DsaConfig, OffsetPlan, PlanCache, TensorLifetime, device_name, plan_key, solve_dsa

if TYPE_CHECKING:
    from zerokit.activations.record import BlockRecord

ALIGNMENT = 512  # bytes; every restored tensor starts at a multiple of this


class RestoreArena:
    def __init__(self, device: torch.device, model: nn.Module, cache: Optional[PlanCache]):
        self.device = device
        self.model = model
        self.cache = cache
        self.buffers: list[Optional[torch.Tensor]] = [None, None]
        self.owners: list[Optional["BlockRecord"]] = [None, None]
        self._plans: dict[tuple, OffsetPlan] = {}

    def plan(self, tensors: Sequence[TensorLifetime], hidden_shape: Sequence[int], dtype: torch.dtype) -> OffsetPlan:
        """Offsets for one block call's restored tensors."""
        problem = tuple((t.name, t.size, t.start, t.end) for t in tensors)
        plan = self._plans.get(problem)
        if plan is None:
            make = lambda: solve_dsa(tensors, DsaConfig(alignment=ALIGNMENT, time_limit_s=5.0))  # noqa: E731
            if self.cache is None:
                plan = make()
            else:
                key = plan_key(self.model, [list(hidden_shape)], dtype, device_name(self.device),
                               extra={"activation_restore": [list(p) for p in problem]})
                plan = self.cache.load_or_make(key, make)
            self._plans[problem] = plan
        return plan

    def reserve(self, sizes: Sequence[int]) -> None:
        """Allocate buffer p of sizes[p] bytes (none when 0), once per backward, after clear()."""
        assert self.buffers == [None, None], "restore buffers reserved twice in one backward"
        self.buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) if size > 0 else None for size in sizes]

    def clear(self) -> None:
        """Let both buffers go (none may be owned): the allocator reuses the memory until the next reserve."""
        assert self.owners == [None, None], "restore buffers let go while a block still reads one"
        self.buffers = [None, None]

    def is_free(self, parity: int) -> bool:
        return self.owners[parity] is None

    def claim(self, parity: int, record: "BlockRecord", size: int) -> bool:
        """Give buffer `parity` to `record` if it is free (or already the record's) and large enough."""
        buffer = self.buffers[parity]
        if self.owners[parity] not in (None, record) or buffer is None or buffer.numel() < size:
            return False
        self.owners[parity] = record
        return True

    def release(self, record: "BlockRecord") -> None:
        for parity, owner in enumerate(self.owners):
            if owner is record:
                self.owners[parity] = None

    def tensor(
        self, parity: int, offset: int, shape: Sequence[int], stride: Sequence[int], dtype: torch.dtype
    ) -> torch.Tensor:
        """A tensor of `shape` and `stride` at byte `offset` of buffer `parity`."""
        element = dtype.itemsize
        elements = 1 + sum((size - 1) * s for size, s in zip(shape, stride)) if all(shape) else 0
        region = self.buffers[parity].narrow(0, offset, max(elements, 1) * element).view(dtype)
        return region.as_strided(tuple(shape), tuple(stride))

    def nbytes(self) -> int:
        return sum(buffer.numel() for buffer in self.buffers if buffer is not None)
