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
        self._lent: dict[tuple, list[tuple[weakref.ref, torch.Tensor]]] = collections.defaultdict(list)

    @staticmethod
    def _layout(tensor: torch.Tensor) -> tuple:
        return tuple(tensor.shape), tuple(tensor.stride()) if is_dense(tensor) else None, tensor.dtype

    def take(self, like: torch.Tensor, owner: Any) -> torch.Tensor:
        """A host tensor laid out as empty_like_layout(like) would be, lent to `owner` until
        the owner is garbage."""
        layout = self._layout(like)
        for index, (holder, host) in enumerate(self._lent[layout]):
            if holder() is None:
                self._lent[layout][index] = (weakref.ref(owner), host)
                return host
        for each in list(self._lent):
            self._lent[each] = [(holder, host) for holder, host in self._lent[each] if holder() is not None]
        lent = self._lent[layout]
        host = empty_like_layout(like, device="cpu", pin_memory=self.pin)
        lent.append((weakref.ref(owner), host))
        return host

    def nbytes(self) -> int:
        return sum(host.untyped_storage().nbytes() for lent in self._lent.values() for _, host in lent)
