"""One training step of a model on the meta device: what it allocates, when, and what autograd saves.

[Note: allocations on meta]
Meta tensors have shapes, dtypes and storages but no memory, so a whole forward and backward of
any model runs in well under a second and shows every byte it would allocate. A
TorchDispatchMode sees each op's outputs; an output whose storage is new is an allocation.
A storage's Python object, once created, lives exactly as long as its C++ storage, so a
weakref.finalize on it fires when the memory would be freed. Tensors autograd packs through
saved_tensors_hooks are the activations kept for backward; a storage packed twice counts once.
Kernel workspaces are not op outputs and are not seen. Data-dependent branches cannot be taken on
meta tensors: `bool()` of one answers True, which is what the checks of model code for full,
unpadded batches ("is every token unmasked?") find on real data.

The engine's handling of parameter gradients is mirrored: a sharding unit's gradients (compute
dtype) stay until every trainable parameter of the unit has received one, then they are dropped,
as the engine copies them into its reduction buffer at that moment.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from zerokit.profiler.attention import FusedAttention, Target
from zerokit.profiler.models import training_loss
from zerokit.zero.units import UnitSpec

OUTSIDE = -1  # "block index" of code outside every block (embedding, head, loss)


@dataclass(frozen=True)
class SavedStorage:
    """A storage autograd kept for backward."""

    nbytes: int
    allocated_at: int  # event index of its allocation
    allocated_in: Optional[int]  # the block whose forward allocated it, None outside blocks
    saved_by: frozenset[int]  # blocks whose forward saved it (OUTSIDE for code outside blocks)
    attention: bool  # an output of a fused attention op


@dataclass(frozen=True)
class BlockMarks:
    """Event indices of one block (a non-root sharding unit, e.g. a transformer layer). Its
    backward runs from backward_start to the next block's (in backward order) backward_start."""

    forward_start: int
    forward_end: int
    backward_start: int
    input_bytes: int  # inputs that require grad (the hidden states), allocated before the block
    input_saved: bool  # whether the block's own backward keeps them (else they die with the forward)
    input_freed: int  # event at which the last of them is freed (the trace's length if never)


@dataclass(frozen=True)
class StepTrace:
    """The allocation timeline of one forward (with the loss) and backward.

    live[k]: bytes alive after event k (an allocation or a free): activations, their gradients,
    and parameter gradients waiting for their unit's reduction, whose part is param_grads[k].
    Parameters, and tensors alive before the step (inputs), are not included.
    """

    live: tuple[int, ...]
    param_grads: tuple[int, ...]
    backward_start: int
    blocks: tuple[BlockMarks, ...]
    unit_reduced: tuple[tuple[int, int], ...]  # (unit index, event) as units finish their backward
    saved: tuple[SavedStorage, ...]

    @property
    def events(self) -> int:
        return len(self.live)

    def saved_by_block(self, block: int) -> list[SavedStorage]:
        return [s for s in self.saved if block in s.saved_by]


@dataclass
class _Storage:
    nbytes: int
    allocated_at: int
    allocated_in: Optional[int]
    attention: bool
    saved_by: set[int] = field(default_factory=set)
    param_grad: bool = False
    freed_at: Optional[int] = None


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()  # frees may come from autograd's threads
        self.live = [0]
        self.param_grads = [0]
        self.block: Optional[int] = None  # block whose forward runs now
        self.forward = True
        self.alive: dict[int, _Storage] = {}
        self.saved: dict[int, _Storage] = {}  # by id(entry): a storage's key may be reused after its free
        self._finalizers: list[weakref.finalize] = []

    @property
    def now(self) -> int:
        return len(self.live) - 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_meta}
        attention = "scaled_dot_product" in str(func)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.is_meta and tensor.layout == torch.strided:
                self._allocated(tensor, inputs, attention)
        return out

    def _allocated(self, tensor: torch.Tensor, inputs: set[int], attention: bool) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in inputs or storage.nbytes() == 0:
            return
        with self._lock:
            if key in self.alive:
                return
            self._event(storage.nbytes(), 0)
            self.alive[key] = _Storage(storage.nbytes(), self.now, self.block if self.forward else None, attention)
            self._finalizers.append(weakref.finalize(storage, self._freed, key))

    def _freed(self, key: int) -> None:
        with self._lock:
            entry = self.alive.pop(key, None)
            if entry is not None:
                self._event(-entry.nbytes, -entry.nbytes if entry.param_grad else 0)
                entry.freed_at = self.now

    def _event(self, delta: int, param_grad_delta: int) -> None:
        self.live.append(self.live[-1] + delta)
        self.param_grads.append(self.param_grads[-1] + param_grad_delta)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_meta:
            with self._lock:
                entry = self.alive.get(_key(tensor))
                if entry is not None:
                    entry.saved_by.add(OUTSIDE if self.block is None else self.block)
                    self.saved[id(entry)] = entry
        return tensor

    def mark_param_grad(self, grad: torch.Tensor) -> None:
        with self._lock:
            entry = self.alive.get(_key(grad))
            if entry is not None and not entry.param_grad:
                entry.param_grad = True
                self._event(0, entry.nbytes)

    def stop(self) -> None:
        for finalizer in self._finalizers:
            finalizer.detach()


class _FullBatchBranches(TorchFunctionMode):
    """`bool()` of a meta tensor is True (see the module note)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            return True
        return func(*args, **(kwargs or {}))


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def trace_step(
    model: nn.Module,
    specs: Sequence[UnitSpec],
    micro_batch: int,
    seq: int,
    attention: Target = "cuda",
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = training_loss,
) -> StepTrace:
    """Run forward, loss and backward of a meta-device `model` on a micro-batch of token ids.

    `specs` are the model's sharding units (`plan_units`): the non-root ones are the blocks whose
    activations are reported, and units define when parameter gradients are released.
    """
    blocks = [spec.module for spec in specs if spec.name != ""]
    recorder = _Recorder()
    starts: dict[int, int] = {}
    inputs: dict[int, list[tuple[int, Optional[_Storage]]]] = {}  # no tensor references: they would live on
    ends: dict[int, int] = {}
    backward_starts: dict[int, int] = {}
    handles = []

    def pre_forward(index: int, module: nn.Module, args, kwargs) -> None:
        recorder.block = index
        if index not in starts:
            starts[index] = recorder.now
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
            inputs[index] = [(t.untyped_storage().nbytes(), recorder.alive.get(_key(t))) for t in tensors]

    def post_forward(index: int, module: nn.Module, args, output) -> None:
        recorder.block = None
        ends.setdefault(index, recorder.now)
        needs_grad = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        if needs_grad and index not in backward_starts:
            handles.append(torch.autograd.graph.register_multi_grad_hook(
                needs_grad, lambda grads: backward_starts.setdefault(index, recorder.now), mode="any"
            ))  # fmt: skip

    for index, block in enumerate(blocks):
        pre = lambda m, a, k, i=index: pre_forward(i, m, a, k)  # noqa: E731
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o, i=index: post_forward(i, m, a, o)))

    reduced: list[tuple[int, int]] = []
    _mirror_gradient_release(specs, recorder, reduced, handles)
    tokens = torch.empty((micro_batch, seq), dtype=torch.long, device="meta")
    try:
        with recorder, FusedAttention(attention), _FullBatchBranches():
            with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
                loss = loss_fn(model, tokens)
            recorder.forward = False
            backward_start = recorder.now
            loss.backward()
            del loss
            for param in model.parameters():
                param.grad = None  # gradients of units the engine reduces at the end of backward
    finally:
        recorder.stop()
        for handle in handles:
            handle.remove()
    for index, _ in enumerate(blocks):
        if index not in starts:
            raise RuntimeError(f"block {index} ({type(blocks[index]).__name__}) did not run in the forward")
    events = len(recorder.live)
    marks = tuple(
        BlockMarks(starts[i], ends[i], backward_starts.get(i, backward_start), *_input_facts(inputs[i], i, events))
        for i in range(len(blocks))
    )
    saved = tuple(
        SavedStorage(s.nbytes, s.allocated_at, s.allocated_in, frozenset(s.saved_by), s.attention)
        for s in recorder.saved.values()
    )
    return StepTrace(tuple(recorder.live), tuple(recorder.param_grads), backward_start, marks, tuple(reduced), saved)


def _input_facts(inputs: list[tuple[int, Optional[_Storage]]], block: int, events: int) -> tuple[int, bool, int]:
    saved = any(entry is not None and block in entry.saved_by for _, entry in inputs)
    freed = [events if entry is None or entry.freed_at is None else entry.freed_at for _, entry in inputs]
    return sum(nbytes for nbytes, _ in inputs), saved, max(freed, default=events)


def _mirror_gradient_release(specs, recorder: _Recorder, reduced: list, handles: list) -> None:
    """Hold each unit's parameter gradients until all its trainable parameters have one, as the
    engine's runtime does (it counts one hook call per parameter, as here)."""
    for unit, spec in enumerate(specs):
        params = [p for _, p in spec.params if p.requires_grad]
        pending = [len(params)]

        def on_grad(param: nn.Parameter, unit=unit, params=params, pending=pending) -> None:
            recorder.mark_param_grad(param.grad)
            pending[0] -= 1
            if pending[0] == 0:
                reduced.append((unit, recorder.now))
                for p in params:
                    p.grad = None

        for param in params:
            handles.append(param.register_post_accumulate_grad_hook(on_grad))


class _Captured(Exception):
    pass


def capture_block_call(
    model: nn.Module,
    block: nn.Module,
    micro_batch: int,
    seq: int,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = training_loss,
) -> tuple[tuple, dict]:
    """The (args, kwargs) `block` is first called with in a forward of the meta-device `model`
    on a micro-batch (meta tensors: shapes and dtypes only); the forward stops there."""
    found: list[tuple[tuple, dict]] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict):
        found.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    tokens = torch.empty((micro_batch, seq), dtype=torch.long, device="meta")
    try:
        with _FullBatchBranches():
            loss_fn(model, tokens)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not found:
        raise RuntimeError(f"{type(block).__name__} did not run in the model's forward")
    return found[0]
