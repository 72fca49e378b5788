"""A group's reduced gradient shard in pinned host memory, where the offloaded optimizer reads it.

Each reduction's output is copied device-to-host on the to-host stream as soon as the reduce
stream has produced it (overlapping the rest of the backward); the device buffer is then freed
like any reduction buffer, once the compute stream has waited on the copy (zero/streams.py).
The first reduction of an accumulation window lands in the shard itself, already scaled in
fp32 on the device exactly as the engine does without offload; later ones land in pooled
buffers and are added on the host, in the order they were reduced, with the same scale.

Gradients travel in fp32 (not compute dtype): accumulation, clipping and the optimizer then see
the very values the engine sees without offload, at twice the bytes of bf16 per copy, copies
that overlap the backward.

Under the delayed parameter update the CPU steps with one window's gradients while the next
window's arrive: `rotate` hands the shard to the step and receives into a second one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from offload.copy_engine import CopyHandle

if TYPE_CHECKING:
    from zerokit.zero.offload_resources import OffloadResources


class HostGradients:
    def __init__(self, numel: int, resources: "OffloadResources"):
        self.resources = resources
        self.buffer = self._new_shard(numel, "gradient shard")
        # The delayed parameter update steps one shard while the next window fills the other; both
        # are taken here, so host memory runs out (if it does) at start-up, where the plan counts them.
        delayed = resources.policy.optimizer.delayed_parameter_update_after is not None
        self._spare = self._new_shard(numel, "second gradient shard") if delayed else None
        self.reductions = 0  # reductions of the current accumulation window sent here
        # The shard's 2-norm, computed on the device while it was the window's only reduction.
        self.device_norm: Optional[torch.Tensor] = None
        # Copies in flight, in reduction order: (fence, pooled buffer to add or None, its scale).
        self._arrivals: list[tuple[CopyHandle, Optional[torch.Tensor], Optional[torch.Tensor], float]] = []

    def prepare(self, reduced: torch.Tensor, scale: float) -> torch.Tensor:
        """On the reduce stream, after the reduction: the device tensor to copy to the host."""
        self.reductions += 1
        if self.reductions > 1:
            self.device_norm = None
            return reduced  # scaled when added on the host, as grad_shard.add_(reduced, alpha=scale)
        outgoing = reduced.float() if reduced.dtype != torch.float32 else reduced
        if scale != 1.0:
            outgoing.mul_(scale)
        self.device_norm = torch.linalg.vector_norm(outgoing)
        return outgoing

    def send(self, outgoing: torch.Tensor, scale: float, after: Optional[torch.cuda.Event]) -> CopyHandle:
        """Queue the device-to-host copy of `outgoing` after the event `after` (the reduction);
        returns its fence. `outgoing` must stay referenced until the compute stream waited on it."""
        streams = self.resources.streams
        self.settle(wait=False)
        raw = None
        if self.reductions == 1:
            target = self.buffer
        else:
            raw = self.resources.gradient_staging(outgoing.numel() * outgoing.element_size())
            target = raw.view(outgoing.dtype)
        with streams.side(streams.to_host):
            streams.wait(after)
            target.copy_(outgoing, non_blocking=True)
            fence = streams.fence(streams.to_host)
        self._arrivals.append((fence, raw, target if raw is not None else None, scale))
        return fence

    def settle(self, wait: bool = True) -> None:
        """Finish arrived copies (all of them if `wait`): add pooled ones into the shard."""
        while self._arrivals:
            fence, raw, staged, scale = self._arrivals[0]
            if not wait and not fence.done():
                return
            fence.wait()
            self._arrivals.pop(0)
            if staged is not None:
                self.buffer.add_(staged, alpha=scale)
                self.resources.gradient_pool.release(raw)

    def _new_shard(self, numel: int, label: str) -> torch.Tensor:
        return self.resources.host_tensor(numel, torch.float32, "gradients", self.resources.pin_optimizer, label)

    def rotate(self) -> None:
        """Receive the next window's gradients in the other shard (this one is being stepped)."""
        assert self._spare is not None, "gradient shards rotate only under the delayed parameter update"
        self.buffer, self._spare = self._spare, self.buffer

    def clear(self) -> None:
        """End of the accumulation window: the shard's contents are stale from now on."""
        self.settle()
        self.reductions = 0
        self.device_norm = None
