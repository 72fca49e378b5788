"""Policies that keep everything, or recompute everything (activation checkpointing)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zerokit.activations.inputs import BlockInputs
from zerokit.activations.record import BlockRecord
from zerokit.activations.rerun import EnoughSaved, ForwardState, rerun
from zerokit.activations.slots import SavedSlot, Storage

if TYPE_CHECKING:
    from zerokit.activations.manager import ActivationManager, ManagedBlock

_SAME_WORK = (
    "recomputation needs a forward that does the same work every time (no branches on data or state that "
    "changed in between)."
)


class KeepRecord(BlockRecord):
    """Autograd keeps the block's saved tensors as usual: no hooks, nothing to report."""

    policy = "keep"

    def enter(self) -> None:
        pass


class RecomputeRecord(BlockRecord):
    """Keeps the block's inputs and drops everything else it saves; just before the block's
    backward its forward runs again (same random state and autocast) to recreate them."""

    policy = "recompute"

    def __init__(self, manager: "ActivationManager", block: "ManagedBlock", inputs: BlockInputs, sequence: int):
        super().__init__(manager, block, inputs, sequence)
        self.forward_state = ForwardState.capture(manager.device)
        self.inputs = self.hold(inputs)

    def hold(self, inputs: BlockInputs) -> BlockInputs:
        """Keep what the block runs again from: here its inputs, on the device."""
        self.share([leaf for leaf in inputs.leaves if isinstance(leaf, torch.Tensor)])
        if inputs.hidden.device == self.manager.device:
            self.account("kept", inputs.hidden)
        return inputs

    def pack(self, tensor: torch.Tensor) -> SavedSlot:
        index = self.next_index()
        kept = self.keep_if_shared(index, tensor)
        if kept is not None:
            return kept
        self.account("dropped", tensor)
        return self.new_slot(index, tensor, Storage.DROPPED)

    def complete(self) -> None:
        wanted = {s.index: s for s in self.live_slots() if s.storage is Storage.DROPPED and s.restored is None}
        if wanted:
            self.recompute(wanted)

    def recompute(self, wanted: dict[int, SavedSlot]) -> None:
        """Run the forward again until the last `wanted` slot is saved, and fill the slots."""
        last = max(wanted)

        def keep(index: int, tensor: torch.Tensor) -> None:
            slot = wanted.get(index)
            if slot is not None:
                if tensor.shape != slot.shape or tensor.dtype != slot.dtype:
                    raise RuntimeError(
                        f"block {self.block.name} saved tensor {index} as {tuple(slot.shape)} {slot.dtype} in its "
                        f"forward but {tuple(tensor.shape)} {tensor.dtype} when run again; {_SAME_WORK}"
                    )
                slot.restored = tensor
            if index == last:
                raise EnoughSaved  # what follows (the last projection, the residual) saves nothing wanted

        args, kwargs = self.inputs.rebuild(self.inputs.hidden)
        with self.manager.suspended():
            count = rerun(self.block.module, args, kwargs, self.forward_state, keep)
        if count is not None:
            check_same_count(self.block.name, self._count, count)


def check_same_count(block_name: str, forward: int, again: int) -> None:
    if forward != again:
        raise RuntimeError(
            f"block {block_name} saved {forward} tensors for backward in its forward but {again} when run again; "
            f"{_SAME_WORK}"
        )
