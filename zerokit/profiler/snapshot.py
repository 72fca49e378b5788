"""PyTorch's CUDA memory snapshot (every allocation with its stack), readable by PyTorch's
memory viewer (https://pytorch.org/memory_viz) or `python -m torch.cuda._memory_viz`."""
from __future__ import annotations

from pathlib import Path

import torch

NO_CUDA_NOTE = (
    "no snapshot: PyTorch's memory snapshot records the CUDA caching allocator, and this rank ran without CUDA"
)
DISABLED_NOTE = "no snapshot: disabled with --no-snapshot"


def start_recording(max_entries: int = 200_000) -> bool:
    """Record allocation history from now on (Python stacks only: C++ frames make every
    allocation slow); True when recording started."""
    record = torch.cuda.memory._record_memory_history
    try:
        # annotations put the engine's phases (record_function ranges) into the snapshot
        record(enabled="all", stacks="python", max_entries=max_entries, global_record_annotations=True)
    except TypeError:  # a torch without annotations
        record(enabled="all", stacks="python", max_entries=max_entries)
    return True


def dump(path: Path) -> Path:
    torch.cuda.memory._dump_snapshot(str(path))
    return path
