"""Streams and events for overlapping communication with compute.

[Note: stream ordering and memory lifetime]
Every side-stream operation first waits on an event recorded on the compute stream when it is
issued. So memory the compute stream freed before that point is never reused by a side stream
too early. Memory allocated on the compute stream and read by a side stream (reduce-scatter
inputs) is kept referenced until the compute stream has waited on the side stream's completion
event. No `record_stream` anywhere: lifetimes are explicit and visible in the code.
On CPU, or with overlap off, every stream is the current stream and events are None.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


class StreamSet:
    def __init__(self, device: torch.device, overlap: bool):
        self.enabled = device.type == "cuda" and overlap
        if self.enabled:
            # Higher priority so communication kernels are not starved by queued compute.
            self.gather = torch.cuda.Stream(device, priority=-1)
            self.reduce = torch.cuda.Stream(device, priority=-1)
        else:
            self.gather = self.reduce = None

    def record(self, stream: Optional[torch.cuda.Stream] = None) -> Optional[torch.cuda.Event]:
        """An event marking all work queued so far on `stream` (default: the current stream)."""
        if not self.enabled:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream())
        return event

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
