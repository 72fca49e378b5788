"""Learning where a block's saved tensors have their tokens, and which can be recomputed token-wise.

A block is run once in full and twice on only its last 2 and last 3 tokens, with attention
answered from the full run's outputs (AttentionReplay). A saved tensor has a token dimension when
exactly one dimension changes between the runs and its size is factor x tokens in each of them.
That is only a guess from shapes: the tensor counts as recomputable token-wise only when the
short runs' values equal the full run's values at the same tokens. Anything else (a tensor that
mixes tokens, follows dropout, or has no token dimension) is swapped whole, which is always
correct. Attention's own saved tensors are never recomputed: its query, key and value are taken
from the replayed call's arguments when they pass the same check, the rest is swapped whole.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from zerokit.activations.attention import AttentionCall
from zerokit.activations.tensors import TokenLayout, view_key

PROBE_TOKENS = (2, 3)  # token counts of the short runs; memo needs blocks of more tokens than this
MIN_TOKENS = max(PROBE_TOKENS) + 1


class SlotKind(enum.Enum):
    TOKENS = "tokens"  # per token: a fraction of its tokens is swapped, the rest recomputed
    ATTENTION_INPUT = "attention_input"  # query, key or value of an attention call: per token as well
    WHOLE = "whole"  # swapped whole


@dataclass(frozen=True)
class SlotLayout:
    kind: SlotKind
    shape: tuple[int, ...]
    dtype: torch.dtype
    call: Optional[int] = None  # the attention call that saved it; None when saved outside attention
    argument: Optional[int] = None  # ATTENTION_INPUT: 0 query, 1 key, 2 value
    tokens: Optional[TokenLayout] = None


@dataclass(frozen=True)
class BlockLayout:
    slots: tuple[SlotLayout, ...]  # in the order the block's forward saves them
    output_requires_grad: tuple[bool, ...]  # per attention call

    @property
    def outside(self) -> tuple[int, ...]:
        """Slots saved outside attention calls: the ones a replayed run saves, in that order."""
        return tuple(k for k, slot in enumerate(self.slots) if slot.call is None)

    def counts(self) -> dict[str, int]:
        found = {kind.value: 0 for kind in SlotKind}
        for slot in self.slots:
            found[slot.kind.value] += 1
        return found


@dataclass(frozen=True)
class Probe:
    """A run on the last `count` tokens: what it saved outside attention, and each attention
    call's query/key/value."""

    count: int
    saved: Sequence[torch.Tensor]
    attention_inputs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def learn_layout(
    block_name: str,
    saved: Sequence[torch.Tensor],
    inside: Sequence[Optional[int]],
    calls: Sequence[AttentionCall],
    probes: Sequence[Probe],
    tokens: int,
) -> BlockLayout:
    """The layout of a block from its full run (`saved`, with the attention call each tensor was
    saved in, `inside`) and its short runs (`probes`; none when the block has too few tokens)."""
    outside = [k for k, call in enumerate(inside) if call is None]
    for probe in probes:
        if len(probe.saved) != len(outside):
            raise RuntimeError(
                f"block {block_name} saves {len(outside)} tensors outside attention for {tokens} tokens but "
                f"{len(probe.saved)} for {probe.count} tokens, so memo cannot recompute some of its tokens; "
                "use activation_memory policy 'swap' or 'recompute' for this block."
            )
    position = {k: r for r, k in enumerate(outside)}
    slots = []
    for k, tensor in enumerate(saved):
        call = inside[k]
        if call is not None:
            slots.append(_attention_slot(tensor, call, calls[call], probes, tokens))
        else:
            samples = [probe.saved[position[k]] for probe in probes]
            layout = _token_layout(tensor, samples, probes, tokens)
            kind = SlotKind.TOKENS if layout is not None else SlotKind.WHOLE
            slots.append(SlotLayout(kind, tuple(tensor.shape), tensor.dtype, tokens=layout))
    return BlockLayout(tuple(slots), tuple(c.output_requires_grad for c in calls))


def _attention_slot(
    tensor: torch.Tensor, call: int, attention: AttentionCall, probes: Sequence[Probe], tokens: int
) -> SlotLayout:
    whole = SlotLayout(SlotKind.WHOLE, tuple(tensor.shape), tensor.dtype, call=call)
    key = view_key(tensor)
    argument = next((i for i, x in enumerate(attention.inputs) if view_key(x) == key), None)
    if argument is None or not probes or tensor.dim() < 2:
        return whole
    layout = TokenLayout(tensor.dim() - 2)  # scaled_dot_product_attention's sequence dimension
    samples = [probe.attention_inputs[call][argument] for probe in probes]
    if tensor.shape[layout.dim] != tokens or not _matches(tensor, layout, samples, probes, tokens):
        return whole
    return SlotLayout(SlotKind.ATTENTION_INPUT, tuple(tensor.shape), tensor.dtype, call, argument, layout)


def _token_layout(
    tensor: torch.Tensor, samples: Sequence[torch.Tensor], probes: Sequence[Probe], tokens: int
) -> Optional[TokenLayout]:
    if not probes or tensor.numel() == 0 or any(s.dim() != tensor.dim() for s in samples):
        return None
    changed = [d for d in range(tensor.dim()) if any(s.shape[d] != tensor.shape[d] for s in samples)]
    if len(changed) != 1 or tensor.shape[changed[0]] % tokens:
        return None
    dim = changed[0]
    factor = tensor.shape[dim] // tokens
    if any(s.shape[dim] != factor * probe.count for s, probe in zip(samples, probes)):
        return None
    if factor == 1:
        candidates = [TokenLayout(dim)]
    else:
        candidates = [TokenLayout(dim, factor, tokens_outer=False), TokenLayout(dim, factor, tokens_outer=True)]
    return next((c for c in candidates if _matches(tensor, c, samples, probes, tokens)), None)


def _matches(
    tensor: torch.Tensor, layout: TokenLayout, samples: Sequence[torch.Tensor], probes: Sequence[Probe], tokens: int
) -> bool:
    """Whether every short run's values equal the full run's at the same (last) tokens."""
    for sample, probe in zip(samples, probes):
        expected = layout.rows(tensor, tokens, tokens - probe.count, probe.count)
        if not _close(layout.rows(sample, probe.count, 0, probe.count), expected):
            return False
    return True


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to rounding: fewer rows can change how a kernel blocks its sums, no more."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False
    if not actual.is_floating_point():
        return torch.equal(actual, expected)
    tolerance = 1e-3 if actual.dtype.itemsize >= 4 else 3e-2
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return bool(torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * scale))
