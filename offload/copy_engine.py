"""Asynchronous host<->device copies on dedicated streams, one per direction, so both run at once.

[Note: copy lifetimes]
Each copy is queued on its direction's stream and returns a CopyHandle whose event marks its
completion. The engine keeps references to the source and destination until that event has
completed (checked on the host), so neither tensor's memory can be freed and reused while the
DMA still touches it; no `record_stream`. Ordering:
- to_host first waits for the current stream, which produced the device tensor.
- to_device with an engine-allocated destination waits for the current stream too (the new
  block may have been freed by work still queued there). With a caller-provided destination it
  waits only for `after` (e.g. the event of the last kernel that read that buffer), so a
  prefetch can overlap the compute before it.
Consumers call handle.wait_stream() (GPU-side wait) or handle.wait() (host-side) before use.
On CPU the same API performs plain copies and returns completed handles.
"""
from __future__ import annotations

import threading
from typing import Optional, Union

import torch


class CopyHandle:
    """Completion of one asynchronous copy."""

    def __init__(self, event: Optional["torch.cuda.Event"], device: torch.device):
        self.event = event  # None: already complete (CPU copies)
        self.device = device

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Block the host until the copy finished."""
        if self.event is not None:
            self.event.synchronize()

    def wait_stream(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        """Make `stream` (default: the current stream) wait for the copy, without blocking the host."""
        if self.event is not None:
            (stream if stream is not None else torch.cuda.current_stream(self.device)).wait_event(self.event)


class CopyEngine:
    def __init__(self, device: Union[torch.device, str, int, None] = None):
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self._h2d: Optional[torch.cuda.Stream] = torch.cuda.Stream(self.device)
            self._d2h: Optional[torch.cuda.Stream] = torch.cuda.Stream(self.device)
        elif self.device.type == "cpu":
            self._h2d = self._d2h = None
        else:
            raise ValueError(f"CopyEngine supports cuda and cpu devices, got {self.device}")
        self._lock = threading.Lock()
        self._in_flight: list[tuple[CopyHandle, tuple[torch.Tensor, ...]]] = []

    @property
    def in_flight(self) -> int:
        """Copies whose tensors the engine still holds (not yet seen complete)."""
        with self._lock:
            self._reap()
            return len(self._in_flight)

    def to_device(
        self,
        src: torch.Tensor,
        out: Optional[torch.Tensor] = None,
        after: Optional["torch.cuda.Event"] = None,
    ) -> tuple[torch.Tensor, CopyHandle]:
        """Copy a host tensor (pinned for a truly asynchronous copy) to the device."""
        if src.device.type != "cpu":
            raise ValueError(f"to_device copies from host memory, got a tensor on {src.device}")
        if out is None:
            out = torch.empty(src.shape, dtype=src.dtype, device=self.device)
            after = self._record_current()
        else:
            _check_pair(src, out, self.device)
        return out, self._copy(self._h2d, src, out, after)

    def to_host(
        self, src: torch.Tensor, out: torch.Tensor, after: Optional["torch.cuda.Event"] = None
    ) -> CopyHandle:
        """Copy a device tensor into a host tensor (pinned for a truly asynchronous copy).

        Waits for the current stream first, plus `after` when given."""
        if out.device.type != "cpu":
            raise ValueError(f"to_host copies into host memory, got out on {out.device}")
        _check_pair(out, src, self.device)
        if self._d2h is not None:
            self._d2h.wait_event(self._record_current())
        return self._copy(self._d2h, src, out, after)

    def synchronize(self) -> None:
        """Wait for every copy issued so far and drop the references held for them."""
        with self._lock:
            in_flight, self._in_flight = self._in_flight, []
        for handle, _ in in_flight:
            handle.wait()

    def _copy(
        self,
        stream: Optional["torch.cuda.Stream"],
        src: torch.Tensor,
        out: torch.Tensor,
        after: Optional["torch.cuda.Event"],
    ) -> CopyHandle:
        if stream is None:
            out.copy_(src)
            return CopyHandle(None, self.device)
        if after is not None:
            stream.wait_event(after)
        with torch.cuda.stream(stream):
            out.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        handle = CopyHandle(event, self.device)
        with self._lock:
            self._reap()
            self._in_flight.append((handle, (src, out)))
        return handle

    def _record_current(self) -> Optional["torch.cuda.Event"]:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _reap(self) -> None:
        self._in_flight = [(h, keep) for h, keep in self._in_flight if not h.done()]


def _check_pair(host: torch.Tensor, device_tensor: torch.Tensor, device: torch.device) -> None:
    if device_tensor.device != device:
        raise ValueError(f"expected a tensor on {device}, got one on {device_tensor.device}")
    if host.shape != device_tensor.shape or host.dtype != device_tensor.dtype:
        raise ValueError(
            f"source and destination differ: {tuple(host.shape)} {host.dtype} vs "
            f"{tuple(device_tensor.shape)} {device_tensor.dtype}"
        )
