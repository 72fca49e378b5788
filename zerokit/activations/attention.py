"""Seeing and answering a block's attention calls.

memo never recomputes attention: in forward an AttentionRecorder notes each call of
torch.nn.functional.scaled_dot_product_attention (its query/key/value and its output, which is
swapped in full); when the other activations are recomputed for some tokens, an AttentionReplay
answers each call with the stored output rows of those tokens instead of computing attention.
Both are TorchFunctionModes, active only while the block runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from zerokit.activations.tensors import dense_like

SDPA = F.scaled_dot_product_attention
_QKV = ("query", "key", "value")


@dataclass(frozen=True)
class AttentionCall:
    """One attention call, its tensors detached: a record keeps its calls, the graph's saved-tensor
    hooks keep the record, and a tensor with its grad_fn here would close a reference cycle
    through the graph that the garbage collector cannot see (the block's memory would leak)."""

    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # query, key, value
    output: torch.Tensor
    output_requires_grad: bool


def _query_key_value(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values = list(args[:3]) + [kwargs[name] for name in _QKV[len(args[:3]) :]]
    return values[0], values[1], values[2]


class AttentionRecorder(TorchFunctionMode):
    """Notes every attention call; `inside` is the index of the call running now (its saved
    tensors are being packed), else None. `on_output(index, call)` runs when a call returns."""

    def __init__(self, on_output: Optional[Callable[[int, AttentionCall], None]] = None):
        super().__init__()
        self.calls: list[AttentionCall] = []
        self.inside: Optional[int] = None
        self._on_output = on_output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not SDPA:
            return func(*args, **kwargs)
        self.inside = len(self.calls)
        try:
            output = func(*args, **kwargs)
        finally:
            self.inside = None
        query, key, value = _query_key_value(args, kwargs)
        call = AttentionCall((query.detach(), key.detach(), value.detach()), output.detach(), output.requires_grad)
        self.calls.append(call)
        if self._on_output is not None:
            self._on_output(len(self.calls) - 1, call)
        return output


class AttentionReplay(TorchFunctionMode):
    """Answers attention call j with rows [start, start + count) (dimension -2, the query
    dimension) of `outputs[j]`, and keeps each call's query/key/value in `calls`."""

    def __init__(self, outputs: Sequence[torch.Tensor], requires_grad: Sequence[bool], start: int, count: int):
        super().__init__()
        self.outputs = outputs
        self.requires_grad = requires_grad
        self.start = start
        self.count = count
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not SDPA:
            return func(*args, **kwargs)
        index = len(self.calls)
        if index >= len(self.outputs):
            raise RuntimeError(
                f"the block called scaled_dot_product_attention {index + 1} times when recomputed but "
                f"{len(self.outputs)} times in its forward; memo needs a forward that does the same every time."
            )
        query, key, value = _query_key_value(args, kwargs)
        if query.shape[-2] != self.count:
            raise RuntimeError(
                f"attention call {index} got {query.shape[-2]} query rows when the block was recomputed for "
                f"{self.count} tokens; memo needs the tokens in dimension -2 of the query, as "
                "scaled_dot_product_attention defines it."
            )
        self.calls.append((query.detach(), key.detach(), value.detach()))
        stored = self.outputs[index]
        rows = dense_like(stored.narrow(-2, self.start, self.count), stored.stride()).detach()
        return rows.requires_grad_(self.requires_grad[index])


def check_attention_seen(block_name: str, calls: int) -> None:
    if calls == 0:
        raise RuntimeError(
            f"block {block_name} did not call torch.nn.functional.scaled_dot_product_attention, which "
            "activation_memory.policy 'memo' needs (it keeps attention outputs and never recomputes them); "
            "for Hugging Face models load the model with attn_implementation=\"sdpa\", or use policy 'swap' "
            "or 'recompute' for blocks without such attention."
        )
