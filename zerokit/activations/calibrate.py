"""memo's first call of a block for given input shapes: learn what memo needs to run it.

The call runs as full recomputation, its hidden-state input waiting in host memory as memo's
does (so the first iteration holds no block inputs on the device, and fits wherever memo's later
iterations do), and times its forward. Just before its backward, the input comes back and the
forward runs again in full (the recomputation, with attention calls recorded), then twice on its
last few tokens (the probes of layout.py); from these the block's layout and its swap sizes are
learned, and the manager plans alpha.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from zerokit.activations.alpha import SwapSizes
from zerokit.activations.attention import AttentionCall, AttentionRecorder, AttentionReplay, check_attention_seen
from zerokit.activations.inputs import BlockInputs
from zerokit.activations.layout import MIN_TOKENS, PROBE_TOKENS, BlockLayout, Probe, SlotKind, learn_layout
from zerokit.activations.recompute import RecomputeRecord, check_same_count
from zerokit.activations.rerun import rerun
from zerokit.activations.slots import Storage
from zerokit.activations.tensors import contains, empty_like_layout, nbytes, parameter_storages, storage_ptr, view_key

if TYPE_CHECKING:
    from zerokit.activations.manager import ActivationManager, ManagedBlock


class ForwardTimer:
    """Wall time of a forward on the host, or GPU time between two events on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._start = self._end = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record()
        else:
            self._end = time.perf_counter()

    def seconds(self) -> Optional[float]:
        if self._start is None or self._end is None:
            return None
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000.0
        return self._end - self._start


class CalibrationRecord(RecomputeRecord):
    policy = "memo"

    def __init__(self, manager: "ActivationManager", block: "ManagedBlock", inputs: BlockInputs, sequence: int,
                 signature: tuple):
        super().__init__(manager, block, inputs, sequence)
        self.signature = signature
        self.timer = ForwardTimer(manager.device)
        self._recorder = AttentionRecorder()
        self._calls_seen = 0

    def hold(self, inputs: BlockInputs) -> BlockInputs:
        self.share(inputs.secondary())
        self._hidden_host = self.copy_to_host(inputs.hidden)
        return inputs.without_hidden()

    def _restore_hidden(self) -> torch.Tensor:
        hidden = empty_like_layout(self._hidden_host, device=self.manager.device)
        streams = self.manager.streams
        streams.wait(streams.copy_to_device([(hidden, self._hidden_host)], after=[self.offload_event]))
        return hidden

    def forward_modes(self) -> list:
        return [self._recorder]

    def enter(self) -> None:
        super().enter()
        self.timer.start()

    def exit(self) -> None:
        self.timer.stop()
        super().exit()
        self._calls_seen = len(self._recorder.calls)
        self._recorder.calls.clear()

    def after_forward(self) -> None:
        check_attention_seen(self.block.name, self._calls_seen)

    def complete(self) -> None:
        wanted = {s.index: s for s in self.live_slots() if s.storage is Storage.DROPPED and s.restored is None}
        learn = self.signature not in self.block.learned
        if not wanted and not learn:
            return
        recorder = AttentionRecorder()
        saved: list[torch.Tensor] = []
        inside: list[Optional[int]] = []

        def keep(index: int, tensor: torch.Tensor) -> None:
            if learn:
                saved.append(tensor)
                inside.append(recorder.inside)
            slot = wanted.get(index)
            if slot is not None:
                slot.restored = tensor

        hidden = self._restore_hidden()
        args, kwargs = self.inputs.rebuild(hidden)
        with self.manager.suspended():
            count = rerun(self.block.module, args, kwargs, self.forward_state, keep, recorder)
        check_same_count(self.block.name, self._count, count)
        if learn:
            probes = self._probes(hidden, recorder.calls)
            layout = learn_layout(self.block.name, saved, inside, recorder.calls, probes, self.inputs.tokens)
            self.manager.learned(self, layout, self._sizes(layout, saved, hidden, recorder.calls))

    def _probes(self, hidden: torch.Tensor, calls: Sequence[AttentionCall]) -> list[Probe]:
        tokens = self.inputs.tokens
        if tokens < MIN_TOKENS:
            return []
        probes = []
        outputs = [call.output for call in calls]
        requires_grad = [call.output_requires_grad for call in calls]
        for count in PROBE_TOKENS:
            start = tokens - count
            rows = hidden.narrow(self.manager.config.sequence_dim, start, count)
            args, kwargs = self.inputs.rebuild(rows, start, count)
            replay = AttentionReplay(outputs, requires_grad, start, count)
            saved: list[torch.Tensor] = []
            with self.manager.suspended():
                rerun(self.block.module, args, kwargs, self.forward_state, lambda _, t: saved.append(t), replay)
            probes.append(Probe(count, saved, replay.calls))
        return probes

    def _sizes(
        self, layout: BlockLayout, saved: Sequence[torch.Tensor], hidden: torch.Tensor, calls: Sequence[AttentionCall]
    ) -> SwapSizes:
        """Bytes memo would move per call of this block, with the rules MemoRecord packs by."""
        device = self.manager.device
        parameters = parameter_storages(self.block.module)
        shared = self.inputs.secondary()
        sources = [hidden] + [call.output for call in calls]
        whole = token = 0
        seen = set()
        for tensor, learned in zip(saved, layout.slots):
            key = view_key(tensor)
            if key in seen or tensor.device != device or storage_ptr(tensor) in parameters:
                continue
            seen.add(key)
            if any(contains(x, tensor) for x in shared) or any(contains(x, tensor) for x in sources):
                continue
            if learned.kind is SlotKind.WHOLE:
                whole += nbytes(tensor)
            else:
                token += nbytes(tensor)
        return SwapSizes(
            hidden_bytes=nbytes(hidden),
            attention_bytes=sum(nbytes(call.output) for call in calls),
            whole_bytes=whole,
            token_bytes=token,
        )
