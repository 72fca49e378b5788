"""Whole-model views of a sharded engine: loading consolidated weights into it (each rank keeps
only its shards) and gathering its optimizer state per parameter."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch

from zerokit.checkpoint.coordination import Coordinator, run_agreed
from zerokit.checkpoint.engine_view import EngineView
from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.sources import TensorSource, open_consolidated

_LISTED = 8


def load_full_state_dict(
    engine,
    source: Union[Mapping[str, torch.Tensor], str, os.PathLike, TensorSource],
    strict: bool = True,
) -> None:
    """Load consolidated weights into the engine's parameters and buffers: a state_dict, a
    .safetensors / .bin / .pt file, or a folder with model.safetensors(.index.json) or
    pytorch_model.bin(.index.json). Each rank reads only the element ranges of its shards.

    Tied parameters may be stored under any one of their names. With `strict`, weights the
    model lacks and parameters or persistent buffers the source lacks are errors. Optimizer
    states are left as they are. A collective: call it on every rank.
    """
    coordinator = Coordinator.for_engine(engine)

    def open_and_check() -> tuple[EngineView, TensorSource, dict[str, str]]:
        view = EngineView(engine)
        opened = open_consolidated(source)
        stored_of = _match(view, opened, strict)
        return view, opened, stored_of

    view, opened, stored_of = run_agreed(coordinator, open_and_check)

    def apply() -> None:
        for entry in view.entries:
            entry.write_values(opened.read(stored_of[entry.name], entry.start, entry.stop))
        for name, buffer in view.buffers.items():
            if name in stored_of:
                buffer.copy_(opened.read_full(stored_of[name]))

    run_agreed(coordinator, apply)
    for group in view.groups:
        group.rebuild_parameters()


def import_deepspeed_checkpoint(engine, checkpoint_dir: str | os.PathLike, tag: Optional[str] = None,
                               strict: bool = True) -> None:
    """Load the fp32 master weights (and frozen parameters and buffers) of a DeepSpeed ZeRO
    stage 1, 2 or 3 checkpoint into the engine, whatever the world size either side: a
    checkpoint directory (its `latest` tag) or one tag directory. Optimizer states start afresh.
    Files are unpickled with stand-ins for DeepSpeed's classes: import only trusted checkpoints."""
    from zerokit.checkpoint.deepspeed import DeepSpeedSource

    coordinator = Coordinator.for_engine(engine)
    source = run_agreed(coordinator, DeepSpeedSource, checkpoint_dir, tag)
    load_full_state_dict(engine, source, strict=strict)


def _match(view: EngineView, source: TensorSource, strict: bool) -> dict[str, str]:
    """Model name -> stored name, after checking names and shapes."""
    stored_of, missing, mismatched = {}, [], []
    for info in view.parameters:
        stored = next((s for s in map(source.resolve, (info.name, *info.aliases)) if s is not None), None)
        if stored is None:
            missing.append(info.name)
        elif tuple(source.shape(stored)) != info.shape:
            mismatched.append(f"{info.name}: source {tuple(source.shape(stored))}, model {info.shape}")
        else:
            stored_of[info.name] = stored
    for name, buffer in view.buffers.items():
        stored = source.resolve(name)
        if stored is None:
            if strict:
                missing.append(name)
        elif tuple(source.shape(stored)) != tuple(buffer.shape):
            mismatched.append(f"{name}: source {tuple(source.shape(stored))}, model {tuple(buffer.shape)}")
        else:
            stored_of[name] = stored
    used = set(stored_of.values())
    unexpected = [name for name in source.names() if name not in used] if strict else []
    problems = [
        f"{label}: {', '.join(names[:_LISTED])}" + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
        for label, names in (("missing from the source", missing), ("not in the model", unexpected),
                             ("with different shapes", mismatched))
        if names
    ]
    if problems:
        raise CheckpointError("the weights do not match the model: " + "; ".join(problems) + ".")
    return stored_of


def gather_optimizer_state(engine) -> dict[str, dict[str, Any]]:
    """Every optimized parameter's optimizer state in full, by parameter name, on every rank:
    element-wise states as flat fp32 tensors, other entries (such as `step`) as saved by the
    piece that holds the parameter's first element. A collective, for inspection and tests."""
    view = EngineView(engine)
    pieces = []
    for entry in view.entries:
        state = entry.optimizer_state(engine.optimizer)
        if state:
            pieces.append((entry.name, entry.start, entry.stop, {
                k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()
            }))
    sizes = {info.name: int(torch.Size(info.shape).numel()) for info in view.parameters}
    full: dict[str, dict[str, Any]] = {}
    for rank_pieces in Coordinator.for_engine(engine).all_gather(pieces):
        for name, start, stop, state in rank_pieces:
            target = full.setdefault(name, {})
            for key, value in state.items():
                ranged = isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == stop - start
                if ranged:
                    if key not in target:
                        target[key] = torch.zeros(sizes[name], dtype=value.dtype)
                    target[key][start:stop] = value
                elif start == 0:
                    target[key] = value
    return full
