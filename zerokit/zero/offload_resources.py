"""Host memory, staging buffers and swap files of offload, made once per engine.

[Note: offload memory]
Everything offload holds on the host is allocated here and counted by category, in the sizes the
plan computed before anything was allocated (zero/memory.py, `_OffloadTally`): persistent host
tensors (gradient, master, moment and parameter shards), offload_optimizer.buffer_count upload
buffers, the two NVMe tile buffers, and two budgeted pools (gradients being accumulated on the
host; parameter shards read from NVMe). Nothing grows past the plan, so a host_memory_budget
checked against the plan holds during training.
"""
from __future__ import annotations

import collections
import warnings
import weakref
from typing import Optional

import torch

from offload.aio import AsyncIO
from offload.copy_engine import CopyHandle
from offload.host_memory import allocate_host_buffer
from offload.nvme import NVMeSwapper
from offload.pinned_pool import PinnedBufferPool, PinnedPoolBudgetError
from offload.raw_memory import aligned_size
from zerokit.zero.host_gradients import HostGradients
from zerokit.zero.host_optimizer import HostOptimizerState
from zerokit.zero.host_params import HostParamShard
from zerokit.zero.memory import GiB, HOST_CATEGORIES, NVME_CATEGORIES, HostMemoryError, OffloadBytes
from zerokit.zero.policy import OffloadPolicy
from zerokit.zero.streams import StreamSet


class UploadRing:
    """Pinned buffers of updated parameters, used in turn: one is refilled by the CPU only once
    the upload that read it has completed, so the CPU works on a tile while earlier ones upload."""

    def __init__(self, buffers: list[torch.Tensor]):
        self._buffers = buffers
        self._fences: list[Optional[CopyHandle]] = [None] * len(buffers)
        self._next = 0

    def take(self, numel: int, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        if self._fences[slot] is not None:
            self._fences[slot].wait()
            self._fences[slot] = None
        size = torch.empty((), dtype=dtype).element_size()
        return slot, self._buffers[slot][: numel * size].view(dtype)

    def hold(self, slot: int, fence: CopyHandle) -> None:
        """The buffer in `slot` is being read until `fence` completes."""
        self._fences[slot] = fence

    def drain(self) -> None:
        for slot, fence in enumerate(self._fences):
            if fence is not None:
                fence.wait()
                self._fences[slot] = None


class OffloadResources:
    def __init__(self, policy: OffloadPolicy, plan: OffloadBytes, streams: StreamSet, rank: int):
        self.policy = policy
        self.plan = plan
        self.streams = streams
        cuda = streams.device.type == "cuda"
        self.pin_optimizer = cuda and policy.optimizer.pin_memory
        self.pin_params = cuda and policy.params.pin_memory
        self._host = collections.Counter()
        self._nvme = collections.Counter()
        self._pin_warned = False
        self._gradients: list[weakref.ref[HostGradients]] = []
        self._params_in_host = 0  # elements of parameter shards kept in host memory under nvme

        self.upload_ring: Optional[UploadRing] = None
        if plan.upload_buffer_bytes:
            buffers = [
                self.host_tensor(plan.upload_buffer_bytes, torch.uint8, "staging", self.pin_optimizer, "upload buffer")
                for _ in range(policy.optimizer.buffer_count)
            ]
            self.upload_ring = UploadRing(buffers)
        self.nvme_staging: list[torch.Tensor] = [
            self.host_tensor(plan.nvme_staging_bytes, torch.uint8, "staging", False, "NVMe tile buffer")
            for _ in range(2 if plan.nvme_staging_bytes else 0)
        ]
        self.gradient_pool = self._pool(plan.gradient_pool_bytes, self.pin_optimizer, "offload_optimizer.buffer_count")
        self.param_pool = self._pool(plan.param_pool_bytes, self.pin_params, "offload_param.buffer_count")

        io = AsyncIO() if plan.optimizer_nvme_bytes or plan.param_nvme_bytes else None
        self.optimizer_swapper = self.param_swapper = None
        if plan.optimizer_nvme_bytes:
            self.optimizer_swapper = NVMeSwapper(
                policy.optimizer.nvme_path, plan.optimizer_nvme_bytes, rank=rank, io=io
            )
        if plan.param_nvme_bytes:
            self.param_swapper = NVMeSwapper(policy.params.nvme_path, plan.param_nvme_bytes, rank=rank, io=io)

    # -- what groups keep off the device ---------------------------------------------------------

    def host_gradients(self, numel: int) -> HostGradients:
        gradients = HostGradients(numel, self)
        self._gradients.append(weakref.ref(gradients))
        return gradients

    def optimizer_state(self, key: str, master: torch.Tensor, pieces: list[tuple[int, int]]) -> HostOptimizerState:
        return HostOptimizerState(key, master, pieces, self)

    def param_shard(self, key: str, values: torch.Tensor) -> HostParamShard:
        """A sharded group's parameters; kept in host memory under cpu, and under nvme for the
        first groups within max_in_cpu elements (the order memory.py assumes)."""
        resident = self.policy.params.device == "cpu"
        if not resident and self._params_in_host + values.numel() <= self.policy.params.max_in_cpu:
            self._params_in_host += values.numel()
            resident = True
        return HostParamShard(key, values, self, resident)

    # -- allocation ------------------------------------------------------------------------------

    def host_tensor(self, numel: int, dtype: torch.dtype, category: str, pin: bool, what: str) -> torch.Tensor:
        """A page-aligned host tensor of `numel` elements, counted under `category`."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        try:
            buffer = allocate_host_buffer(nbytes, pin=pin)
        except (RuntimeError, MemoryError) as error:
            raise HostMemoryError(
                f"allocating {nbytes} bytes of host memory for the {what} failed ({error}); offload needs "
                f"{self.plan.host_total} bytes ({self.plan.host_total / GiB:.2f} GiB) per rank. Free host memory, "
                "move states to NVMe (offload_optimizer / offload_param device nvme) or use more ranks."
            ) from error
        if pin and not buffer.pinned:
            self._warn_unpinned(nbytes, what, buffer.pin_reason)
        self._host[category] += nbytes
        return buffer.tensor.view(dtype)

    def count_nvme(self, category: str, nbytes: int) -> None:
        self._nvme[category] += nbytes

    def gradient_staging(self, nbytes: int) -> torch.Tensor:
        """A pooled buffer for a gradient being accumulated on the host; if the pool is full,
        accumulations in flight are finished first, which frees theirs."""
        try:
            return self.gradient_pool.acquire(nbytes)
        except PinnedPoolBudgetError:
            for ref in self._gradients:
                gradients = ref()
                if gradients is not None:
                    gradients.settle()
            return self.gradient_pool.acquire(nbytes)

    def param_staging(self, nbytes: int, read_ahead: bool) -> Optional[torch.Tensor]:
        """A pooled buffer for a parameter shard read from (or written to) NVMe. Reads ahead leave
        room for one shard needed now, and get None rather than wait when there is none."""
        if read_ahead:
            largest = self.plan.param_pool_bytes // (self.policy.params.buffer_count + 1)
            if self.param_pool.in_use_bytes + aligned_size(nbytes) > self.param_pool.budget_bytes - largest:
                return None
        return self.param_pool.acquire(nbytes)

    def _pool(self, nbytes: int, pin: bool, setting: str) -> Optional[PinnedBufferPool]:
        if not nbytes:
            return None
        return PinnedBufferPool(nbytes, pin=pin, budget_setting=f"zero_optimization.{setting}")

    def _warn_unpinned(self, nbytes: int, what: str, reason: str) -> None:
        if self._pin_warned:
            return
        self._pin_warned = True
        warnings.warn(
            f"zerokit could not pin {nbytes} bytes of host memory for the {what} ({reason}); copies to and from "
            f"unpinned memory are synchronous and slower. Offload pins {self.plan.pinned} bytes per rank: raise the "
            "locked-memory limit (ulimit -l), pin less (move states to NVMe, use more ranks), or set pin_memory "
            "false in offload_optimizer / offload_param to use pageable memory on purpose.",
            RuntimeWarning,
            stacklevel=4,
        )

    # -- accounting and shutdown -----------------------------------------------------------------

    def breakdown(self) -> dict[str, int]:
        """Bytes held now: host_<category> and nvme_<category>."""
        host = {category: self._host[category] for category in HOST_CATEGORIES}
        for pool in (self.gradient_pool, self.param_pool):
            if pool is not None:
                host["staging"] += pool.reserved_bytes
        nvme = {category: self._nvme[category] for category in NVME_CATEGORIES}
        return {**{f"host_{k}": v for k, v in host.items()}, **{f"nvme_{k}": v for k, v in nvme.items()}}

    def swap_directories(self) -> list[str]:
        return [str(s.directory) for s in (self.optimizer_swapper, self.param_swapper) if s is not None]

    def close(self) -> None:
        """Wait for copies and I/O in flight, then remove the swap files."""
        if self.upload_ring is not None:
            self.upload_ring.drain()
        for swapper in (self.optimizer_swapper, self.param_swapper):
            if swapper is not None:
                swapper.close()
