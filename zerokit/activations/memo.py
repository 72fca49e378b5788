"""The memo policy: token-wise swapping and recomputation (MEMO).

In forward the block's hidden-state input and each attention output are copied to host memory
whole (sources); a saved tensor that is a view of a source is restored as the same view of the
restored source, and one saved again (the same view, as the input of q, k and v projections) shares
the first one's restore. Of every other saved tensor with a token dimension (per the learned layout),
the first `swapped` tokens are copied to host memory and the rest dropped; tensors without one
are copied whole. Before the block's backward, the copies come back into the block's restore
buffer, then the block's forward runs again on only the dropped tokens with attention answered
from the restored attention outputs (AttentionReplay), and the recomputed rows fill the
dropped rows of the full saved tensors that autograd unpacks.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional

import torch

from zerokit.activations.attention import AttentionCall, AttentionRecorder, AttentionReplay, check_attention_seen
from zerokit.activations.inputs import BlockInputs
from zerokit.activations.layout import BlockLayout, SlotKind
from zerokit.activations.record import BACKWARD, DONE, BlockRecord, BlockReport, RestoreTarget
from zerokit.activations.recompute import check_same_count
from zerokit.activations.rerun import EnoughSaved, ForwardState, rerun
from zerokit.activations.slots import SavedSlot, Storage
from zerokit.activations.tensors import contains, is_dense, nbytes, view_key

if TYPE_CHECKING:
    from zerokit.activations.manager import ActivationManager, ManagedBlock


class _Source:
    """A tensor swapped whole that saved tensors may be views of."""

    def __init__(self, tensor: torch.Tensor, host: torch.Tensor):
        self.forward: Optional[torch.Tensor] = tensor if is_dense(tensor) else None  # during forward only
        self.host = host
        self.restored: Optional[torch.Tensor] = None


class MemoRecord(BlockRecord):
    policy = "memo"
    restores = True

    def __init__(
        self,
        manager: "ActivationManager",
        block: "ManagedBlock",
        inputs: BlockInputs,
        sequence: int,
        layout: BlockLayout,
        swapped: int,
    ):
        super().__init__(manager, block, inputs, sequence)
        self.layout = layout
        self.tokens = inputs.tokens
        self.swapped = swapped  # tokens [0, swapped) go to host memory, [swapped, tokens) are recomputed
        self.forward_state = ForwardState.capture(manager.device)
        self.share(inputs.secondary())
        self._recorder = AttentionRecorder(on_output=self._on_attention_output)
        self._calls_seen = 0
        self._pending: list[tuple[SavedSlot, torch.Tensor]] = []  # saved inside a running attention call
        self._recompute: dict[int, SavedSlot] = {}
        # token-split tensors by view: (their storage, first slot, its swapped rows), during forward only
        self._split_views: dict[tuple, tuple[weakref.ref, int, Optional[torch.Tensor]]] = {}
        self._same_as: dict[int, int] = {}  # slot index -> the first slot that saved the same view
        self.sources: list[_Source] = []
        self._attention_sources: list[int] = []
        self._add_source(inputs.hidden)
        self.inputs = inputs.without_hidden()

    # -- forward -------------------------------------------------------------------------------

    def forward_modes(self) -> list:
        return [self._recorder]

    def _add_source(self, tensor: torch.Tensor) -> int:
        self.sources.append(_Source(tensor, self.copy_to_host(tensor)))
        return len(self.sources) - 1

    def pack(self, tensor: torch.Tensor) -> SavedSlot:
        index = self.next_index()
        kept = self.keep_if_shared(index, tensor)
        if kept is not None:
            return kept
        self._check_learned(index, tensor)
        slot = self.new_slot(index, tensor, Storage.HOST)
        if self._as_view(slot, tensor):
            return slot
        if self._recorder.inside is not None:
            self._pending.append((slot, tensor))  # may be a view of the call's output, known on return
        else:
            self._store(slot, tensor)
        return slot

    def _check_learned(self, index: int, tensor: torch.Tensor) -> None:
        slots = self.layout.slots
        if index >= len(slots) or slots[index].shape != tuple(tensor.shape) or slots[index].dtype != tensor.dtype:
            learned = f"{slots[index].shape} {slots[index].dtype}" if index < len(slots) else "nothing"
            raise RuntimeError(
                f"block {self.block.name} saved tensor {index} of shape {tuple(tensor.shape)} {tensor.dtype} where "
                f"its learned layout has {learned}; memo needs a forward that saves the same tensors every time "
                "it gets inputs of the same shapes."
            )

    def _as_view(self, slot: SavedSlot, tensor: torch.Tensor) -> bool:
        for index, source in enumerate(self.sources):
            if source.forward is not None and contains(source.forward, tensor):
                slot.storage = Storage.VIEW
                slot.source = index
                offset = tensor.storage_offset() - source.forward.storage_offset()
                slot.view = (tuple(tensor.shape), tensor.stride(), offset)
                return True
        return False

    def _store(self, slot: SavedSlot, tensor: torch.Tensor) -> None:
        learned = self.layout.slots[slot.index]
        if learned.kind is SlotKind.WHOLE:
            slot.storage = Storage.HOST
            slot.host = self.copy_to_host(tensor)
            return
        slot.storage = Storage.SPLIT
        key = view_key(tensor)
        first = self._split_views.get(key)
        if first is not None and first[0]() is not None and self.layout.slots[first[1]].tokens == learned.tokens:
            self._same_as[slot.index] = first[1]  # saved again: one restore serves both
            slot.host = first[2]
            return
        if self.swapped > 0:
            rows = learned.tokens.rows(tensor, self.tokens, 0, self.swapped)
            if self.swapped < self.tokens:
                # a compact copy waits for the copy to host (two blocks later), not the whole tensor
                rows = rows.clone()
            slot.host = self.copy_to_host(rows)
        # the storage, not the tensor: a view made for one op (a Linear's 2-D input) dies with it
        self._split_views[key] = (weakref.ref(tensor.untyped_storage()), slot.index, slot.host)
        self.account("dropped", tensor, nbytes(tensor) * (self.tokens - self.swapped) // self.tokens)

    def _on_attention_output(self, index: int, call: AttentionCall) -> None:
        self._attention_sources.append(self._add_source(call.output))
        for slot, tensor in self._pending:
            if not self._as_view(slot, tensor):
                self._store(slot, tensor)
        self._pending.clear()

    def exit(self) -> None:
        super().exit()
        self._calls_seen = len(self._recorder.calls)
        self._recorder = None  # it refers back to this record: no cycle, so the record dies with its graph
        self._pending.clear()
        self._split_views.clear()
        for source in self.sources:
            source.forward = None

    def after_forward(self) -> None:
        check_attention_seen(self.block.name, self._calls_seen)
        expected = len(self.layout.output_requires_grad)
        if self._calls_seen != expected or self._count != len(self.layout.slots):
            raise RuntimeError(
                f"block {self.block.name} made {self._calls_seen} attention calls and saved {self._count} tensors, "
                f"but {expected} calls and {len(self.layout.slots)} tensors when memo learned its layout; memo needs "
                "a forward that does the same work every time it gets inputs of the same shapes."
            )

    # -- backward ------------------------------------------------------------------------------

    def _targets(self) -> tuple[list[RestoreTarget], dict[int, RestoreTarget], dict[int, RestoreTarget]]:
        """Restore targets of the sources, of the whole host copies (by host tensor) and of the
        split tensors (by slot index)."""
        slots = self.live_slots()
        viewed = {slot.source for slot in slots if slot.storage is Storage.VIEW}
        sources = [
            RestoreTarget.like(f"s{i}", source.host, DONE if i in viewed else BACKWARD)  # needed to recompute
            for i, source in enumerate(self.sources)
        ]
        whole: dict[int, RestoreTarget] = {}
        split: dict[int, RestoreTarget] = {}
        for slot in slots:
            if slot.storage is Storage.HOST and id(slot.host) not in whole:
                whole[id(slot.host)] = RestoreTarget.like(f"h{slot.index}", slot.host, DONE)
            elif slot.storage is Storage.SPLIT:
                key = self._split_key(slot)
                if key not in split:
                    split[key] = RestoreTarget.contiguous(f"t{key}", tuple(slot.shape), slot.dtype, DONE)
        return sources, whole, split

    def _split_key(self, slot: SavedSlot) -> int:
        """The slot index whose restore target a token-split slot uses."""
        return self._same_as.get(slot.index, slot.index)

    def restore_targets(self) -> list[RestoreTarget]:
        sources, whole, split = self._targets()
        return sources + list(whole.values()) + list(split.values())

    def start_restore(self) -> Optional[torch.cuda.Event]:
        placement = self.placement()
        sources, whole, split = self._targets()
        pairs = []
        for source, target in zip(self.sources, sources):
            if source.restored is None:
                source.restored = placement.tensor(target)
                pairs.append((source.restored, source.host))
        restored_hosts: dict[int, torch.Tensor] = {}
        restored_splits: dict[int, torch.Tensor] = {}
        for slot in self.live_slots():
            if slot.restored is not None or slot.storage is Storage.KEPT:
                continue
            if slot.storage is Storage.HOST:
                key = id(slot.host)
                if key not in restored_hosts:
                    restored_hosts[key] = placement.tensor(whole[key])
                    pairs.append((restored_hosts[key], slot.host))
                slot.restored = restored_hosts[key]
            elif slot.storage is Storage.SPLIT:
                key = self._split_key(slot)
                if key in restored_splits:
                    slot.restored = restored_splits[key]
                    continue
                slot.restored = restored_splits[key] = placement.tensor(split[key])
                if self.swapped > 0:
                    rows = self.layout.slots[slot.index].tokens.rows(slot.restored, self.tokens, 0, self.swapped)
                    pairs.append((rows, slot.host))
                self._recompute[slot.index] = slot
            elif slot.storage is Storage.VIEW:
                source = self.sources[slot.source].restored
                size, stride, offset = slot.view
                slot.restored = source.as_strided(size, stride, source.storage_offset() + offset)
        return self.manager.streams.copy_to_device(pairs, after=[self.offload_event])

    def complete(self) -> None:
        wanted, self._recompute = self._recompute, {}
        count = self.tokens - self.swapped
        if not wanted or count == 0:
            return
        layout = self.layout
        hidden = self.sources[0].restored.narrow(self.manager.config.sequence_dim, self.swapped, count)
        args, kwargs = self.inputs.rebuild(hidden, self.swapped, count)
        outputs = [self.sources[i].restored for i in self._attention_sources]
        replay = AttentionReplay(outputs, layout.output_requires_grad, self.swapped, count)
        outside = layout.outside

        positions = [p for p, index in enumerate(outside) if index in wanted]
        last = positions[-1] if positions else None

        def keep(position: int, tensor: torch.Tensor) -> None:
            if position < len(outside) and outside[position] in wanted:
                self._fill(wanted[outside[position]], tensor, count)
            if position == last and len(replay.calls) == len(outputs):
                raise EnoughSaved  # what follows (the last projection, the residual) saves nothing wanted

        with self.manager.suspended():
            saved = rerun(self.block.module, args, kwargs, self.forward_state, keep, replay)
        if saved is not None:
            check_same_count(self.block.name, len(outside), saved)
        for index, slot in wanted.items():
            learned = layout.slots[index]
            if learned.kind is SlotKind.ATTENTION_INPUT:
                self._fill(slot, replay.calls[learned.call][learned.argument], count)

    def _fill(self, slot: SavedSlot, recomputed: torch.Tensor, count: int) -> None:
        tokens = self.layout.slots[slot.index].tokens
        target = tokens.rows(slot.restored, self.tokens, self.swapped, count)
        rows = tokens.rows(recomputed, count, 0, count)
        if rows.shape != target.shape:
            raise RuntimeError(
                f"block {self.block.name}: saved tensor {slot.index} has {tuple(rows.shape)} rows when recomputed "
                f"for {count} tokens, expected {tuple(target.shape)}."
            )
        target.copy_(rows)

    def drop_restored(self) -> None:
        for source in self.sources:
            source.restored = None
        self._recompute = {}

    def report(self) -> BlockReport:
        report = super().report()
        return BlockReport(**{**report.__dict__, "swapped_tokens": self.swapped, "tokens": self.tokens})
