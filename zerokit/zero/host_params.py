"""A sharded group's parameters (this rank's shard, compute dtype) kept off the device (stage 3).

In host memory (pinned, so uploads are asynchronous DMA) or in the parameters' swap file. Each
gather uploads the shard into the rank's slice of the gathered buffer, on the to-device stream,
and all-gathers from there; a shard on NVMe is first read into a pooled pinned buffer, ideally
ahead of time (`read_ahead`, driven by the runtime's prefetch order) so the upload need not wait.
After an optimizer step the new values are written back (`writable` / `commit`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from offload.copy_engine import CopyHandle
from offload.nvme import SwapHandle
from offload.raw_memory import aligned_size

if TYPE_CHECKING:
    from zerokit.zero.offload_resources import OffloadResources


class HostParamShard:
    def __init__(self, key: str, values: torch.Tensor, resources: "OffloadResources", resident: bool):
        """values: the shard's initial values (any device)."""
        self.key = key
        self.numel = values.numel()
        self.dtype = values.dtype
        self.nbytes = values.numel() * values.element_size()
        self.resources = resources
        self.resident = resident
        self._upload: Optional[CopyHandle] = None  # resident: the last upload reading `host`
        self._read: Optional[tuple[torch.Tensor, SwapHandle]] = None  # nvme: a read in flight or done
        self._writing: Optional[torch.Tensor] = None
        if resident:
            self.host = resources.host_tensor(self.numel, self.dtype, "parameters", resources.pin_params,
                                              "parameter shard")  # fmt: skip
            self.host.copy_(values)
        else:
            self.host = None
            self.writable().copy_(values)
            self.commit()
            resources.count_nvme("parameters", aligned_size(self.nbytes))

    # -- to the device ---------------------------------------------------------------------------

    def read_ahead(self) -> None:
        """Start reading the shard from NVMe into a pinned buffer, if there is room for one."""
        if self.resident or self._read is not None:
            return
        raw = self.resources.param_staging(self.nbytes, read_ahead=True)
        if raw is None:
            return
        self._read = (raw, self.resources.param_swapper.swap_in(self.key, raw.view(self.dtype)))

    def upload(self, out: torch.Tensor, after: Optional[torch.cuda.Event] = None) -> CopyHandle:
        """Copy the shard into the device tensor `out` on the to-device stream (after the compute
        stream's work queued so far, and `after`); returns the copy's fence."""
        streams = self.resources.streams
        if self.resident:
            source = self.host
        else:
            if self._read is None:
                raw = self.resources.param_staging(self.nbytes, read_ahead=False)
                self._read = (raw, self.resources.param_swapper.swap_in(self.key, raw.view(self.dtype)))
            raw, reading = self._read
            reading.wait()
            source = raw.view(self.dtype)
        with streams.side(streams.to_device):
            streams.wait(after)
            out.copy_(source, non_blocking=True)
            fence = streams.fence(streams.to_device)
        if self.resident:
            self._upload = fence
        else:
            self.resources.param_pool.release(self._read[0], after=fence)
            self._read = None
        return fence

    # -- from the host (optimizer steps, checkpoints) --------------------------------------------

    def writable(self) -> torch.Tensor:
        """A host tensor to fill with the shard's new values completely, then `commit`."""
        if self.resident:
            if self._upload is not None:
                self._upload.wait()  # the last upload still reads the old values
                self._upload = None
            return self.host
        self._drop_read()
        self._writing = self.resources.param_staging(self.nbytes, read_ahead=False)
        return self._writing.view(self.dtype)

    def commit(self) -> None:
        if self.resident:
            return
        raw, self._writing = self._writing, None
        writing = self.resources.param_swapper.swap_out(self.key, raw.view(self.dtype))
        self.resources.param_pool.release(raw, after=writing)

    def read(self) -> torch.Tensor:
        """The shard's values on the host (the resident tensor itself, else a copy)."""
        if self.resident:
            return self.host
        self._drop_read()
        raw = self.resources.param_staging(self.nbytes, read_ahead=False)
        try:
            self.resources.param_swapper.swap_in(self.key, raw.view(self.dtype)).wait()
            return raw.view(self.dtype).clone()
        finally:
            self.resources.param_pool.release(raw)

    def write(self, start: int, stop: int, values: torch.Tensor) -> None:
        """Set elements [start, stop) of the shard."""
        current = None if self.resident else self.read()
        target = self.writable()
        if current is not None:
            target.copy_(current)
        target[start:stop].copy_(values)
        self.commit()

    def _drop_read(self) -> None:
        if self._read is not None:
            raw, reading = self._read
            self._read = None
            reading.wait()
            self.resources.param_pool.release(raw)
