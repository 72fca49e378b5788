"""The swap policy: every activation a block saves goes to host memory and comes back before its
backward, into the block's restore buffer."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from zerokit.activations.inputs import BlockInputs
from zerokit.activations.record import DONE, BlockRecord, RestoreTarget
from zerokit.activations.slots import SavedSlot, Storage

if TYPE_CHECKING:
    from zerokit.activations.manager import ActivationManager, ManagedBlock


class SwapRecord(BlockRecord):
    policy = "swap"
    restores = True

    def __init__(self, manager: "ActivationManager", block: "ManagedBlock", inputs: BlockInputs, sequence: int):
        super().__init__(manager, block, inputs, sequence)
        self.share(inputs.secondary())

    def pack(self, tensor: torch.Tensor) -> SavedSlot:
        index = self.next_index()
        kept = self.keep_if_shared(index, tensor)
        if kept is not None:
            return kept
        slot = self.new_slot(index, tensor, Storage.HOST)
        slot.host = self.copy_to_host(tensor)
        return slot

    def host_slots(self) -> list[SavedSlot]:
        return [s for s in self.live_slots() if s.storage is Storage.HOST]

    def _targets_by_host(self) -> dict[int, RestoreTarget]:
        targets: dict[int, RestoreTarget] = {}
        for slot in self.host_slots():
            if id(slot.host) not in targets:
                targets[id(slot.host)] = RestoreTarget.like(f"h{slot.index}", slot.host, DONE)
        return targets

    def restore_targets(self) -> list[RestoreTarget]:
        return list(self._targets_by_host().values())

    def start_restore(self) -> Optional[torch.cuda.Event]:
        needed = [s for s in self.host_slots() if s.restored is None]
        if not needed:
            return None
        placement = self.placement()
        targets = self._targets_by_host()
        restored: dict[int, torch.Tensor] = {}
        pairs = []
        for slot in needed:
            key = id(slot.host)
            if key not in restored:
                restored[key] = placement.tensor(targets[key])
                pairs.append((restored[key], slot.host))
            slot.restored = restored[key]
        return self.manager.streams.copy_to_device(pairs, after=[self.offload_event])
