"""Module hooks that gather, free and reduce each sharding unit around its forward and backward.

[Note: collective order]
Every rank must issue the same collectives in the same order. All gathers and reductions are
issued from module hooks, autograd hooks and the end of backward, which run in the same order
on every rank as long as every rank runs the same modules: the same contract as DDP and FSDP.
Prefetch guesses follow the previous iteration's recorded order, identical on all ranks too.
"""
from __future__ import annotations

import collections
import enum
import functools
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from zerokit.zero.flat_group import FlatParamGroup, GroupState, PendingReduction
from zerokit.zero.policy import ShardingPolicy
from zerokit.zero.streams import StreamSet


def _grad_ready(runtime_ref: "weakref.ref[ShardingRuntime]", unit_index: int, param: torch.Tensor) -> None:
    runtime = runtime_ref()
    if runtime is not None:
        runtime._on_grad(runtime.units[unit_index], param)


class Phase(enum.Enum):
    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"


class ShardedUnit:
    """A module whose parameters (one or two flat groups: trainable, frozen) move together."""

    def __init__(self, name: str, module: nn.Module, groups: list[FlatParamGroup], is_root: bool):
        self.name = name or "<root>"
        self.module = module
        self.groups = groups
        self.is_root = is_root
        self.numel = sum(group.numel for group in groups)
        self.keep_gathered = all(group.keep_gathered for group in groups)
        self.trainable_params = [slot.param for g in groups if g.trainable for slot in g.slots if slot.param.requires_grad]
        self.grads_pending = 0
        self.backward_done = False

    def gather(self) -> None:
        for group in self.groups:
            group.gather()

    def wait_gathered(self) -> None:
        for group in self.groups:
            group.wait_gathered()

    def reshard(self) -> None:
        for group in self.groups:
            group.reshard()

    def read_ahead(self) -> None:
        for group in self.groups:
            group.read_ahead()

    def is_gathered(self) -> bool:
        return any(group.state is not GroupState.SHARDED for group in self.groups)

    def trainable_groups(self) -> list[FlatParamGroup]:
        return [group for group in self.groups if group.trainable]

    def __repr__(self) -> str:
        return f"ShardedUnit({self.name}, numel={self.numel})"


class ShardingRuntime:
    def __init__(self, units: list[ShardedUnit], policy: ShardingPolicy, streams: StreamSet, read_ahead: int = 0):
        """read_ahead: units whose NVMe-offloaded parameter shards are read ahead of their gather."""
        self.units = units
        self.read_ahead = read_ahead
        self.root = units[-1]
        self.policy = policy
        self.streams = streams
        self.phase = Phase.IDLE
        self.forward_order: list[ShardedUnit] = []
        self.last_forward_order: list[ShardedUnit] = [u for u in units if not u.is_root]
        self.pending: collections.deque[PendingReduction] = collections.deque()
        self.reduce_in_this_backward = True
        self.backward_pending = False  # a forward ran whose backward has not finished
        for index, unit in enumerate(units):
            unit.module.register_forward_pre_hook(functools.partial(self._pre_forward, unit))
            unit.module.register_forward_hook(functools.partial(self._post_forward, unit))
            # Parameters hold their hooks in C++-owned state that Python's garbage collector does
            # not traverse: a strong reference back to this runtime would keep the whole model
            # alive after the engine is dropped. The hook refers to it weakly, by unit index.
            for param in unit.trainable_params:
                hook = functools.partial(_grad_ready, weakref.ref(self), index)
                param.register_post_accumulate_grad_hook(hook)

    # -- forward -------------------------------------------------------------------------------

    def _pre_forward(self, unit: ShardedUnit, module: nn.Module, args: Any) -> None:
        if self.phase is Phase.BACKWARD:  # recomputation under activation checkpointing
            unit.gather()
            unit.wait_gathered()
            return
        if unit.is_root:
            if self.forward_order:
                self.last_forward_order = self.forward_order
            self.forward_order = []
            self.phase = Phase.FORWARD
        else:
            self.forward_order.append(unit)
        unit.gather()
        # The root's forward starts first: prefetch the first units behind it.
        self._prefetch(self.last_forward_order[0 if unit.is_root else len(self.forward_order):])
        unit.wait_gathered()

    def _post_forward(self, unit: ShardedUnit, module: nn.Module, args: Any, output: Any) -> None:
        if self.phase is Phase.BACKWARD:
            return
        needs_grad = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        if needs_grad:
            self.backward_pending = True
            torch.autograd.graph.register_multi_grad_hook(
                needs_grad, functools.partial(self._pre_backward, unit), mode="any"
            )
        if (not unit.is_root or not needs_grad) and not unit.keep_gathered:
            unit.reshard()  # the root stays gathered for the backward that follows
        if unit.is_root:
            self.phase = Phase.IDLE

    # -- backward ------------------------------------------------------------------------------

    def begin_backward(self, reduce: bool) -> None:
        self.phase = Phase.BACKWARD
        self.reduce_in_this_backward = reduce
        for unit in self.units:
            unit.grads_pending = len(unit.trainable_params)
            unit.backward_done = False

    def _pre_backward(self, unit: ShardedUnit, grad: torch.Tensor) -> None:
        unit.gather()
        # Backward visits units in reverse forward order: prefetch the ones run before this one.
        # Not from the root, whose backward starts at the memory peak (logits and their gradient).
        positions = [i for i, u in enumerate(self.forward_order) if u is unit]
        if positions:
            earlier = self.forward_order[: positions[-1]]
            self._prefetch([u for u in reversed(earlier) if not u.backward_done])
        unit.wait_gathered()

    def _on_grad(self, unit: ShardedUnit, param: torch.Tensor) -> None:
        unit.grads_pending -= 1
        if unit.grads_pending == 0:
            self._post_backward(unit)

    def _post_backward(self, unit: ShardedUnit) -> None:
        unit.backward_done = True
        if self.reduce_in_this_backward:
            for group in unit.trainable_groups():
                self._track(group.reduce_grads())
        if not unit.keep_gathered:
            unit.reshard()

    def finish_backward(self) -> None:
        """Reduce what no hook reduced (unused parameters, skipped modules), free gathered units,
        and order the compute stream after every reduction."""
        for unit in self.units:
            if self.reduce_in_this_backward:
                for group in unit.trainable_groups():
                    if group.has_unreduced_grads():
                        self._track(group.reduce_grads())
            if not unit.keep_gathered:
                unit.reshard()
        self.wait_for_reductions()
        self.phase = Phase.IDLE
        self.backward_pending = False

    # -- communication bookkeeping -------------------------------------------------------------

    def _prefetch(self, candidates: list[ShardedUnit]) -> None:
        if not self.policy.shard_parameters:
            return
        budget = self.policy.prefetch_numel
        live = sum(u.numel for u in self.units if not u.keep_gathered and u.is_gathered())
        for unit in candidates:
            if budget <= 0:
                break
            budget -= unit.numel
            if unit.keep_gathered or unit.is_gathered():
                continue
            if live + unit.numel > self.policy.max_live_numel:
                break
            unit.gather()
            live += unit.numel
        # Beyond what is gathered, start reading the next shards from NVMe (host work only, so
        # unlike gathers it need not happen in the same order on every rank).
        if self.read_ahead:
            sharded = [u for u in candidates if not u.keep_gathered and not u.is_gathered()]
            for unit in sharded[: self.read_ahead]:
                unit.read_ahead()

    def _track(self, reduction: PendingReduction) -> None:
        """Keep a reduction's buffers alive until it is done; bound how much is in flight."""
        self.pending.append(reduction)
        while self.pending and self.pending[0].done is not None and self.pending[0].done.query():
            self.pending.popleft()
        in_flight = sum(r.numel for r in self.pending)
        while len(self.pending) > 1 and in_flight > self.policy.reduce_in_flight_numel:
            oldest = self.pending.popleft()
            self.streams.wait(oldest.done)
            in_flight -= oldest.numel

    def wait_for_reductions(self) -> None:
        while self.pending:
            self.streams.wait(self.pending.popleft().done)

    # -- after the optimizer step --------------------------------------------------------------

    def refresh_parameters(self) -> None:
        for unit in self.units:
            for group in unit.trainable_groups():
                group.refresh()
