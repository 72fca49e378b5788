"""A bounded pool of page-aligned (pinned when CUDA is present) host buffers, allocated once, reused.

[Note: pool budget]
Every byte the pool holds from the system (buffers in use, idle, or waiting for an in-flight
copy) counts against `budget_bytes`, so the pool can never pin more than it was allowed: small
hosts fail with a clear message instead of an out-of-memory kill. A request that cannot fit
even after idle buffers are freed raises PinnedPoolBudgetError.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional, Protocol

import torch

from offload.host_memory import HostBuffer, allocate_host_buffer
from offload.raw_memory import IO_ALIGNMENT, aligned_size


class Waitable(Protocol):
    """Completion of an asynchronous operation: CopyHandle and IO requests qualify."""

    def done(self) -> bool: ...

    def wait(self) -> None: ...


class PinnedPoolBudgetError(MemoryError):
    """A request does not fit the pool's byte budget."""


class PinnedBufferPool:
    def __init__(
        self,
        budget_bytes: int,
        *,
        pin: Optional[bool] = None,
        alignment: int = IO_ALIGNMENT,
        budget_setting: str = "PinnedBufferPool(budget_bytes=...)",
    ):
        """budget_bytes bounds the host memory held; budget_setting names, in error messages, the
        setting a user changes to raise it. pin=None pins when CUDA is available."""
        if not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be a positive int, got {budget_bytes!r}")
        self.budget_bytes = budget_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.alignment = alignment
        self.budget_setting = budget_setting
        self.pin_reason = ""  # why buffers are not pinned, if pinning was asked for and failed
        self._lock = threading.Lock()
        self._idle: list[HostBuffer] = []
        self._in_use: dict[int, HostBuffer] = {}  # keyed by data_ptr
        self._pending: list[tuple[HostBuffer, Waitable]] = []  # released, but still read or written

    @property
    def reserved_bytes(self) -> int:
        """Bytes held from the system: in use, idle and pending."""
        with self._lock:
            return self._reserved()

    @property
    def in_use_bytes(self) -> int:
        with self._lock:
            return sum(_capacity(b) for b in self._in_use.values())

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of nbytes at an aligned address, exclusively the caller's until released."""
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
        size = aligned_size(max(nbytes, 1), self.alignment)
        with self._lock:
            buffer = self._take_idle(size) or self._allocate(nbytes, size)
            self._in_use[buffer.tensor.data_ptr()] = buffer
            return buffer.tensor[:nbytes]

    def release(self, tensor: torch.Tensor, after: Optional[Waitable] = None) -> None:
        """Give a buffer back; with `after`, it is reused only once that operation completed."""
        with self._lock:
            buffer = self._in_use.pop(tensor.data_ptr(), None)
            if buffer is None:
                raise ValueError("this tensor was not acquired from this pool, or was already released")
            if after is None or after.done():
                self._idle.append(buffer)
            else:
                self._pending.append((buffer, after))

    @contextlib.contextmanager
    def borrow(self, nbytes: int) -> Iterator[torch.Tensor]:
        tensor = self.acquire(nbytes)
        try:
            yield tensor
        finally:
            self.release(tensor)

    def trim(self) -> int:
        """Free idle buffers (waiting for pending ones first); returns the bytes freed."""
        with self._lock:
            self._drain_pending(wait=True)
            freed = sum(_capacity(b) for b in self._idle)
            self._idle.clear()
            return freed

    # -- internals, called with the lock held -------------------------------------------------

    def _reserved(self) -> int:
        held = list(self._idle) + list(self._in_use.values()) + [b for b, _ in self._pending]
        return sum(_capacity(b) for b in held)

    def _drain_pending(self, wait: bool) -> None:
        still_pending = []
        for buffer, operation in self._pending:
            if wait:
                operation.wait()
            if wait or operation.done():
                self._idle.append(buffer)
            else:
                still_pending.append((buffer, operation))
        self._pending = still_pending

    def _take_idle(self, size: int) -> Optional[HostBuffer]:
        self._drain_pending(wait=False)
        fitting = [b for b in self._idle if _capacity(b) >= size]
        if not fitting:
            return None
        best = min(fitting, key=_capacity)  # the smallest that fits wastes least
        self._idle.remove(best)
        return best

    def _allocate(self, nbytes: int, size: int) -> HostBuffer:
        in_use = sum(_capacity(b) for b in self._in_use.values())
        if in_use + size > self.budget_bytes:
            raise PinnedPoolBudgetError(
                f"host buffer pool: a request for {nbytes} bytes ({size} with alignment) does not fit the "
                f"budget of {self.budget_bytes} bytes: {in_use} bytes are in use. Raise {self.budget_setting} "
                f"to at least {in_use + size}, or release buffers before acquiring more."
            )
        if self._reserved() + size > self.budget_bytes and self._pending:
            self._drain_pending(wait=True)  # finishing copies may free a buffer that fits
            fitting = self._take_idle(size)
            if fitting is not None:
                return fitting
        # Free idle buffers, largest first, until a new one fits.
        self._idle.sort(key=_capacity)
        while self._idle and self._reserved() + size > self.budget_bytes:
            self._idle.pop()
        buffer = allocate_host_buffer(size, pin=self.pin, alignment=self.alignment)
        if self.pin and not buffer.pinned:
            self.pin_reason = buffer.pin_reason
        return buffer


def _capacity(buffer: HostBuffer) -> int:
    return buffer.tensor.numel()
