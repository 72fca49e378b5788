"""The copy streams of activation swapping, and the copies themselves.

[Note: swap stream ordering]
Three streams: compute (whatever stream the model runs on), device-to-host and host-to-device.
A copy on a copy stream first waits on an event recorded on the compute stream when it is issued,
so it reads finished values and never writes memory the compute stream still reads. The device
tensor a device-to-host copy reads stays referenced until the compute stream has waited on the
copy's event; only then may the allocator hand its memory to new compute work. No
`record_stream`: lifetimes are explicit. On CPU every copy is synchronous and events are None.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch

from zerokit.activations.host_pool import PinnedHostPool


class SwapStreams:
    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cuda"
        if self.enabled:
            self.to_host = torch.cuda.Stream(device)
            self.to_device = torch.cuda.Stream(device)
        else:
            self.to_host = self.to_device = None
        self.host_pool = PinnedHostPool(pin=self.enabled)

    def record(self, stream: Optional[torch.cuda.Stream] = None) -> Optional[torch.cuda.Event]:
        """An event after all work queued so far on `stream` (default: the current stream)."""
        if not self.enabled:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def wait(self, event: Optional[torch.cuda.Event]) -> None:
        """Order the current (compute) stream after `event`, without blocking the host."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @contextlib.contextmanager
    def _on(self, stream: Optional[torch.cuda.Stream], after: Iterable[Optional[torch.cuda.Event]]) -> Iterator[None]:
        if stream is None:
            yield
            return
        stream.wait_event(self.record())
        for event in after:
            if event is not None:
                stream.wait_event(event)
        with torch.cuda.stream(stream):
            yield

    def copy_to_host(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Optional[torch.cuda.Event]:
        """Copy each device tensor into its host tensor (pinned on CUDA, see host_pool.py) on the
        device-to-host stream, after the work queued so far on the compute stream; returns the event
        that completes them. Keep the device tensors referenced until the compute stream waited on it."""
        with self._on(self.to_host, ()):
            for host, tensor in pairs:
                host.copy_(tensor, non_blocking=self.enabled)
            return self.record(self.to_host)

    def copy_to_device(
        self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], after: Iterable[Optional[torch.cuda.Event]]
    ) -> Optional[torch.cuda.Event]:
        """Copy each host tensor into its device target on the host-to-device stream, after
        `after` (the copies to host that filled them); returns the event that completes them."""
        with self._on(self.to_device, after):
            for target, host in pairs:
                if self.enabled and target.stride() != host.stride():
                    # Layouts differ (a token slice of a permuted tensor): copy_ would make the
                    # host tensor contiguous in pageable memory first, and that copy is
                    # synchronous. Copy as laid out on the host, then rearrange on the device.
                    staged = torch.empty_like(host, device=self.device)
                    staged.copy_(host, non_blocking=True)
                    target.copy_(staged)
                else:
                    target.copy_(host, non_blocking=self.enabled)
            return self.record(self.to_device)
