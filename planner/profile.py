"""Profile one block on its device: forward and backward time, and every allocation and free.

Allocations are seen at the dispatcher: a TorchDispatchMode looks at each op's outputs and
records those whose storage is new. A storage's Python object is kept alive by its C++
storage once created, so ``weakref.finalize`` on it fires exactly when the memory is released;
that gives the frees without touching the allocator, identically on CPU and CUDA. Tensors packed
by ``saved_tensors_hooks`` during forward are the ones autograd keeps for backward (skeletal);
the rest are transient. Only op outputs are seen: workspace a kernel allocates internally is not.

Event indices count ops: an allocation carries the index of the op that produced it, a free
the number of ops started when it happened. A tensor is therefore alive over [alloc, free),
and one freed before op k may share memory with one allocated by op k.
"""
from __future__ import annotations

import statistics
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from planner.tensors import TensorLifetime

Phase = Literal["forward", "backward"]


@dataclass(frozen=True)
class ProfileConfig:
    """warmup: untimed runs first; repeats: timed runs (the median is reported)."""

    warmup: int = 2
    repeats: int = 5

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={self.warmup}, repeats={self.repeats}")


@dataclass(frozen=True)
class AllocationEvent:
    """One allocation ("alloc") or release ("free") of ``nbytes`` bytes for tensor ``tensor_id``."""

    op_index: int
    kind: Literal["alloc", "free"]
    tensor_id: int
    nbytes: int


@dataclass(frozen=True)
class PhaseLifetimes:
    """A phase's allocations with lifetimes in its own op index (0 = its first op).

    transient: allocated and freed within the phase (level-1 input).
    escaping: still alive when the phase ends (outputs, tensors saved for backward, gradients);
        their lifetimes are cut at the phase's end.
    """

    transient: tuple[TensorLifetime, ...]
    escaping: tuple[TensorLifetime, ...]


@dataclass(frozen=True)
class BlockProfile:
    """Times and the allocation trace of one forward + backward of a block.

    ops[k] is the name of op k; ops [0, backward_start) ran in forward, the rest in backward.
    saved_ids are the allocations autograd saved for backward. Tensor k's lifetime is named "t<k>".
    """

    device: str
    forward_s: float
    backward_s: float
    ops: tuple[str, ...]
    backward_start: int
    events: tuple[AllocationEvent, ...]
    saved_ids: frozenset[int]

    @property
    def saved_bytes(self) -> int:
        """Bytes of the allocations saved for backward."""
        return sum(e.nbytes for e in self.events if e.kind == "alloc" and e.tensor_id in self.saved_ids)

    def lifetimes(self) -> tuple[TensorLifetime, ...]:
        """Every allocation over the whole forward + backward; those never freed live to the end."""
        return tuple(lifetime for lifetime, _ in _lifetimes(self.events, 0, len(self.ops)))

    def phase_lifetimes(self, phase: Phase) -> PhaseLifetimes:
        """The allocations of the forward or backward phase, split into transient and escaping."""
        if phase == "forward":
            first, last = 0, self.backward_start
        elif phase == "backward":
            first, last = self.backward_start, len(self.ops)
        else:
            raise ValueError(f"phase must be 'forward' or 'backward', got {phase!r}")
        found = _lifetimes(self.events, first, last)
        return PhaseLifetimes(
            transient=tuple(lifetime for lifetime, freed in found if freed),
            escaping=tuple(lifetime for lifetime, freed in found if not freed),
        )


def tensor_name(tensor_id: int) -> str:
    """The TensorLifetime name of allocation ``tensor_id``."""
    return f"t{tensor_id}"


def _lifetimes(events: Sequence[AllocationEvent], first: int, last: int) -> list[tuple[TensorLifetime, bool]]:
    """Allocations made by ops [first, last), in order, with lifetimes relative to ``first`` and
    whether they were freed by ``last``; the others are cut at ``last``."""
    freed = {e.tensor_id: e.op_index for e in events if e.kind == "free"}
    found = []
    for event in events:
        if event.kind != "alloc" or not first <= event.op_index < last:
            continue
        free = freed.get(event.tensor_id)
        freed_inside = free is not None and free <= last
        end = free if freed_inside else last
        lifetime = TensorLifetime(tensor_name(event.tensor_id), event.nbytes, event.op_index - first, end - first)
        found.append((lifetime, freed_inside))
    return found


class AllocationRecorder(TorchDispatchMode):
    """Records new storages made by ops, their frees, and which of them autograd saves."""

    def __init__(self) -> None:
        super().__init__()
        # frees may arrive from autograd's device threads, and from inside a locked section
        self._lock = threading.RLock()
        self.ops: list[str] = []
        self.events: list[AllocationEvent] = []
        self.saved_ids: set[int] = set()
        self._live: dict[tuple[str, int], tuple[int, int, weakref.finalize]] = {}
        self._allocations = 0
        self._recording = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with self._lock:
            index = len(self.ops)
            self.ops.append(str(func))
        out = func(*args, **(kwargs or {}))
        existing = {_storage_key(t) for t in tree_leaves((args, kwargs)) if _is_plain_tensor(t)}
        for tensor in tree_leaves(out):
            if _is_plain_tensor(tensor):
                self._note_output(tensor, index, existing)
        return out

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """saved_tensors_hooks pack hook: remember the saved allocation, keep the tensor as is."""
        if _is_plain_tensor(tensor):
            with self._lock:
                entry = self._live.get(_storage_key(tensor))
                if entry is not None:
                    self.saved_ids.add(entry[0])
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def stop(self) -> None:
        """Stop recording and drop the finalizers of storages still alive."""
        with self._lock:
            self._recording = False
            live = list(self._live.values())
            self._live.clear()
        for _, _, finalizer in live:
            finalizer.detach()

    def _note_output(self, tensor: torch.Tensor, index: int, existing: set[tuple[str, int]]) -> None:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = _storage_key(tensor)
        if nbytes == 0 or key in existing:
            return
        with self._lock:
            if not self._recording or key in self._live:
                return
            tensor_id = self._allocations
            self._allocations += 1
            finalizer = weakref.finalize(storage, self._on_free, key)
            self._live[key] = (tensor_id, nbytes, finalizer)
            self.events.append(AllocationEvent(index, "alloc", tensor_id, nbytes))

    def _on_free(self, key: tuple[str, int]) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None and self._recording:
                self.events.append(AllocationEvent(len(self.ops), "free", entry[0], entry[1]))


def _is_plain_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_meta


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def profile_block(
    block: torch.nn.Module,
    inputs: torch.Tensor | Sequence[Any],
    config: ProfileConfig = ProfileConfig(),
) -> BlockProfile:
    """Run ``block(*inputs)`` forward and backward on the inputs' device: time both (median of
    ``config.repeats`` runs after ``config.warmup``) and record one more run's allocations.

    Backward uses a gradient of ones for every output that requires grad. Inputs that require
    grad must be leaf tensors. The ``.grad`` of parameters and inputs is restored afterwards.
    """
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    for position, tensor in enumerate(tensors):
        if tensor.requires_grad and not tensor.is_leaf:
            raise ValueError(
                f"input {position} requires grad but is not a leaf tensor, so repeated backward passes would "
                "reach outside the block; pass tensor.detach().requires_grad_() instead"
            )
    device = _device_of(block, tensors)
    leaves = [p for p in block.parameters() if p.requires_grad] + [t for t in tensors if t.requires_grad]
    original_grads = [leaf.grad for leaf in leaves]
    try:
        grad_outputs = [torch.ones_like(t) for t in _differentiable(block(*args))]
        timer = _cuda_time if device.type == "cuda" else _cpu_time
        forward_times, backward_times = [], []
        for run in range(config.warmup + config.repeats):
            _clear_grads(leaves)
            forward_s, backward_s = _time_step(block, args, grad_outputs, timer, device)
            if run >= config.warmup:
                forward_times.append(forward_s)
                backward_times.append(backward_s)
        _clear_grads(leaves)
        recorder, backward_start = _record_step(block, args, grad_outputs, device)
    finally:
        for leaf, grad in zip(leaves, original_grads):
            leaf.grad = grad
    return BlockProfile(
        device=str(device),
        forward_s=statistics.median(forward_times),
        backward_s=statistics.median(backward_times),
        ops=tuple(recorder.ops),
        backward_start=backward_start,
        events=tuple(recorder.events),
        saved_ids=frozenset(recorder.saved_ids),
    )


def _time_step(block, args, grad_outputs, timer, device) -> tuple[float, float]:
    outputs, forward_s = timer(lambda: block(*args), device)
    _, backward_s = timer(lambda: torch.autograd.backward(_differentiable(outputs), grad_outputs), device)
    return forward_s, backward_s


def _record_step(block, args, grad_outputs, device) -> tuple[AllocationRecorder, int]:
    """One forward + backward under the recorder; returns it and the first backward op index."""
    recorder = AllocationRecorder()
    try:
        with recorder:
            with torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
                outputs = block(*args)
            backward_start = len(recorder.ops)
            torch.autograd.backward(_differentiable(outputs), grad_outputs)
            del outputs  # the output's release belongs to the trace
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        recorder.stop()
    return recorder, backward_start


def _device_of(block: torch.nn.Module, tensors: Sequence[torch.Tensor]) -> torch.device:
    for tensor in [*tensors, *block.parameters()]:
        return tensor.device
    raise ValueError("cannot tell the device: the block has no parameters and no tensor inputs")


def _differentiable(outputs: Any) -> list[torch.Tensor]:
    found = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not found:
        raise ValueError(
            "no output of the block requires grad: give it trainable parameters or inputs with "
            "requires_grad=True, and do not profile under torch.no_grad()"
        )
    return found


def _clear_grads(leaves: Sequence[torch.Tensor]) -> None:
    for leaf in leaves:
        leaf.grad = None


def _cpu_time(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _cuda_time(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    with torch.cuda.device(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
    return result, start.elapsed_time(end) / 1000.0
