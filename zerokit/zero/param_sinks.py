"""Where the offloaded optimizer writes a group's updated parameters, tile by tile.

A sink is filled on the thread that steps (`buffer`, `commit` per tile, `close` after the last)
and published on the training thread (`publish`, returning the fence of the last upload), which
then gathers the group or marks it as its next gather's source (FlatParamGroup.finish_update).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch

from offload.copy_engine import CopyHandle
from zerokit.zero.tiles import Tile

if TYPE_CHECKING:
    from zerokit.zero.host_params import HostParamShard
    from zerokit.zero.offload_resources import OffloadResources


class DeviceUpload:
    """Each tile is uploaded into `target` (a device tensor over the shard) through the upload
    buffers as soon as it is stepped."""

    def __init__(self, target: torch.Tensor, resources: "OffloadResources"):
        self.target = target
        self.resources = resources
        self.last: Optional[CopyHandle] = None
        self._slot = 0

    def buffer(self, tile: Tile) -> torch.Tensor:
        self._slot, buffer = self.resources.upload_ring.take(tile.numel, self.target.dtype)
        return buffer

    def commit(self, tile: Tile, buffer: torch.Tensor) -> None:
        streams = self.resources.streams
        with streams.side(streams.to_device):
            self.target[tile.start : tile.stop].copy_(buffer, non_blocking=True)
            self.last = streams.fence(streams.to_device)
        self.resources.upload_ring.hold(self._slot, self.last)

    def close(self) -> None:
        pass

    def publish(self) -> Optional[CopyHandle]:
        return self.last


class HostShardWrite:
    """The updated parameters go into the group's offloaded parameter shard."""

    def __init__(self, shard: "HostParamShard"):
        self.shard = shard
        self.values = shard.writable()

    def buffer(self, tile: Tile) -> torch.Tensor:
        return self.values[tile.start : tile.stop]

    def commit(self, tile: Tile, buffer: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        self.shard.commit()

    def publish(self) -> Optional[CopyHandle]:
        return None


class StagedUpload:
    """Delayed parameter update: the updated shard collects in pinned host memory while the
    device still trains on the old parameters, and is uploaded in one copy when published.
    One per group, reused every step."""

    def __init__(self, numel: int, dtype: torch.dtype, resources: "OffloadResources"):
        self.resources = resources
        self.staging = resources.host_tensor(numel, dtype, "staging", resources.pin_optimizer,
                                             "delayed-update parameter shard")  # fmt: skip
        self.target: Optional[torch.Tensor] = None
        self.last: Optional[CopyHandle] = None  # the last upload, which reads `staging`

    def open(self, target: torch.Tensor) -> "StagedUpload":
        """Start a step whose parameters go to `target` once published."""
        if self.last is not None:
            self.last.wait()  # the previous upload still reads the staging shard
        self.target = target
        return self

    def buffer(self, tile: Tile) -> torch.Tensor:
        return self.staging[tile.start : tile.stop]

    def commit(self, tile: Tile, buffer: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass

    def publish(self) -> Optional[CopyHandle]:
        streams = self.resources.streams
        with streams.side(streams.to_device):
            self.target.copy_(self.staging, non_blocking=True)
            self.last = streams.fence(streams.to_device)
        return self.last


Sink = Union[DeviceUpload, HostShardWrite, StagedUpload]
