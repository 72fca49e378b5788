"""Asynchronous file reads and writes of host tensors on a pool of I/O threads.

Files are opened with O_DIRECT where the filesystem allows it (falling back to buffered I/O,
with the reason on `file.fallback_reason`). Requests are split into `block_size` blocks spread
over the threads. File offsets must be multiples of IO_ALIGNMENT; with O_DIRECT a write of n bytes
occupies aligned_size(n) bytes on disk (zero padded), so place extents with aligned_size.
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import torch

from offload.extension import native_ops
from offload.raw_memory import IO_ALIGNMENT, check_host_buffer

DEFAULT_BLOCK_SIZE = 4 << 20  # large enough to reach NVMe bandwidth, small enough to spread


class IoRequest(Protocol):
    """Handle of one submitted read or write; the buffer stays referenced until it completes."""

    nbytes: int

    def done(self) -> bool: ...

    def wait(self) -> None:
        """Block until complete; raises RuntimeError with the first failure."""

    @property
    def error(self) -> str: ...


class IoFile(Protocol):
    path: str
    direct: bool
    fallback_reason: str
    closed: bool

    def close(self) -> None:
        """Close the descriptor; raises RuntimeError while requests on it are in flight."""


class AsyncIO:
    def __init__(self, num_threads: int = 4, block_size: int = DEFAULT_BLOCK_SIZE):
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
        if not isinstance(block_size, int) or block_size <= 0 or block_size % IO_ALIGNMENT:
            raise ValueError(f"block_size must be a positive multiple of {IO_ALIGNMENT}, got {block_size!r}")
        self._pool: Any = native_ops().IoPool(num_threads, block_size)
        self.num_threads = num_threads
        self.block_size = block_size

    def open(self, path: str | os.PathLike, *, create: bool = True, direct: bool = True) -> IoFile:
        """Open (or create) a file for reading and writing, with O_DIRECT when direct and possible."""
        return self._pool.open(os.fspath(path), create, direct)

    def read(self, file: IoFile, tensor: torch.Tensor, offset: int) -> IoRequest:
        """Fill tensor's bytes from the file at offset, asynchronously."""
        return self._submit(file, tensor, offset, write=False)

    def write(self, file: IoFile, tensor: torch.Tensor, offset: int) -> IoRequest:
        """Write tensor's bytes to the file at offset, asynchronously."""
        return self._submit(file, tensor, offset, write=True)

    def _submit(self, file: IoFile, tensor: torch.Tensor, offset: int, write: bool) -> IoRequest:
        check_host_buffer(tensor, "tensor")
        if not isinstance(offset, int) or offset < 0 or offset % IO_ALIGNMENT:
            raise ValueError(
                f"file offset {offset!r} is not a non-negative multiple of {IO_ALIGNMENT}; "
                "place extents at offsets rounded with offload.raw_memory.aligned_size"
            )
        if file.closed:
            raise ValueError(f"file {file.path} is closed")
        return self._pool.submit(file, tensor, offset, write)
