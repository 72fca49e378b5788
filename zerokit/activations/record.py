"""One call of one block: the tensors its forward saved, and bringing them back for backward.

[Note: saved tensor hooks]
While a block's forward runs, autograd hands every tensor it saves for backward to the record's
pack hook, which returns a SavedSlot; in backward the unpack hook turns the slot back into a
tensor. The block's parameters (and views of them) are never copied: the ZeRO-3 engine frees and
regathers their storage, and a kept reference sees the regathered values. Secondary inputs
(masks, rotary tables, position ids) are shared by all blocks and kept as references too.

A record's life: FORWARD (its forward runs) -> STORED (activations swapped, dropped or kept per
policy) -> PREFETCHED (copies back to the device issued) -> READY (every saved tensor on the
device) -> back to STORED when released. The manager drives the transitions from module and
autograd hooks; an unpack that finds its slot not ready makes the record ready itself, so an
unusual backward order costs time, never correctness.
"""
from __future__ import annotations

import contextlib
import enum
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from planner import OffsetPlan, TensorLifetime
from zerokit.activations.inputs import BlockInputs
from zerokit.activations.slots import SavedSlot, Storage, unpack_slot
from zerokit.activations.tensors import contains, nbytes, parameter_storages, storage_ptr, view_key

if TYPE_CHECKING:
    from zerokit.activations.manager import ActivationManager, ManagedBlock

# Event times of a block's restore, for planning the restore buffer: copies in, token-wise
# recomputation, backward.
RESTORE, RECOMPUTE, BACKWARD, DONE = 0, 1, 2, 3


class RecordState(enum.Enum):
    FORWARD = "forward"
    STORED = "stored"
    PREFETCHED = "prefetched"
    READY = "ready"


@dataclass(frozen=True)
class BlockReport:
    """Where one block call's saved tensors went. Bytes count each distinct tensor once.

    kept_bytes: activations still referenced on the device (shared inputs are not counted: they
        belong to the model, not to the block); parameter_bytes: saved parameters (references);
    host_bytes: copied to host memory; dropped_bytes: dropped, to be recomputed;
    slots: saved tensors per Storage value.
    """

    block: str
    policy: str
    kept_bytes: int
    parameter_bytes: int
    host_bytes: int
    dropped_bytes: int
    slots: dict[str, int]
    swapped_tokens: Optional[int] = None
    tokens: Optional[int] = None


class BlockRecord:
    policy = ""
    restores = False  # copies tensors back from host memory (through the restore buffers)

    def __init__(self, manager: "ActivationManager", block: "ManagedBlock", inputs: BlockInputs, sequence: int):
        self.manager = manager
        self.block = block
        # no reference to the inputs here: the policies that need them keep what they need
        self.hidden_shape = tuple(inputs.hidden.shape)
        self.hidden_dtype = inputs.hidden.dtype
        self.sequence = sequence  # position among the block calls of this iteration
        self.parity: Optional[int] = None  # restore buffer, for records that restore
        self.state = RecordState.FORWARD
        self.lock = threading.RLock()  # backward may unpack from several threads
        self._slots: list[weakref.ref[SavedSlot]] = []
        self._count = 0
        self._stack: Optional[contextlib.ExitStack] = None
        self._parameters: Optional[set[int]] = None
        # Per-forward dedup by view; a view key is only the same tensor while that tensor lives
        # (its memory may be reused by a later one), hence the weak references.
        self._host_copies: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
        self._to_host: list[tuple[torch.Tensor, torch.Tensor]] = []  # (host, device) copies issued at exit
        self._offloading: list[torch.Tensor] = []  # device tensors read by copies in flight
        self._shared: list[torch.Tensor] = []  # see share()
        self._shared_storages: set[int] = set()
        self._offload_event: Optional[torch.cuda.Event] = None
        self._restore_event: Optional[torch.cuda.Event] = None
        self._in_arena = False
        self._accounted: dict[str, dict[tuple, weakref.ref]] = {"kept": {}, "parameter": {}, "host": {}, "dropped": {}}
        self._bytes = {"kept": 0, "parameter": 0, "host": 0, "dropped": 0}
        self.storage_counts: dict[str, int] = {}  # saved tensors per Storage, once the forward is done

    # -- forward -------------------------------------------------------------------------------

    def enter(self) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self.pack, unpack_slot))
        for mode in self.forward_modes():
            stack.enter_context(mode)
        self._stack = stack

    def exit(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self._issue_copies_to_host()
        self._shared, self._shared_storages = [], set()  # only needed to recognise them while packing
        self.state = RecordState.STORED
        self._host_copies.clear()  # dedup is per forward; the slots keep the copies
        for accounted in self._accounted.values():
            accounted.clear()
        self.storage_counts = {storage.value: 0 for storage in Storage}
        for slot in self.live_slots():
            self.storage_counts[slot.storage.value] += 1

    def forward_modes(self) -> list[Any]:
        return []

    def after_forward(self) -> None:
        """Checks once the forward returned normally."""

    def pack(self, tensor: torch.Tensor) -> SavedSlot:
        raise NotImplementedError

    def next_index(self) -> int:
        index = self._count
        self._count += 1
        return index

    def new_slot(self, index: int, tensor: torch.Tensor, storage: Storage) -> SavedSlot:
        slot = SavedSlot(self, index, tensor, storage)
        self._slots.append(weakref.ref(slot))
        return slot

    def share(self, tensors: list[torch.Tensor]) -> None:
        """Inputs of the block that its saved tensors may be views of and that are kept by
        reference (see keep_if_shared), until the forward ends."""
        self._shared = tensors
        self._shared_storages = {storage_ptr(t) for t in tensors}

    def keep_if_shared(self, index: int, tensor: torch.Tensor) -> Optional[SavedSlot]:
        """A KEPT slot for tensors that must not be copied: the block's parameters, views of the
        shared inputs, and tensors on another device than the model's."""
        storage = storage_ptr(tensor)
        if tensor.device != self.manager.device:
            category = "kept"
        elif storage in self.parameter_storages():
            category = "parameter"
        elif storage in self._shared_storages and any(contains(x, tensor) for x in self._shared):
            category = None  # shared input: owned by the model, not counted
        else:
            return None
        slot = self.new_slot(index, tensor, Storage.KEPT)
        slot.reference = tensor.detach()  # detached: no reference cycle through its grad_fn
        if category is not None:
            self.account(category, tensor)
        return slot

    def parameter_storages(self) -> set[int]:
        if self._parameters is None:
            self._parameters = parameter_storages(self.block.module)
        return self._parameters

    def copy_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor` (one per distinct view in this forward), filled once the
        block's forward is queued: one stream handoff per block, not per tensor, and the copies
        overlap the next block's forward."""
        key = view_key(tensor)
        known = self._host_copies.get(key)
        if known is not None and known[0]() is not None:
            return known[1]
        host = self.manager.streams.host_pool.take(tensor, owner=self)
        self._to_host.append((host, tensor))
        self._host_copies[key] = (weakref.ref(tensor), host)
        self.account("host", tensor)
        return host

    def _issue_copies_to_host(self) -> None:
        pairs, self._to_host = self._to_host, []
        if not pairs:
            return
        event = self.manager.streams.copy_to_host(pairs)
        if event is not None:
            self._offloading.extend(tensor for _, tensor in pairs)
            self._offload_event = event

    def account(self, category: str, tensor: torch.Tensor, size: Optional[int] = None) -> None:
        key = view_key(tensor)
        known = self._accounted[category].get(key)
        if known is None or known() is None:
            self._accounted[category][key] = weakref.ref(tensor)
            self._bytes[category] += nbytes(tensor) if size is None else size

    @property
    def offload_event(self) -> Optional[torch.cuda.Event]:
        """Completes every copy to host this record issued (one stream, so the last one)."""
        return self._offload_event

    def finish_offloads(self) -> None:
        """Order the compute stream after this record's copies to host, then drop the device
        tensors they read (see Note: swap stream ordering)."""
        if self._offload_event is not None:
            self.manager.streams.wait(self._offload_event)
        self._offloading.clear()

    # -- backward ------------------------------------------------------------------------------

    def live_slots(self) -> list[SavedSlot]:
        return [slot for slot in (ref() for ref in self._slots) if slot is not None]

    def restore_targets(self) -> list["RestoreTarget"]:
        """The tensors a restore writes on the device; empty for records that do not restore."""
        return []

    def restore_plan(self) -> Optional[OffsetPlan]:
        targets = self.restore_targets()
        if not targets:
            return None
        lifetimes = [TensorLifetime(t.name, max(t.nbytes, 1), RESTORE, t.end) for t in targets]
        return self.manager.arena.plan(lifetimes, self.hidden_shape, self.hidden_dtype)

    def prefetch(self) -> None:
        """Issue the copies back to the device (records that restore)."""
        with self.lock:
            if self.state is RecordState.STORED:
                self._restore_event = self.start_restore()
                self.state = RecordState.PREFETCHED

    def start_restore(self) -> Optional[torch.cuda.Event]:
        return None

    def materialize(self) -> None:
        """Make every live saved tensor available on the device."""
        with self.lock:
            if self.state is RecordState.READY and all(
                s.restored is not None for s in self.live_slots() if s.storage is not Storage.KEPT
            ):
                return
            if self.restores:
                self.manager.restore_counts["prefetched" if self.state is RecordState.PREFETCHED else "on_demand"] += 1
            if self.state is not RecordState.PREFETCHED:
                self._restore_event = self.start_restore()
            self.manager.streams.wait(self._restore_event)
            self._restore_event = None
            self.complete()
            self.state = RecordState.READY

    def complete(self) -> None:
        """Policy work after the copies: recomputation."""

    def unpack(self, slot: SavedSlot) -> torch.Tensor:
        if slot.storage is Storage.KEPT:
            return slot.reference
        with self.lock:
            if slot.restored is None:
                self.materialize()
            tensor = slot.restored
            if not self._in_arena:
                slot.restored = None  # memory from the allocator: free it once autograd used it
        if tensor is None:
            raise RuntimeError(f"block {self.block.name}: saved tensor {slot.index} could not be restored")
        return tensor

    def release(self) -> None:
        """Drop the device copies; this record's restore buffer may be reused."""
        with self.lock:
            # copies still in flight write into what is dropped: let compute work that may reuse
            # that memory wait for them
            self.manager.streams.wait(self._restore_event)
            self._restore_event = None
            for slot in self.live_slots():
                slot.restored = None
            self.drop_restored()
            self.manager.arena.release(self)
            self._in_arena = False
            if self.state is not RecordState.FORWARD:
                self.state = RecordState.STORED

    def drop_restored(self) -> None:
        """Drop policy-specific device tensors (sources)."""

    # -- restore targets -----------------------------------------------------------------------

    def placement(self) -> "Placement":
        """Where this restore writes: the record's restore buffer at planned offsets, or fresh
        allocations when the buffer is in use or too small."""
        plan = self.restore_plan()
        arena = self.manager.arena
        self._in_arena = (
            plan is not None and self.parity is not None and arena.claim(self.parity, self, plan.peak_bytes)
        )
        self.manager.restore_counts["restore_buffer" if self._in_arena else "allocator"] += 1
        return Placement(self, plan if self._in_arena else None)

    def report(self) -> BlockReport:
        return BlockReport(
            block=self.block.name,
            policy=self.policy,
            kept_bytes=self._bytes["kept"],
            parameter_bytes=self._bytes["parameter"],
            host_bytes=self._bytes["host"],
            dropped_bytes=self._bytes["dropped"],
            slots=dict(self.storage_counts),
        )


@dataclass(frozen=True)
class RestoreTarget:
    """A device tensor a restore writes: its name in the restore plan, layout, and end event."""

    name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    end: int

    @classmethod
    def like(cls, name: str, tensor: torch.Tensor, end: int) -> "RestoreTarget":
        return cls(name, tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, end)

    @classmethod
    def contiguous(cls, name: str, shape: tuple[int, ...], dtype: torch.dtype, end: int) -> "RestoreTarget":
        stride, step = [], 1
        for size in reversed(shape):
            stride.append(step)
            step *= max(size, 1)
        return cls(name, tuple(shape), tuple(reversed(stride)), dtype, end)

    @property
    def nbytes(self) -> int:
        if any(size == 0 for size in self.shape):
            return 0
        return (1 + sum((size - 1) * s for size, s in zip(self.shape, self.stride))) * self.dtype.itemsize


class Placement:
    def __init__(self, record: BlockRecord, plan: Optional[OffsetPlan]):
        self.record = record
        self.plan = plan

    def tensor(self, target: RestoreTarget) -> torch.Tensor:
        """The device tensor for `target`: in the restore buffer, or from the allocator."""
        manager = self.record.manager
        if self.plan is None:
            return torch.empty_strided(target.shape, target.stride, dtype=target.dtype, device=manager.device)
        offset = self.plan.offsets[target.name]
        return manager.arena.tensor(self.record.parity, offset, target.shape, target.stride, target.dtype)
