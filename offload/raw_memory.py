"""Alignment rules and raw byte access for host tensors used in file I/O."""
from __future__ import annotations

import ctypes

import torch

# File offsets, O_DIRECT transfers and on-disk extents are multiples of this (csrc/async_io.h).
IO_ALIGNMENT = 4096


def aligned_size(nbytes: int, alignment: int = IO_ALIGNMENT) -> int:
    """nbytes rounded up to a multiple of alignment: the extent a tensor occupies in a swap file."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return -(-nbytes // alignment) * alignment


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def check_host_buffer(tensor: torch.Tensor, name: str = "buffer") -> None:
    """Raise unless tensor is a contiguous CPU tensor, the only kind file I/O can address directly."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got one on {tensor.device}; copy it to host memory first")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() first")


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes (valid while the tensor lives)."""
    check_host_buffer(tensor)
    nbytes = tensor_nbytes(tensor)
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")
