"""`load_checkpoint`: restore an engine from a checkpoint saved by any world size and stage.

Each rank reads, for every parameter, the element range it owns under its own layout, from
whichever rank files hold it (memory-mapped), so no rank ever holds more than its shards.
Everything is checked before anything is changed: the files (presence, size, checksums of
those this rank reads), the parameter names and shapes, and the optimizer.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from zerokit.checkpoint.coordination import Coordinator, run_agreed
from zerokit.checkpoint.engine_view import EngineView
from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.layout import candidate_tags, rank_file
from zerokit.checkpoint.metadata import like
from zerokit.checkpoint.reader import CheckpointReader
from zerokit.checkpoint.rng import restore_rng
from zerokit.checkpoint.save import wait_for_checkpoint

logger = logging.getLogger("zerokit")

_LISTED = 8  # names listed per kind of mismatch


def load_checkpoint(
    engine,
    load_dir: str | os.PathLike,
    tag: Optional[str] = None,
    fallback_to_previous: bool = False,
    load_optimizer_states: bool = True,
) -> Any:
    """Restore parameters, optimizer states and hyper-parameters, LR scheduler, loss scaler,
    step counters and RNG states from `load_dir/<tag>` (default: the tag `latest` names), and
    return this rank's client_state (rank 0's for ranks the saving job did not have).

    With `fallback_to_previous`, a missing, incomplete or corrupt checkpoint is skipped (with a
    warning) for the newest complete one that loads. A collective: call it on every rank.
    """
    wait_for_checkpoint(engine)
    coordinator = Coordinator.for_engine(engine)
    load_dir = os.fspath(load_dir)
    view = run_agreed(coordinator, EngineView, engine)
    # Rank 0's listing decides, in case ranks see a shared directory slightly differently.
    candidates = coordinator.all_gather(
        run_agreed(coordinator, candidate_tags, load_dir, tag, fallback_to_previous)
    )[0]

    reader, skipped = None, []
    for name in candidates:
        try:
            reader = run_agreed(coordinator, _open_checked, os.path.join(load_dir, name), view, load_optimizer_states)
            break
        except Exception as error:  # noqa: BLE001 - every rank raises here together (run_agreed)
            if not fallback_to_previous:
                raise
            skipped.append(f"{name}: {error}")
            if engine.rank == 0:
                logger.warning("checkpoint %s cannot be loaded (%s); trying an older one.", name, error)
    if reader is None:
        raise CheckpointError(f"no checkpoint in {load_dir} can be loaded: " + " | ".join(skipped))
    if skipped and engine.rank == 0:
        logger.warning("loaded checkpoint %s instead of %s.", reader.tag, candidates[0])

    client_state = run_agreed(coordinator, _apply, reader, view, load_optimizer_states)
    for group in view.groups:  # in the same order on every rank: gathered groups all-gather
        group.rebuild_parameters()
    return client_state


def _open_checked(tag_dir: str, view: EngineView, load_optimizer_states: bool) -> CheckpointReader:
    reader = CheckpointReader(tag_dir)
    _check_model(reader, view)
    if load_optimizer_states:
        _check_optimizer(reader, view)
    needed = set()
    for entry in view.entries:
        needed |= reader.files_for(_saved_name(reader, entry.name, view), entry.start, entry.stop)
    if reader.metadata["buffers"]:
        needed.add(rank_file(0))
    needed.add(rank_file(_client_rank(reader, view.engine.rank)))
    reader.verify(needed)
    return reader


def _saved_name(reader: CheckpointReader, name: str, view: EngineView) -> str:
    """The name a model parameter has in the checkpoint: its own or, if tied, one of its aliases."""
    if name in reader.parameters:
        return name
    for info in view.parameters:
        if info.name == name:
            return next((alias for alias in info.aliases if alias in reader.parameters), name)
    return name


def _check_model(reader: CheckpointReader, view: EngineView) -> None:
    saved = reader.parameters
    problems, matched = [], set()
    missing, mismatched = [], []
    for info in view.parameters:
        name = _saved_name(reader, info.name, view)
        if name not in saved:
            missing.append(info.name)
            continue
        matched.add(name)
        if tuple(saved[name]["shape"]) != info.shape:
            mismatched.append(f"{info.name}: checkpoint {tuple(saved[name]['shape'])}, model {info.shape}")
    unexpected = [name for name in saved if name not in matched]
    saved_buffers = reader.metadata["buffers"]
    missing += [name for name in view.buffers if name not in saved_buffers]
    unexpected += [name for name in saved_buffers if name not in view.buffers]
    mismatched += [
        f"{name}: checkpoint {tuple(saved_buffers[name]['shape'])}, model {tuple(buffer.shape)}"
        for name, buffer in view.buffers.items()
        if name in saved_buffers and tuple(saved_buffers[name]["shape"]) != tuple(buffer.shape)
    ]
    for label, names in (("missing from the checkpoint", missing), ("not in the model", unexpected),
                         ("with different shapes", mismatched)):
        if names:
            more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
            problems.append(f"{label}: {', '.join(names[:_LISTED])}{more}")
    if problems:
        raise CheckpointError(
            f"checkpoint {reader.tag_dir} does not match the model: " + "; ".join(problems)
            + ". Load it into the architecture and sizes it was saved from."
        )


def _check_optimizer(reader: CheckpointReader, view: EngineView) -> None:
    saved = reader.metadata["optimizer"]
    optimizer = view.engine.optimizer
    hint = "pass load_optimizer_states=False to load the weights and start the optimizer afresh"
    if saved["class"] != type(optimizer).__name__:
        raise CheckpointError(
            f"checkpoint {reader.tag_dir} holds {saved['class']} states but the engine's optimizer is "
            f"{type(optimizer).__name__}; {hint}."
        )
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(
            f"checkpoint {reader.tag_dir} has {len(saved['param_groups'])} optimizer parameter groups, the engine's "
            f"optimizer {len(optimizer.param_groups)}; build the optimizer with the same groups, or {hint}."
        )
    for name, group in view.optimizer_group_of.items():
        before = reader.parameters[_saved_name(reader, name, view)]["optimizer_group"]
        if before is not None and before != group:
            raise CheckpointError(
                f"parameter {name} was in optimizer group {before} when saved and is in group {group} now; build the "
                f"optimizer with the same groups, or {hint}."
            )


def _client_rank(reader: CheckpointReader, rank: int) -> int:
    return rank if rank < reader.world_size else 0


def _apply(reader: CheckpointReader, view: EngineView, load_optimizer_states: bool) -> Any:
    engine = view.engine
    metadata = reader.metadata
    for entry in view.entries:
        entry.write_values(reader.read_range(_saved_name(reader, entry.name, view), entry.start, entry.stop))
    for group in view.groups:
        for slot in group.slots:
            slot.param.grad = None
        if group.trainable:
            group.release_grads()
    for name, buffer in view.buffers.items():
        buffer.copy_(reader.buffer(name))
    if load_optimizer_states:
        view.load_optimizer_state_dict(_optimizer_state_dict(reader, view))

    engine.global_step = metadata["global_step"]
    engine.micro_steps = metadata["micro_steps"]
    engine.skipped_steps = metadata["skipped_steps"]
    if engine.lr_scheduler is not None and metadata["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(metadata["lr_scheduler"])
    if engine.loss_scaler is not None and metadata["loss_scaler"] is not None:
        engine.loss_scaler.load_state_dict(metadata["loss_scaler"])
    if engine.rank < len(metadata["rng"]):
        restore_rng(metadata["rng"][engine.rank], engine.device)
    else:
        logger.info("rank %d keeps its RNG state: checkpoint %s was saved by %d ranks.",
                    engine.rank, reader.tag, reader.world_size)
    return reader.client_state(_client_rank(reader, engine.rank))


def _optimizer_state_dict(reader: CheckpointReader, view: EngineView) -> dict[str, Any]:
    """A torch optimizer state_dict for this rank's pieces, so the optimizer's own
    load_state_dict places every state tensor (device, dtype, `step` policy)."""
    optimizer = view.engine.optimizer
    entry_of = {id(e.optimizer_param): e for e in view.entries if e.optimizer_param is not None}
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for group_index, group in enumerate(optimizer.param_groups):
        ids = []
        for param in group["params"]:
            entry = entry_of.get(id(param))
            name = None if entry is None else _saved_name(reader, entry.name, view)
            if name is not None and reader.parameters[name]["optimizer_state"]:
                piece_state = reader.optimizer_scalars(name)
                for key in reader.state_keys(name):
                    piece_state[key] = reader.read_range(name, entry.start, entry.stop, state_key=key)
                state[index] = piece_state
            ids.append(index)
            index += 1
        saved = reader.metadata["optimizer"]["param_groups"][group_index]
        groups.append({**{k: like(v, group.get(k)) for k, v in saved.items()}, "params": ids})
    return {"state": state, "param_groups": groups}
