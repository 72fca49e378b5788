"""Page-aligned host buffers for O_DIRECT file I/O, pinned for fast copies when CUDA is present."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from offload.extension import extension_status, native_ops
from offload.raw_memory import IO_ALIGNMENT


@dataclass(frozen=True, eq=False)  # a buffer is itself, not its contents: pools find them by identity
class HostBuffer:
    tensor: torch.Tensor  # uint8, exactly the requested bytes, starting at an aligned address
    pinned: bool
    pin_reason: str  # why it is not pinned, when pinning was asked for and failed


def allocate_host_buffer(nbytes: int, *, pin: Optional[bool] = None, alignment: int = IO_ALIGNMENT) -> HostBuffer:
    """Allocate nbytes of aligned host memory, freed when the last view of the tensor dies.

    pin=None pins when CUDA is available. Pinning uses cudaHostRegister on the aligned block, or
    torch's pinned allocator when the extension cannot reach the CUDA runtime.
    """
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    if alignment < IO_ALIGNMENT or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two >= {IO_ALIGNMENT}, got {alignment}")
    if pin is None:
        pin = torch.cuda.is_available()
    if pin and torch.cuda.is_available():
        torch.cuda.init()  # pin in the same primary context torch uses
    tensor, pinned, reason = native_ops().allocate_host(nbytes, alignment, pin)
    if pin and not pinned and torch.cuda.is_available() and extension_status().path != "python":
        # The native path could not reach the CUDA runtime; torch's pinned allocator can.
        from offload.fallback import allocate_host as torch_allocate_host

        tensor, pinned, torch_reason = torch_allocate_host(nbytes, alignment, pin)
        reason = "" if pinned else f"{reason}; {torch_reason}"
    return HostBuffer(tensor, pinned, reason)
