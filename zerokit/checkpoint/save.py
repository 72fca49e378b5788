"""`save_checkpoint`: every rank writes its shards of the training state into one checkpoint tag."""
from __future__ import annotations

import os
from typing import Any, Optional

from zerokit.checkpoint.coordination import Coordinator, run_agreed, writer_channel
from zerokit.checkpoint.engine_view import EngineView
from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.layout import check_tag, default_tag, prepare_staging, staging_dir
from zerokit.checkpoint.metadata import build_metadata, encode
from zerokit.checkpoint.rng import capture_rng
from zerokit.checkpoint.snapshot import take_snapshot
from zerokit.checkpoint.writer import SaveHandle, WriteJob


def save_checkpoint(
    engine,
    save_dir: str | os.PathLike,
    tag: Optional[str] = None,
    client_state: Any = None,
    async_save: bool = False,
) -> SaveHandle:
    """Save the engine's training state to `save_dir/<tag>` (default tag `global_step<N>`) and
    point `save_dir/latest` at it. A collective: call it on every rank, with the same tag.

    Each rank writes its own shards: fp32 master weights, optimizer states and frozen parameters
    by element range of each parameter, plus `client_state` (plain Python values and tensors,
    such as the data position; each rank's own is kept). With `async_save` the state is copied
    to host memory now and written by a background thread: the returned handle's `wait()`
    re-raises any error. The next save or load, `wait_for_checkpoint(engine)` and interpreter
    exit wait for it; call `wait_for_checkpoint` before destroying the process group.
    """
    channel = writer_channel(engine)
    channel.wait_idle()
    coordinator = Coordinator.for_engine(engine)
    save_dir = os.fspath(save_dir)
    tag = default_tag(engine.global_step) if tag is None else tag

    def check_and_describe() -> tuple[EngineView, dict]:
        check_tag(tag)
        if engine._runtime.backward_pending:
            raise CheckpointError(
                "save_checkpoint was called between a forward and its engine.backward(); save after engine.step()."
            )
        if engine.micro_steps % engine.config.accumulation_steps != 0:
            raise CheckpointError(
                f"save_checkpoint was called in the middle of gradient accumulation (micro-step {engine.micro_steps}, "
                f"gradient_accumulation_steps={engine.config.accumulation_steps}); accumulated gradients are not saved, "
                "so save right after the engine.step() that completes an accumulation window."
            )
        return EngineView(engine), capture_rng(engine.device)

    view, rng = run_agreed(coordinator, check_and_describe)
    tags = coordinator.all_gather(tag)
    if len(set(tags)) > 1:
        raise CheckpointError(f"ranks passed different checkpoint tags ({tags}); pass the same tag on every rank.")
    run_agreed(coordinator, lambda: prepare_staging(save_dir, tag) if engine.rank == 0 else None)
    snapshot = run_agreed(coordinator, take_snapshot, view, client_state)
    reports = coordinator.gather_to_zero({"index": snapshot.index, "rng": rng, **snapshot.state_keys()})
    metadata = run_agreed(
        coordinator, lambda: encode(build_metadata(engine, view, tag, reports)) if engine.rank == 0 else None
    )

    writers = channel.coordinator(engine.rank, engine.world_size)
    job = WriteJob(save_dir, staging_dir(save_dir, tag), tag, engine.global_step, snapshot, metadata, writers)
    handle = SaveHandle(job, background=async_save)
    if async_save:
        channel.start(handle)
    else:
        handle.wait()
    return handle


def wait_for_checkpoint(engine) -> None:
    """Wait until the engine's async save in flight (if any) is complete, re-raising its error.
    Call it before destroying the process group."""
    writer_channel(engine).wait_idle()
