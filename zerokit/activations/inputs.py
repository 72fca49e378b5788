"""A block call's inputs: which one is the hidden state, where each has its tokens, and slicing.

The primary input is the first floating-point tensor argument: the hidden states, with the tokens
in dimension `sequence_dim`. Every other tensor argument (position ids, rotary tables, masks) is
secondary: models build them once and pass the same tensors to every block. A secondary input's
token dimension is `sequence_dim` when its size there is the token count, else its first
dimension of that size (the query rows of an attention mask), else it has none and is passed whole.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from zerokit.activations.tensors import dense_like


@dataclass(frozen=True)
class BlockInputs:
    spec: TreeSpec
    leaves: tuple[Any, ...]
    primary: int  # index of the hidden-state leaf
    token_dims: tuple[Optional[int], ...]  # per leaf; None for non-tensors and tensors without tokens
    tokens: int
    hidden_requires_grad: bool
    hidden_stride: tuple[int, ...]

    @classmethod
    def capture(cls, block_name: str, args: tuple, kwargs: dict, sequence_dim: int) -> "BlockInputs":
        leaves, spec = tree_flatten((args, kwargs))
        primary = next(
            (
                i
                for i, leaf in enumerate(leaves)
                if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dim() > sequence_dim
            ),
            None,
        )
        if primary is None:
            raise ValueError(
                f"block {block_name} got no floating-point tensor with a dimension {sequence_dim} "
                "(activation_memory.sequence_dim) among its arguments, so it has no hidden states to manage."
            )
        tokens = leaves[primary].shape[sequence_dim]
        token_dims = tuple(
            sequence_dim if i == primary else _token_dim(leaf, tokens, sequence_dim) for i, leaf in enumerate(leaves)
        )
        hidden = leaves[primary]
        return cls(spec, tuple(leaves), primary, token_dims, tokens, hidden.requires_grad, tuple(hidden.stride()))

    @property
    def hidden(self) -> Optional[torch.Tensor]:
        return self.leaves[self.primary]

    def without_hidden(self) -> "BlockInputs":
        """The same inputs minus the reference to the hidden states (which are swapped instead)."""
        leaves = list(self.leaves)
        leaves[self.primary] = None
        return dataclasses.replace(self, leaves=tuple(leaves))

    def secondary(self) -> list[torch.Tensor]:
        return [leaf for i, leaf in enumerate(self.leaves) if i != self.primary and isinstance(leaf, torch.Tensor)]

    def signature(self) -> tuple:
        """Equal for two calls that save the same tensors (same shapes, layouts, dtypes, grad needs
        and options)."""
        parts: list[Any] = [str(self.spec)]
        for leaf in self.leaves:
            if isinstance(leaf, torch.Tensor):
                parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.requires_grad, leaf.device))
            elif leaf is None or isinstance(leaf, (bool, int, float, str)):
                parts.append(leaf)
            else:
                parts.append(type(leaf).__qualname__)
        return tuple(parts)

    def rebuild(self, hidden: torch.Tensor, start: int = 0, count: Optional[int] = None) -> tuple[tuple, dict]:
        """(args, kwargs) for running the block again on tokens [start, start + count): `hidden`
        replaces the primary input (already holding only those tokens), secondary inputs are sliced;
        sliced tensors are laid out as the originals; tensors are detached leaves that require grad
        as the originals did."""
        count = self.tokens - start if count is None else count
        leaves = []
        for i, leaf in enumerate(self.leaves):
            if i == self.primary:
                leaf = _detached(dense_like(hidden, self.hidden_stride), self.hidden_requires_grad)
            elif isinstance(leaf, torch.Tensor):
                if self.token_dims[i] is not None and count != self.tokens:
                    leaf = dense_like(leaf.narrow(self.token_dims[i], start, count), leaf.stride())
                leaf = _detached(leaf, self.leaves[i].requires_grad)
            leaves.append(leaf)
        return tree_unflatten(leaves, self.spec)


def _token_dim(leaf: Any, tokens: int, sequence_dim: int) -> Optional[int]:
    if not isinstance(leaf, torch.Tensor):
        return None
    if leaf.dim() > sequence_dim and leaf.shape[sequence_dim] == tokens:
        return sequence_dim
    return next((d for d, size in enumerate(leaf.shape) if size == tokens), None)


def _detached(tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    detached = tensor.detach()
    if requires_grad:
        detached.requires_grad_(True)
    return detached
