"""Streams and events for overlapping communication and host transfers with compute.

[Note: stream ordering and memory lifetime]
Every side-stream operation first waits on an event recorded on the compute stream when it is
issued. So memory the compute stream freed before that point is never reused by a side stream
too early. Memory allocated on the compute stream and read by a side stream (reduce-scatter
inputs, gradient shards copied to the host) is kept referenced until the compute stream has
waited on the side stream's completion event. No `record_stream` anywhere: lifetimes are
explicit and visible in the code.
On CPU, or with overlap off, every stream is the current stream and events are None.

Host transfers (offload) add the host's side: a host buffer written by a device-to-host copy is
read on the host only after its fence completed, and a host buffer read by a host-to-device copy
is overwritten only after its fence completed. Fences exist on CUDA even with overlap off (the
copies are asynchronous all the same); on CPU every copy is complete when it returns.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from offload.copy_engine import CopyHandle


class StreamSet:
    def __init__(self, device: torch.device, overlap: bool, transfers: bool = False):
        """transfers: also create the host<->device copy streams that offload uses."""
        self.device = device
        self.enabled = device.type == "cuda" and overlap
        if self.enabled:
            # Higher priority so communication kernels are not starved by queued compute.
            self.gather = torch.cuda.Stream(device, priority=-1)
            self.reduce = torch.cuda.Stream(device, priority=-1)
        else:
            self.gather = self.reduce = None
        # One stream per direction, so uploads and downloads run at the same time.
        copies = self.enabled and transfers
        self.to_host = torch.cuda.Stream(device) if copies else None
        self.to_device = torch.cuda.Stream(device) if copies else None

    def record(self, stream: Optional[torch.cuda.Stream] = None) -> Optional[torch.cuda.Event]:
        """An event marking all work queued so far on `stream` (default: the current stream)."""
        if not self.enabled:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream())
        return event

    def fence(self, stream: Optional[torch.cuda.Stream] = None) -> CopyHandle:
        """Completion of the work queued so far on `stream` (default: the current stream), for the
        host to wait on: an event on CUDA whether or not overlap is on, none on CPU."""
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(stream if stream is not None else torch.cuda.current_stream())
        return CopyHandle(event, self.device)

    def wait(self, event: Optional[torch.cuda.Event], stream: Optional[torch.cuda.Stream] = None) -> None:
        """Make `stream` (default: the current stream) wait for `event`, without blocking the host."""
        if event is not None:
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(event)

    def side(self, stream: Optional[torch.cuda.Stream]):
        """Run the block on `stream` after everything queued so far on the current stream."""
        if stream is None:
            return contextlib.nullcontext()
        self.wait(self.record(), stream)
        return torch.cuda.stream(stream)
