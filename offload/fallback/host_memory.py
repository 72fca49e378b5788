"""Aligned host tensors from torch's allocators (pinned through torch's pinned allocator)."""
from __future__ import annotations

import torch


def cuda_host_register_unavailable_reason() -> str:
    return "" if torch.cuda.is_available() else "CUDA is not available"


def allocate_host(nbytes: int, alignment: int, pin: bool) -> tuple[torch.Tensor, bool, str]:
    """(uint8 tensor of nbytes starting at an aligned address, pinned, why not pinned)."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if alignment < 8 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two >= 8, got {alignment}")
    reason = cuda_host_register_unavailable_reason() if pin else ""
    pinned = pin and not reason
    # Over-allocate and slice: the view keeps the whole block, and torch's deleter, alive.
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pinned)
    start = -raw.data_ptr() % alignment
    return raw[start : start + nbytes], pinned, reason
