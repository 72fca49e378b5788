"""Readings of one process's memory: PyTorch's CUDA allocator, NVML, host RSS and pinned memory.

Every probe answers None for what it cannot see (no GPU, no NVML, an older torch), so the same
sampler runs on CPU-only machines.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import psutil
import torch


@dataclass(frozen=True)
class Reading:
    cuda_allocated: Optional[int]
    cuda_reserved: Optional[int]
    cuda_active: Optional[int]
    nvml_used: Optional[int]  # this process on its GPU, else the whole GPU
    host_rss: int
    host_pinned: Optional[int]


class CudaProbe:
    """PyTorch's caching allocator on this rank's device (read from any thread)."""

    def __init__(self, device: Optional[torch.device]):
        self.device = device

    def read(self) -> tuple[Optional[int], Optional[int], Optional[int]]:
        if self.device is None or not torch.cuda.is_initialized():
            return None, None, None
        stats = torch.cuda.memory_stats(self.device)
        return (
            stats.get("allocated_bytes.all.current"),
            stats.get("reserved_bytes.all.current"),
            stats.get("active_bytes.all.current"),
        )

    def pinned(self) -> Optional[int]:
        stats = getattr(torch.cuda.memory, "host_memory_stats", None)
        if self.device is None or stats is None or not torch.cuda.is_initialized():
            return None
        return stats().get("allocated_bytes.current")


class NvmlProbe:
    """Device memory NVML sees for this process (CUDA context, NCCL, allocator pools), or for the
    whole GPU where per-process figures are not available (containers with their own pids)."""

    def __init__(self, device: Optional[torch.device]):
        self.handle = None
        self.unavailable = "no CUDA device" if device is None else ""
        if device is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(device.index or 0))
        except Exception as error:  # ImportError, or NVMLError without a driver
            self.unavailable = f"NVML unavailable: {error}"

    def read(self) -> Optional[int]:
        if self.handle is None:
            return None
        try:
            for process in self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if process.pid == os.getpid() and process.usedGpuMemory is not None:
                    return int(process.usedGpuMemory)
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:  # a driver hiccup must not stop the training run
            return None


def _physical_index(index: int) -> int:
    """NVML counts every GPU; CUDA counts the visible ones in CUDA_VISIBLE_DEVICES order."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index < len(entries) and entries[index].isdigit():
        return int(entries[index])
    return index


class Probes:
    def __init__(self, device: Optional[torch.device]):
        self.cuda = CudaProbe(device)
        self.nvml = NvmlProbe(device)
        self.process = psutil.Process()

    def read(self) -> Reading:
        allocated, reserved, active = self.cuda.read()
        return Reading(
            cuda_allocated=allocated,
            cuda_reserved=reserved,
            cuda_active=active,
            nvml_used=self.nvml.read(),
            host_rss=self.process.memory_info().rss,
            host_pinned=self.cuda.pinned(),
        )


def rank_device() -> Optional[torch.device]:
    """The GPU of this rank by torchrun's convention (LOCAL_RANK), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank % torch.cuda.device_count())
