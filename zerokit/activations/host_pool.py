"""Pinned host tensors for swapped activations, reused from one iteration to the next.

Allocating pinned memory (cudaHostAlloc) costs milliseconds per call and synchronizes the device,
so a step that allocates its swap space anew stalls the GPU; torch's pinned cache does not get
its blocks back reliably in time either (they wait on events of copies). Each host tensor lent
here belongs to a block record; once that record is gone (its graph was freed: the tensor's
contents are no longer needed) the tensor goes to the next record that asks for one of its
layout. Stream order needs nothing more: a record's copies back to the device finished before
its block's backward ran, and a new copy to host waits for the compute stream. A request that
finds no free tensor of its layout means the shapes changed (another sequence length): the free
tensors of every layout are let go then, so the pool holds at most what is in use plus one
iteration's worth.
"""
from __future__ import annotations

import collections
import weakref
from typing import Any

import torch

from zerokit.activations.tensors import empty_like_layout, is_dense


class PinnedHostPool:
    def __init__(self, pin: bool):
        self.pin = pin
        # Per layout, the tensors whose owner is gone: an owner's finalizer hands its tensors back.
        self._free: dict[tuple, list[torch.Tensor]] = collections.defaultdict(list)
        self._lent: weakref.WeakKeyDictionary[Any, list[tuple[tuple, torch.Tensor]]] = weakref.WeakKeyDictionary()
        self._held_bytes = 0

    @staticmethod
    def _layout(tensor: torch.Tensor) -> tuple:
        return tuple(tensor.shape), tuple(tensor.stride()) if is_dense(tensor) else None, tensor.dtype

    def take(self, like: torch.Tensor, owner: Any) -> torch.Tensor:
        """A host tensor laid out as empty_like_layout(like) would be, lent to `owner` until
        the owner is garbage."""
        layout = self._layout(like)
        free = self._free[layout]
        if free:
            host = free.pop()
        else:
            for tensors in self._free.values():  # the shapes changed: let go of every free tensor
                self._held_bytes -= sum(host.untyped_storage().nbytes() for host in tensors)
                tensors.clear()
            host = empty_like_layout(like, device="cpu", pin_memory=self.pin)
            self._held_bytes += host.untyped_storage().nbytes()
        lent = self._lent.get(owner)
        if lent is None:  # one finalizer per owner: they cost more than the rest of a take
            lent = self._lent[owner] = []
            weakref.finalize(owner, self._give_back, lent)
        lent.append((layout, host))
        return host

    def _give_back(self, lent: list[tuple[tuple, torch.Tensor]]) -> None:
        for layout, host in lent:
            self._free[layout].append(host)

    def nbytes(self) -> int:
        """Bytes held: lent and free."""
        return self._held_bytes
