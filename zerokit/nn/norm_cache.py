"""Per-sample cache of output-gradient norms ‖∇Z_i‖, the second factor of WTA-CRS's row probabilities.

Each WTA-CRS layer owns a slot. For every sample index the data loader provides, a slot holds
one value per token of that sample (the norms of its ∇Z rows from the last backward that saw
it). Values live on the CPU in bfloat16 (3 significant digits are plenty for a sampling weight,
and bfloat16 has float32's range, so loss-scaled fp16 gradients do not overflow it).

Memory, in host RAM: 2 bytes × tokens per sample × samples seen × WTA-CRS layers that draw their
own sample (of layers reading one input, such as q/k/v, only the first one caches norms).
- ``dataset_size`` given: one preallocated (dataset_size × tokens) tensor per layer, created at
  that layer's first backward; every sample must then have the same number of tokens.
- ``dataset_size`` None: a dict per layer from sample index to a tensor of that sample's tokens;
  it grows with the samples seen, plus about 600 bytes of bookkeeping per entry (measured:
  a tensor object and a dict slot), and allows samples of different lengths. Prefer
  ``dataset_size`` for large data sets.
Example: fine-tuning on 400 k samples of 128 tokens with 12 Llama-style blocks converted (7
linears each, of which q, o, gate and down draw their own sample): 2 × 128 × 4e5 × 48 ≈ 4.9 GB.
For much larger data sets convert fewer layers or give no sample indices (then nothing is cached
and p_i ∝ ‖H_i‖).

Writes from backward are staged and applied at the next batch boundary, so within one batch
every read (a forward, and a checkpointed recomputation of it) sees the same values.

[Note: no host synchronisation]
Norms cross between host and device without making the host wait for the device's queue: each
layer's backward only computes its norms on the device; when the backward pass ends, one copy
of all of them to pinned host memory starts and records an event (a layer at a time, the copies
cost more host time than the layers' matmuls). The next batch boundary waits for that event only
(the backward's kernels, not the optimizer step queued after them). Lookups go to the device
from pinned memory, asynchronously.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

_STORE_DTYPE = torch.bfloat16


class _Recorded(NamedTuple):
    slot: int
    indices: Tensor
    norms: Tensor  # (len(indices), tokens), where the backward computed them
    stream: Optional[torch.cuda.Stream]  # that computed them (None on the CPU)


class _StagedNorms(NamedTuple):
    recorded: list[tuple[int, Tensor, torch.Size]]  # slot, indices and shape of each part of ``norms``
    norms: Tensor  # on the CPU in _STORE_DTYPE, written once ``copied`` has completed
    copied: Optional[torch.cuda.Event]


def _start_copy_to_host(recorded: list[_Recorded]) -> tuple[Tensor, Optional[torch.cuda.Event]]:
    """A host copy of the recorded norms, flattened, in _STORE_DTYPE, and the event after which it
    is written (None: now)."""
    device = recorded[0].norms.device
    if device.type != "cuda":
        return torch.cat([r.norms.reshape(-1) for r in recorded]).to("cpu", _STORE_DTYPE), None
    stream = recorded[0].stream
    for other in {r.stream for r in recorded} - {stream}:
        stream.wait_stream(other)
    with torch.cuda.stream(stream):
        norms = torch.cat([r.norms.reshape(-1) for r in recorded]).to(_STORE_DTYPE)
        host = torch.empty(norms.shape, dtype=_STORE_DTYPE, pin_memory=True)
        host.copy_(norms, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(stream)
    return host, copied


def _check_same_length(store: Tensor, tokens: int) -> None:
    if store.shape[1] != tokens:
        raise ValueError(
            f"the gradient-norm cache holds {store.shape[1]} tokens per sample but this batch has {tokens}: with "
            "dataset_size set every sample must have the same length (use dataset_size=None for samples of "
            "varying length)"
        )


class GradNormCache:
    """Per-layer, per-sample, per-token ‖∇Z‖ from the last time each sample was seen."""

    def __init__(self, dataset_size: Optional[int] = None) -> None:
        if dataset_size is not None and (not isinstance(dataset_size, int) or dataset_size < 1):
            raise ValueError(f"dataset_size must be a positive int or None, got {dataset_size!r}")
        self.dataset_size = dataset_size
        self._slot_count = 0
        self._stores: dict[int, Union[Tensor, dict[int, Tensor]]] = {}
        self._recorded: list[_Recorded] = []  # by the running backward pass
        self._staged: list[_StagedNorms] = []

    def new_slot(self) -> int:
        """Reserve the storage key of one more layer."""
        self._slot_count += 1
        return self._slot_count - 1

    def check_indices(self, indices: Tensor) -> None:
        if self.dataset_size is not None and indices.numel() and int(indices.max()) >= self.dataset_size:
            raise ValueError(
                f"sample index {int(indices.max())} is out of range for the gradient-norm cache of dataset_size="
                f"{self.dataset_size}; pass the data set's length as dataset_size (or None for a growing cache)"
            )

    def lookup(self, slot: int, indices: Tensor, tokens: int, pinned: bool = False) -> Optional[Tensor]:
        """(len(indices), tokens) norms on the CPU in the store's bfloat16, 0 where unknown; None if
        the slot is empty. ``pinned``: in pinned memory, ready for an asynchronous copy to a GPU."""
        store = self._stores.get(slot)
        if store is None:
            return None
        out = torch.empty(len(indices), tokens, dtype=_STORE_DTYPE, pin_memory=pinned)
        if isinstance(store, Tensor):
            _check_same_length(store, tokens)
            return torch.index_select(store, 0, indices, out=out)
        unknown = None
        rows = []
        for index in indices.tolist():
            norms = store.get(index)
            if norms is None or norms.numel() != tokens:  # another length: treat as unseen
                norms = unknown = torch.zeros(tokens, dtype=_STORE_DTYPE) if unknown is None else unknown
            rows.append(norms)
        return torch.stack(rows, out=out)

    def record(self, slot: int, indices: Tensor, norms: Tensor) -> None:
        """Stage (len(indices), tokens) norms computed in backward; applied by commit()."""
        if norms.is_meta:  # shapes without values: nothing to remember
            return
        if not self._recorded:
            try:  # one copy to the host for the whole backward pass, started when it ends (as FSDP hooks it)
                torch.autograd.Variable._execution_engine.queue_callback(self._copy_recorded)
            except RuntimeError:  # not inside a backward pass: commit() copies them
                pass
        stream = torch.cuda.current_stream(norms.device) if norms.is_cuda else None
        self._recorded.append(_Recorded(slot, indices, norms.detach(), stream))

    def _copy_recorded(self) -> None:
        recorded, self._recorded = self._recorded, []
        if recorded:
            parts = [(r.slot, r.indices, r.norms.shape) for r in recorded]
            self._staged.append(_StagedNorms(parts, *_start_copy_to_host(recorded)))

    def commit(self) -> None:
        """Apply staged norms (called at batch boundaries)."""
        self._copy_recorded()
        staged, self._staged = self._staged, []
        for recorded, all_norms, copied in staged:
            if copied is not None:
                copied.synchronize()
            parts = all_norms.split([shape.numel() for _, _, shape in recorded])
            for (slot, indices, shape), norms in zip(recorded, parts):
                self._store(slot, indices, norms.view(shape))

    def _store(self, slot: int, indices: Tensor, norms: Tensor) -> None:
        if self.dataset_size is None:
            store = self._stores.setdefault(slot, {})
            for index, row in zip(indices.tolist(), norms):
                store[index] = row.clone()  # own storage: a view would pin the whole batch
            return
        store = self._stores.get(slot)
        if store is None:
            store = self._stores[slot] = torch.zeros(self.dataset_size, norms.shape[1], dtype=_STORE_DTYPE)
        _check_same_length(store, norms.shape[1])
        store[indices] = norms

    @property
    def nbytes(self) -> int:
        """Bytes of cached norms held in host memory."""
        total = 0
        for store in self._stores.values():
            tensors = [store] if isinstance(store, Tensor) else store.values()
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total
