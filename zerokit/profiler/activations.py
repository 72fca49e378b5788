"""Activation memory on the GPU and host under each activation policy, from one traced step.

The trace is the step with no policy ("none"): every block keeps what autograd saves. The other
policies change when some of those storages are on the GPU; each is the "none" timeline with
intervals taken out (or put in) per block b, over the trace's event indices:

- recompute (activation checkpointing of every block): the block's private storages (allocated
  in its forward and saved by it alone) are gone from its forward end to its backward start; its
  inputs are kept by the checkpoint until its backward ends; running its whole forward again at
  its backward start briefly adds what that forward allocates beyond the private storages
  (transients and its output), at their peak.
- swap (every block's saved storages copied to host memory): the storages only block b saved
  are copied during its forward and leave the GPU when block b+2's forward starts (the runtime
  waits for a block's copies there), or, for a swapped block with no block b+2 (one of the last
  two, swapped only where keep_last < 2), when the blocks' backward starts; they come back,
  before block b+1's backward (prefetch), into one of `restore_buffers` restore buffers (two by
  default) that live from the start of the blocks' backward to its end, each the size of the
  largest swapped block's restore; the last `keep_last` blocks (default KEEP_LAST) keep theirs.
- memo (MEMO): as swap; the block input and attention outputs go to host memory whole, a
  fraction alpha of the other tokens too, and the rest is recomputed into the restore buffer
  before the block's backward (the transient above, once more). The block input stays on the
  GPU until its copy has been waited for, as the saved storages do, even where the model
  itself would have dropped it earlier, and comes back into the restore buffer with them. Of
  the other storages only a compact copy of the swapped tokens waits for its copy to host: the
  rest leaves when the block's forward ends (all of them wait where alpha is not given: the
  runtime plans it, at most 1).

Storages saved outside blocks (embedding, head, loss) and shared by several blocks (rotary
tables) stay under every policy.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from itertools import accumulate
from typing import Optional

from planner import SwapInputs, swap_fraction
from zerokit.activations.config import ActivationMemoryConfig
from zerokit.profiler.trace import BlockMarks, SavedStorage, StepTrace

POLICIES = ("none", "recompute", "swap", "memo")
# swap and memo keep the last blocks' activations (their backward comes at once), as the runtime does
KEEP_LAST = ActivationMemoryConfig().keep_last
RESTORE_BUFFERS = ActivationMemoryConfig().restore_buffers


@dataclass(frozen=True)
class BlockActivations:
    """Bytes of one block's activations (storages saved twice count once)."""

    saved: int  # every storage its forward saved for backward
    private: int  # allocated in its forward and saved by it alone: dropped by recompute
    swappable: int  # saved by it alone: moved to host by swap and memo
    attention: int  # of swappable: outputs of the attention kernel (never recomputed by memo)
    inputs: int  # its inputs that require grad (the hidden states)
    inputs_saved: bool
    recompute_transient: int  # peak of what its forward allocates beyond its private storages

    @property
    def other(self) -> int:
        """What memo swaps a fraction of and recomputes the rest: all but inputs and attention."""
        return max(self.swappable - self.attention - (self.inputs if self.inputs_saved else 0), 0)


def block_activations(trace: StepTrace) -> list[BlockActivations]:
    found = []
    activations = [a - g for a, g in zip(trace.live, trace.param_grads)]
    for index, marks in enumerate(trace.blocks):
        saved = trace.saved_by_block(index)
        alone = [s for s in saved if s.saved_by == frozenset({index})]
        private = [s for s in alone if s.allocated_in == index]
        found.append(BlockActivations(
            saved=sum(s.nbytes for s in saved),
            private=sum(s.nbytes for s in private),
            swappable=sum(s.nbytes for s in alone),
            attention=sum(s.nbytes for s in alone if s.attention),
            inputs=marks.input_bytes,
            inputs_saved=marks.input_saved,
            recompute_transient=_rerun_transient(activations, marks, private),
        ))  # fmt: skip
    return found


def _rerun_transient(activations: list[int], marks: BlockMarks, private: list[SavedStorage]) -> int:
    """The most a rerun of the block's forward holds beyond its private storages (which the
    timeline counts again from the block's backward start)."""
    allocated = sorted((s.allocated_at, s.nbytes) for s in private)
    start, peak, done, position = activations[marks.forward_start], 0, 0, 0
    for event in range(marks.forward_start, marks.forward_end + 1):
        while position < len(allocated) and allocated[position][0] <= event:
            done += allocated[position][1]
            position += 1
        peak = max(peak, activations[event] - start - done)
    return peak


def gpu_timeline(
    trace: StepTrace,
    blocks: list[BlockActivations],
    policy: str,
    keep_last: int = KEEP_LAST,
    restore_buffers: int = RESTORE_BUFFERS,
    alpha: Optional[float] = None,
) -> tuple[int, ...]:
    """Activation bytes on the GPU after each trace event under `policy` (parameter gradients
    excluded); `blocks` is `block_activations(trace)`; swap and memo leave the last `keep_last`
    blocks' activations where they are and restore the others into `restore_buffers` buffers;
    memo swaps `alpha` of the tokens (None: the most it may, all of them)."""
    _check_policy(policy)
    _check_keep_last(keep_last)
    if restore_buffers not in (1, 2) or isinstance(restore_buffers, bool):
        raise ValueError(f"restore_buffers must be 1 or 2, got {restore_buffers!r}")
    marks = trace.blocks
    change = [0] * (trace.events + 1)

    def add(start: int, stop: int, nbytes: int) -> None:
        if start < stop:
            change[start] += nbytes
            change[stop] -= nbytes

    def backward_end(b: int) -> int:
        return marks[b - 1].backward_start if b > 0 else trace.events

    if policy == "recompute":
        for b, block in enumerate(blocks):
            add(marks[b].forward_end, marks[b].backward_start, -block.private)
            if not block.inputs_saved:
                add(marks[b].forward_end, backward_end(b), block.inputs)
            add(marks[b].backward_start, marks[b].backward_start + 1, block.recompute_transient)
    elif policy in ("swap", "memo"):
        swapped = _swapped(len(blocks), policy, keep_last)
        for b in swapped:
            offloaded = marks[b + 2].forward_start if b + 2 < len(marks) else marks[-1].backward_start
            add(offloaded, backward_end(b), -blocks[b].swappable)
            if policy == "memo":
                if not blocks[b].inputs_saved:
                    add(marks[b].input_freed, offloaded, blocks[b].inputs)
                if alpha is not None:  # the dropped tokens' share leaves at once, a compact copy waits
                    add(marks[b].forward_end, offloaded, -int((1 - alpha) * blocks[b].other))
                add(marks[b].backward_start, marks[b].backward_start + 1, blocks[b].recompute_transient)
        if swapped:
            # reserved when the blocks' backward starts (the last block's), let go at its end
            largest = max(_restored(blocks[b], policy) for b in swapped)
            add(marks[-1].backward_start, trace.events, restore_buffers * largest)
    adjust = accumulate(change[:-1])
    return tuple(a - g + d for a, g, d in zip(trace.live, trace.param_grads, adjust))


def _restored(block: BlockActivations, policy: str) -> int:
    """Bytes a swapped block restores into its buffer: what it saved, and under memo its input
    (which its recomputation starts from) where it did not save it itself."""
    return block.swappable + (block.inputs if policy == "memo" and not block.inputs_saved else 0)


def host_bytes(
    blocks: list[BlockActivations],
    policy: str,
    host_bytes_per_rank: float,
    keep_last: int = KEEP_LAST,
    alpha: Optional[float] = None,
) -> tuple[int, float]:
    """(bytes of activations in pinned host memory, alpha) under `policy`, the last `keep_last`
    blocks kept on the GPU. alpha is memo's swapped fraction of the other activations: the given
    one, as the runtime takes a configured alpha, else planned here with `host_bytes_per_rank`
    as the only bound (the link's bandwidth may bound it further: this is the host-memory worst
    case); 1 for swap, else 0."""
    _check_policy(policy)
    _check_keep_last(keep_last)
    swapped = list(_swapped(len(blocks), policy, keep_last))
    if policy == "swap":
        return sum(blocks[b].swappable for b in swapped), 1.0
    if policy != "memo" or not swapped:
        return 0, 0.0
    if alpha is None:
        alpha = _memo_alpha(blocks, len(swapped), host_bytes_per_rank)
    return int(sum(blocks[b].inputs + blocks[b].attention + alpha * blocks[b].other for b in swapped)), alpha


def _swapped(count: int, policy: str, keep_last: int) -> range:
    return range(max(count - keep_last, 0)) if policy in ("swap", "memo") else range(0)


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"activation policy must be one of {', '.join(POLICIES)}, got {policy!r}")


def _check_keep_last(keep_last: int) -> None:
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last must be an integer >= 0 (blocks that keep their activations), got {keep_last!r}")


def _memo_alpha(blocks: list[BlockActivations], swapped_layers: int, host_bytes_per_rank: float) -> float:
    largest = max(blocks[:swapped_layers], key=lambda b: b.inputs + b.swappable)
    inputs = SwapInputs(
        bandwidth_bytes_per_s=sys.float_info.max,  # the link does not bound alpha here
        layer_forward_s=1.0,
        input_bytes=largest.inputs,
        attention_bytes=largest.attention,
        other_bytes=largest.other,
        host_memory_bytes=max(host_bytes_per_rank, 0.0),
        num_layers=swapped_layers,
        kept_layers=0,  # only the swapped layers are counted
    )
    return swap_fraction(inputs).alpha
