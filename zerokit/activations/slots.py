"""What a block's pack hook hands autograd in place of a saved tensor."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from zerokit.activations.record import BlockRecord


class Storage(enum.Enum):
    KEPT = "kept"  # referenced on the device: parameters, shared inputs, tensors on another device
    HOST = "host"  # copied to host memory in full
    VIEW = "view"  # a view of a source (hidden input, attention output) copied to host in full
    SPLIT = "split"  # a fraction of its tokens copied to host, the others recomputed
    DROPPED = "dropped"  # recomputed in full


class SavedSlot:
    """One saved tensor of one block call. The graph owns its slots (so a slot and its host copy
    go when the graph does); the block record refers to them weakly."""

    __slots__ = ("record", "index", "storage", "shape", "dtype", "reference", "host", "source", "view", "restored",
                 "__weakref__")

    def __init__(self, record: "BlockRecord", index: int, tensor: torch.Tensor, storage: Storage):
        self.record = record
        self.index = index  # the order autograd saved it in during the block's forward
        self.storage = storage
        self.shape = tensor.shape
        self.dtype = tensor.dtype
        self.reference: Optional[torch.Tensor] = None  # KEPT
        self.host: Optional[torch.Tensor] = None  # HOST: the copy; SPLIT: the swapped token rows
        self.source: Optional[int] = None  # VIEW: index of the record's source
        # VIEW: size, stride and storage offset relative to the source
        self.view: Optional[tuple[tuple[int, ...], tuple[int, ...], int]] = None
        self.restored: Optional[torch.Tensor] = None  # on the device, between materialize and release

def unpack_slot(slot: SavedSlot) -> torch.Tensor:
    """The unpack hook: the slot's tensor, made ready on the device if it is not yet."""
    return slot.record.unpack(slot)
