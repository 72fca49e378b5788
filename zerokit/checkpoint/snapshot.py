"""A copy of this rank's part of the training state in host memory, taken synchronously so
training can go on while a background thread writes it.

Tensors are copied into one host buffer per dtype (pinned when they come from CUDA, so the
copies run asynchronously and the writer waits on one event); the rank file then stores each
buffer once and every tensor as a view of it.
"""
from __future__ import annotations

import collections
import copy
import io
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils._pytree import tree_leaves, tree_map

from zerokit.checkpoint.engine_view import EngineView
from zerokit.checkpoint.errors import CheckpointError

RANK_FILE_VERSION = 1


@dataclass
class RankSnapshot:
    payload: dict[str, Any]  # what the rank file holds
    index: list[dict[str, Any]]  # which parameter ranges it holds, for the metadata
    ready: Optional[torch.cuda.Event]  # device-to-host copies done (None when there were none)

    def wait_ready(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def state_keys(self) -> dict[str, list[str]]:
        """The optimizer state keys this rank saved: element-wise ones and the others."""
        records = self.payload["parameters"].values()
        return {
            "ranged_keys": sorted({key for record in records for key in record.get("optimizer", {})}),
            "scalar_keys": sorted({key for record in records for key in record.get("optimizer_scalars", {})}),
        }


def take_snapshot(view: EngineView, client_state: Any) -> RankSnapshot:
    check_client_state(client_state)
    engine = view.engine
    parameters: dict[str, dict[str, Any]] = {}
    index = []
    for entry in view.entries if view.writes_shards else []:
        record: dict[str, Any] = {"values": entry.values()}
        state = entry.optimizer_state(engine.optimizer)
        if state:
            record["optimizer"], record["optimizer_scalars"] = split_state(state, entry.stop - entry.start)
        parameters[entry.name] = record
        index.append({
            "name": entry.name,
            "start": entry.start,
            "stop": entry.stop,
            "dtype": dtype_name(record["values"].dtype),
            "optimizer_state": bool(state),
            "optimizer_group": view.optimizer_group_of.get(entry.name),
        })
    payload = {
        "format_version": RANK_FILE_VERSION,
        "rank": engine.rank,
        "parameters": parameters,
        "buffers": {name: buffer.detach() for name, buffer in view.buffers.items()} if engine.rank == 0 else {},
        "client_state": client_state,
    }
    copied, ready = copy_to_host(payload)
    return RankSnapshot(copied, index, ready)


def check_client_state(client_state: Any) -> None:
    """Fail now, not at load time, if client_state will not load safely (weights_only)."""
    buffer = io.BytesIO()
    try:
        torch.save(client_state, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing here
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0])
        raise CheckpointError(
            f"client_state cannot be saved for a safe load ({reason.strip()}); keep it to numbers, strings, "
            "lists, tuples, dicts and tensors."
        ) from None


def split_state(state: dict[str, Any], numel: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Element-wise state (one value per element of the piece, resharded by range) and the rest
    (step counters and other scalars, identical for every piece of a parameter)."""
    ranged, scalars = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == numel:
            ranged[key] = value
        else:
            scalars[key] = value
    return ranged, scalars


def copy_to_host(tree: Any) -> tuple[Any, Optional[torch.cuda.Event]]:
    """`tree` with every tensor copied into host buffers and every other leaf deep-copied."""
    tensors = [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]
    on_cuda = any(t.device.type == "cuda" for t in tensors)
    sizes: collections.Counter[torch.dtype] = collections.Counter()
    for tensor in tensors:
        sizes[tensor.dtype] += tensor.numel()
    buffers = {dtype: torch.empty(numel, dtype=dtype, pin_memory=on_cuda) for dtype, numel in sizes.items()}
    offsets = dict.fromkeys(buffers, 0)

    def copy_leaf(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return copy.deepcopy(leaf)
        start = offsets[leaf.dtype]
        offsets[leaf.dtype] = start + leaf.numel()
        target = buffers[leaf.dtype][start : start + leaf.numel()].view(leaf.shape)
        target.copy_(leaf.detach(), non_blocking=on_cuda)
        return target

    copied = tree_map(copy_leaf, tree)
    ready = None
    if on_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return copied, ready


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype
