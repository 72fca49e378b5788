"""The metadata of a checkpoint tag (metadata.json): what was saved, by how many ranks, from
which engine, and where each element range of every parameter lives.

    parameters: {name: {shape, trainable, dtype, optimizer_state, optimizer_group,
                        pieces: [{file, start, stop}, ...]}}

A piece names the file that holds elements [start, stop) of the flattened parameter, so a
reader needs no knowledge of the saving layout (world size, stage, flat buffers, or where a
shard lived in memory) to reshard: it reads the ranges it needs from the files that have them.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch

from zerokit.checkpoint.engine_view import EngineView
from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.layout import rank_file
from zerokit.checkpoint.snapshot import dtype_name

METADATA_VERSION = 1


def build_metadata(
    engine, view: EngineView, tag: str, rank_reports: list[dict[str, Any]]
) -> dict[str, Any]:
    """Rank 0 builds it from every rank's report: {index, rng, ranged_keys, scalar_keys}."""
    parameters: dict[str, dict[str, Any]] = {
        info.name: {
            "shape": list(info.shape),
            "trainable": info.trainable,
            "dtype": None,
            "optimizer_state": False,
            "optimizer_group": None,
            "pieces": [],
        }
        for info in view.parameters
    }
    for rank, report in enumerate(rank_reports):
        for item in report["index"]:
            entry = parameters[item["name"]]
            entry["pieces"].append({"file": rank_file(rank), "start": item["start"], "stop": item["stop"]})
            entry["dtype"] = item["dtype"]
            entry["optimizer_state"] = entry["optimizer_state"] or item["optimizer_state"]
            if item["optimizer_group"] is not None:
                entry["optimizer_group"] = item["optimizer_group"]
    for entry in parameters.values():
        entry["pieces"].sort(key=lambda piece: piece["start"])

    optimizer = engine.optimizer
    return {
        "format_version": METADATA_VERSION,
        "zerokit_version": _zerokit_version(),
        "torch_version": torch.__version__,
        "tag": tag,
        "world_size": engine.world_size,
        "stage": engine.config.zero_optimization.stage,
        "compute_dtype": dtype_name(engine.config.compute_dtype),
        "reduce_dtype": dtype_name(engine.config.reduce_dtype),
        "config": json_value(engine.config.to_dict(), "config"),
        "global_step": engine.global_step,
        "micro_steps": engine.micro_steps,
        "skipped_steps": engine.skipped_steps,
        "optimizer": {
            "class": type(optimizer).__name__,
            "param_groups": [
                json_value({k: v for k, v in group.items() if k != "params"}, "optimizer.param_groups")
                for group in optimizer.param_groups
            ],
            "ranged_keys": sorted({k for report in rank_reports for k in report["ranged_keys"]}),
            "scalar_keys": sorted({k for report in rank_reports for k in report["scalar_keys"]}),
        },
        "lr_scheduler": (
            None if engine.lr_scheduler is None else json_value(engine.lr_scheduler.state_dict(), "lr_scheduler")
        ),
        "loss_scaler": None if engine.loss_scaler is None else engine.loss_scaler.state_dict(),
        "rng": [report["rng"] for report in rank_reports],
        "parameters": parameters,
        "tied": view.aliases,
        "buffers": {
            name: {"shape": list(buffer.shape), "dtype": dtype_name(buffer.dtype), "file": rank_file(0)}
            for name, buffer in view.buffers.items()
        },
        "state_dict_keys": view.state_dict_keys,
    }


def encode(metadata: dict[str, Any]) -> bytes:
    return json.dumps(metadata, indent=1).encode()


def json_value(value: Any, where: str) -> Any:
    """`value` in JSON's types (tuples become lists, tensors numbers or lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [json_value(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v, f"{where}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    raise CheckpointError(f"{where} holds a {type(value).__name__} ({value!r}), which a checkpoint cannot record.")


def like(saved: Any, current: Any) -> Any:
    """A value read back from JSON, in the type the live object uses (tuple, tensor, float)."""
    if isinstance(current, torch.Tensor):
        return torch.as_tensor(saved, dtype=current.dtype, device=current.device)
    if isinstance(current, tuple) and isinstance(saved, list):
        return tuple(saved)
    if isinstance(current, float) and isinstance(saved, str):
        return float(saved)
    return saved


def _zerokit_version() -> str:
    from zerokit import __version__

    return __version__
