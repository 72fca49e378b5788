"""The activation manager: module and autograd hooks that run each block's policy.

[Note: hook order]
A forward pre-hook on each block starts a record (BlockRecord) and enters its saved-tensor hooks
(and attention recorder); a forward hook, prepended and always called, leaves them, so later
hooks and errors never run inside them. On the block's outputs a multi-grad hook (mode "any")
fires when the first gradient reaches them: before any of the block's backward ops run. There
the manager (1) releases the restore buffers of the blocks after this one, whose backward is
complete (autograd runs ready ops in reverse creation order, so once an earlier block's
backward starts, later blocks have none left), (2) makes this block's saved tensors ready
(waits for its prefetch, recomputes), and (3) prefetches the previous blocks that restore from
host memory into their free buffers, so their copies overlap this block's backward. At the end
of backward a queued callback releases everything.

With ZeRO (zerokit.initialize), the engine's hooks come first: its pre-hook gathers parameters
before the record starts, and a forward that runs again in backward goes through the block's
module call, so the engine gathers the parameters for it as it does for any recomputation.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import statistics
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from planner import PlanCache
from zerokit.activations.alpha import AlphaPlan, SwapSizes, plan_alpha, swapped_tokens
from zerokit.activations.arena import RestoreArena
from zerokit.activations.blocks import assign_policies, check_attention_implementation, check_no_kv_cache, find_blocks
from zerokit.activations.calibrate import CalibrationRecord
from zerokit.activations.config import ActivationMemoryConfig
from zerokit.activations.inputs import BlockInputs
from zerokit.activations.layout import BlockLayout
from zerokit.activations.memo import MemoRecord
from zerokit.activations.record import BlockRecord, BlockReport, RecordState
from zerokit.activations.recompute import KeepRecord, RecomputeRecord
from zerokit.activations.streams import SwapStreams
from zerokit.activations.swap import SwapRecord


@dataclass
class ManagedBlock:
    name: str
    module: nn.Module
    policy: str  # keep | recompute | swap | memo
    learned: dict[tuple, BlockLayout] = field(default_factory=dict)  # memo: per input signature
    active: list[BlockRecord] = field(default_factory=list)  # records whose forward is running


class ActivationManager:
    """Stores the activations the blocks of `model` save for backward, per block policy."""

    def __init__(
        self,
        model: nn.Module,
        config: ActivationMemoryConfig,
        device: torch.device,
        blocks: list[tuple[str, nn.Module]],
        policies: list[str],
    ):
        self.model = model
        self.config = config
        self.device = device
        self.streams = SwapStreams(device)
        self.arena = RestoreArena(device, model, PlanCache(config.plan_cache) if config.plan_cache else None)
        self.blocks = [ManagedBlock(name, module, policy) for (name, module), policy in zip(blocks, policies)]
        self.alpha_plans: dict[tuple, AlphaPlan] = {}  # memo, per input signature
        self.records: list[BlockRecord] = []  # block calls since the last backward, in forward order
        self._restoring = 0  # block calls that restore from host memory, for the buffer parity
        self._offloads_finished = 0  # records[:this] have finished their copies to host
        self._suspended = 0
        self._in_backward = False
        self._last_reports: list[BlockReport] = []
        # restores by how they were issued (prefetched / on_demand) and where they went
        # (restore_buffer / allocator)
        self.restore_counts: collections.Counter[str] = collections.Counter()
        self._handles = []
        for block in self.blocks:
            module = block.module
            pre_forward = functools.partial(self._pre_forward, block)
            post_forward = functools.partial(self._post_forward, block)
            self._handles.append(module.register_forward_pre_hook(pre_forward, with_kwargs=True))
            self._handles.append(module.register_forward_hook(post_forward, prepend=True, always_call=True))

    # -- public --------------------------------------------------------------------------------

    def remove(self) -> None:
        """Detach every hook; activations already stored still come back for their backward.
        The restore buffers go with the manager."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reports(self) -> list[BlockReport]:
        """Where the saved tensors of each block call went: the calls since the last backward,
        else those of the last backward."""
        if self.records:
            return [record.report() for record in self.records if not isinstance(record, KeepRecord)]
        return list(self._last_reports)

    @property
    def alpha(self) -> Optional[float]:
        """memo's fraction of tokens swapped: the configured one, else the last planned one."""
        if self.config.alpha is not None:
            return self.config.alpha
        plans = list(self.alpha_plans.values())
        return plans[-1].alpha if plans else None

    def wait_for_offloads(self) -> None:
        """Order the compute stream after every copy to host issued so far, and drop the device
        tensors they read."""
        for record in self.records:
            record.finish_offloads()
        self._offloads_finished = len(self.records)

    def restore_buffer_bytes(self) -> int:
        return self.arena.nbytes()

    # -- used by records -----------------------------------------------------------------------

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Blocks run again inside this context are not managed (their forward is a recomputation)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def learned(self, record: CalibrationRecord, layout: BlockLayout, sizes: SwapSizes) -> None:
        """A memo block's layout for an input signature is known; plan alpha for the signature."""
        record.block.learned[record.signature] = layout
        if self.config.alpha is not None or record.signature in self.alpha_plans:
            return
        times = [
            r.timer.seconds()
            for r in self.records
            if isinstance(r, CalibrationRecord) and r.signature == record.signature
        ]
        times = [t for t in times if t is not None] or [record.timer.seconds() or 0.0]
        swapped_blocks = sum(block.policy in ("memo", "swap") for block in self.blocks)
        self.alpha_plans[record.signature] = plan_alpha(
            self.config, self.device, sizes, statistics.median(times), swapped_blocks
        )

    # -- forward -------------------------------------------------------------------------------

    def _pre_forward(self, block: ManagedBlock, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._suspended or not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return None  # not recording a graph, or a recomputation by someone else in backward
        if self._in_backward:
            self._end_backward()  # the last backward failed before its end callback ran
        inputs = BlockInputs.capture(block.name, args, kwargs, self.config.sequence_dim)
        if block.policy in ("recompute", "memo"):
            check_no_kv_cache(block.name, kwargs)
        record = self._new_record(block, inputs)
        for earlier in self.records[self._offloads_finished : max(len(self.records) - 1, 0)]:
            earlier.finish_offloads()  # block i + 2 waits for block i's copies to host
        self._offloads_finished = max(self._offloads_finished, len(self.records) - 1)
        self.records.append(record)
        block.active.append(record)
        record.enter()
        return None

    def _new_record(self, block: ManagedBlock, inputs: BlockInputs) -> BlockRecord:
        sequence = len(self.records)
        if block.policy == "keep":
            return KeepRecord(self, block, inputs, sequence)
        if block.policy == "recompute":
            return RecomputeRecord(self, block, inputs, sequence)
        if block.policy == "swap":
            record: BlockRecord = SwapRecord(self, block, inputs, sequence)
        else:
            signature = inputs.signature()
            layout = block.learned.get(signature)
            alpha = self.config.alpha if self.config.alpha is not None else (
                self.alpha_plans[signature].alpha if signature in self.alpha_plans else None
            )
            if layout is None or alpha is None:
                return CalibrationRecord(self, block, inputs, sequence, signature)
            record = MemoRecord(self, block, inputs, sequence, layout, swapped_tokens(alpha, inputs.tokens))
        record.parity = self._restoring % self.config.restore_buffers
        self._restoring += 1
        return record

    def _post_forward(self, block: ManagedBlock, module: nn.Module, args: tuple, output: Any) -> None:
        if not block.active:
            return None
        record = block.active.pop()
        record.exit()
        if output is None and sys.exc_info()[0] is not None:
            return None  # the forward failed; its error propagates
        record.after_forward()
        needs_grad = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        if needs_grad:
            # The hook lives on the outputs, which the graph keeps; a strong reference to the
            # record would close a cycle through the graph that the garbage collector cannot see.
            torch.autograd.graph.register_multi_grad_hook(
                needs_grad, functools.partial(self._pre_backward, weakref.ref(record)), mode="any"
            )
        return None

    # -- backward ------------------------------------------------------------------------------

    def _pre_backward(self, record_ref: "weakref.ref[BlockRecord]", grad: torch.Tensor) -> None:
        record = record_ref()
        if record is None:
            return  # its iteration is over (a graph run backward after its records were released)
        self._begin_backward()
        current = record.sequence < len(self.records) and self.records[record.sequence] is record
        if current:
            for later in self.records[record.sequence + 1 :]:
                if later.state in (RecordState.PREFETCHED, RecordState.READY):
                    later.release()
        record.materialize()
        if current:
            self._prefetch_before(record.sequence)

    def _prefetch_before(self, sequence: int) -> None:
        ahead = 0
        for earlier in reversed(self.records[:sequence]):
            if not earlier.restores:
                continue
            if earlier.state is RecordState.STORED:
                if not self.arena.is_free(earlier.parity):
                    break  # its buffer is still read by a later block; it restores when its turn comes
                earlier.prefetch()
            ahead += 1
            if ahead == self.config.restore_buffers:  # one block restored ahead per buffer
                break

    def _begin_backward(self) -> None:
        if self._in_backward:
            return
        self._in_backward = True
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        self.wait_for_offloads()
        sizes = [0, 0]
        for record in self.records:
            plan = record.restore_plan() if record.restores else None
            if plan is not None:
                sizes[record.parity] = max(sizes[record.parity], plan.peak_bytes)
        self.arena.reserve(sizes)

    def _end_backward(self) -> None:
        self._last_reports = [r.report() for r in self.records if not isinstance(r, KeepRecord)]
        for record in self.records:
            record.release()
        for owner in self.arena.owners:
            if owner is not None:
                owner.release()
        self.arena.clear()
        self.records = []
        self._restoring = 0
        self._offloads_finished = 0
        self._in_backward = False


def apply_activation_memory(
    model: nn.Module,
    config: Union[ActivationMemoryConfig, Mapping[str, Any], None] = None,
    device: Union[torch.device, str, None] = None,
) -> ActivationManager:
    """Manage the activations that the blocks of `model` save for backward, per `config`.

    `device` is where the model computes (default: where its first parameter is). Returns the
    manager; `manager.remove()` detaches it. Apply it after zerokit.initialize when the model
    is trained with ZeRO, to `engine.module`.
    """
    if config is None:
        config = ActivationMemoryConfig()
    elif isinstance(config, Mapping):
        config = ActivationMemoryConfig.from_dict(config)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if config.policy == "none" and not config.block_policies:
        return ActivationManager(model, config, device, [], [])
    blocks = find_blocks(model, config.blocks)
    policies = assign_policies(config, len(blocks))
    if "memo" in policies:
        check_attention_implementation(model)
    return ActivationManager(model, config, device, blocks, policies)
