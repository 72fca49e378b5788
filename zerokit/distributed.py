"""Process group and device from torchrun's environment (or a single process without it)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: Optional[dist.ProcessGroup]  # None: the default group (or no group in a world of one)


def setup_distributed() -> DistributedContext:
    """Use the existing process group, or create one from torchrun's variables: NCCL on CUDA,
    gloo on CPU. Without torchrun (no WORLD_SIZE) this is a world of one, with no group."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "launch at most that many processes per node (torchrun --nproc-per-node)."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    if not dist.is_initialized():
        return DistributedContext(0, 1, local_rank, device, None)

    backend = dist.get_backend()
    if device.type == "cuda" and "nccl" not in str(backend):
        raise RuntimeError(
            f"the process group uses {backend}, which cannot run zerokit's collectives on CUDA tensors; "
            "initialize it with backend='nccl' (or let zerokit.initialize create it)."
        )
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device, None)
