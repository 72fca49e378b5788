"""Facts about saved tensors: their memory, how they alias each other, and their token rows."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def storage_ptr(tensor: torch.Tensor) -> int:
    """The address of the tensor's storage (computed: untyped_storage() builds an object per call,
    and the pack hooks ask for this on every saved tensor)."""
    return tensor.data_ptr() - tensor.storage_offset() * tensor.element_size()


def parameter_storages(module: torch.nn.Module) -> set[int]:
    """Storage addresses of the module's parameters and buffers, as they are now (ZeRO-3 gathers
    parameters into new storage before each block's forward)."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return {ptr for ptr in (storage_ptr(t) for t in tensors) if ptr != 0}


def view_key(tensor: torch.Tensor) -> tuple:
    """Equal for two tensors exactly when they are the same view of the same memory."""
    return (storage_ptr(tensor), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def span(tensor: torch.Tensor) -> int:
    """Elements from the first to one past the last element the tensor addresses."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether the tensor's elements fill its span exactly once (contiguous up to a permutation)."""
    if tensor.numel() == 0 or any(stride < 0 for stride in tensor.stride()):
        return False
    expected = 1
    dims = sorted(((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def contains(base: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether every element of `tensor` is an element of `base` (so a copy of base holds tensor)."""
    if storage_ptr(base) != storage_ptr(tensor) or base.dtype != tensor.dtype or base.device != tensor.device:
        return False
    if view_key(base) == view_key(tensor):
        return True
    if not is_dense(base) or tensor.numel() == 0 or any(stride < 0 for stride in tensor.stride()):
        return False
    start = tensor.storage_offset()
    return base.storage_offset() <= start and start + span(tensor) <= base.storage_offset() + span(base)


def empty_like_layout(tensor: torch.Tensor, *, device: torch.device | str, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised tensor with `tensor`'s strides when it is dense (a straight copy), else contiguous."""
    if is_dense(tensor):
        return torch.empty_strided(
            tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device, pin_memory=pin_memory
        )
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=device, pin_memory=pin_memory)


def dense_like(tensor: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """`tensor`, copied if needed, laid out densely with its dimensions in the memory order that
    `stride` gives them. A block run again on fewer tokens then sees the same layouts as in its
    forward, so its ops take the same paths (and save the same tensors, in the same order)."""
    order = sorted(range(tensor.dim()), key=lambda d: (-stride[d], d))  # outermost first
    expected, step = [0] * tensor.dim(), 1
    for d in reversed(order):
        expected[d] = step
        step *= tensor.shape[d]
    if all(size == 1 or s == e for size, s, e in zip(tensor.shape, tensor.stride(), expected)):
        return tensor
    return torch.empty_strided(tensor.shape, expected, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens are in a saved tensor: dimension `dim` holds `factor` * tokens entries.

    With factor > 1 the dimension folds the tokens with another dimension (a Linear on a
    (batch, seq, hidden) input saves a (batch * seq, hidden) view): `tokens_outer` says whether the
    tokens are the outer part (index = token * factor + j) or the inner one (j * tokens + token).
    """

    dim: int
    factor: int = 1
    tokens_outer: bool = False

    def rows(self, tensor: torch.Tensor, tokens: int, start: int, count: int) -> torch.Tensor:
        """Tokens [start, start + count) of a tensor holding `tokens` tokens; a view when the
        tensor's strides allow (always for a contiguous tensor)."""
        if self.factor == 1:
            return tensor.narrow(self.dim, start, count)
        shape = list(tensor.shape)
        split = [tokens, self.factor] if self.tokens_outer else [self.factor, tokens]
        unfolded = tensor.reshape(shape[: self.dim] + split + shape[self.dim + 1 :])
        token_dim = self.dim if self.tokens_outer else self.dim + 1
        return unfolded.narrow(token_dim, start, count)

    def shape(self, shape: torch.Size, count: int) -> torch.Size:
        """The shape of `rows(...)` of a tensor of `shape` for `count` tokens."""
        sizes = list(shape)
        split = [count, self.factor] if self.tokens_outer else [self.factor, count]
        return torch.Size(sizes[: self.dim] + split + sizes[self.dim + 1 :])
