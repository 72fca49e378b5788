"""Agreement among ranks while saving or loading.

Every step that can fail on one rank (a full disk, a corrupt file) is followed by an exchange
of outcomes, so a failure on one rank becomes an error on every rank instead of a hang in the
next collective. The background writer of an async save coordinates over a gloo group of its own,
so its collectives never interleave with the training loop's.
"""
from __future__ import annotations

import atexit
import functools
import os
import sys
import traceback
from typing import Any, Optional

import torch.distributed as dist

from zerokit.checkpoint.errors import CheckpointError


class Coordinator:
    def __init__(self, group: Optional[dist.ProcessGroup], rank: int, world_size: int):
        self.group = group
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def for_engine(cls, engine) -> "Coordinator":
        """Over the engine's process group: for the calling thread, in step with training."""
        return cls(engine._comm.group, engine.rank, engine.world_size)

    def all_gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def gather_to_zero(self, value: Any) -> Optional[list[Any]]:
        """Every rank's `value` on rank 0 (None on the others)."""
        if self.world_size == 1:
            return [value]
        gathered: Optional[list[Any]] = [None] * self.world_size if self.rank == 0 else None
        destination = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.gather_object(value, gathered, dst=destination, group=self.group)
        return gathered

    def agree(self, error: Optional[BaseException]) -> None:
        """Raise on every rank if any rank failed: the failing rank re-raises its own error."""
        outcomes = self.all_gather(None if error is None else describe(error))
        failures = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
        if not failures:
            return
        if error is not None:
            raise error
        rank, message = failures[0]
        where = f"rank {rank}" if len(failures) == 1 else f"ranks {', '.join(str(r) for r, _ in failures)}"
        raise CheckpointError(f"{where} failed: {message}")


def describe(error: BaseException) -> str:
    return str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {error}"


def run_agreed(coordinator: Coordinator, function, *args):
    """`function(*args)` on every rank; if it raises on any rank, every rank raises."""
    try:
        result, error = function(*args), None
    except Exception as caught:  # noqa: BLE001 - handed to every rank by agree()
        result, error = None, caught
    coordinator.agree(error)
    return result


class WriterChannel:
    """The checkpoint writers of one process group: a gloo group of their own (created at the
    first save, collectively) and the save in flight on it. At most one save is in flight: a
    new save, a load, `wait_for_checkpoint` and interpreter exit wait for it."""

    def __init__(self, parent: Optional[dist.ProcessGroup]):
        self._parent = parent
        self._group: Optional[dist.ProcessGroup] = None
        self._in_flight = None  # a SaveHandle

    def coordinator(self, rank: int, world_size: int) -> Coordinator:
        if world_size > 1 and self._group is None:
            if self._parent is dist.group.WORLD:
                self._group = dist.new_group(backend="gloo")
            else:
                ranks = dist.get_process_group_ranks(self._parent)
                self._group = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
        return Coordinator(self._group, rank, world_size)

    def start(self, handle) -> None:
        self._in_flight = handle
        atexit.register(self._wait_at_exit)

    def wait_idle(self) -> None:
        """Wait for the save in flight, re-raising its error."""
        handle, self._in_flight = self._in_flight, None
        if handle is not None:
            atexit.unregister(self._wait_at_exit)
            handle.wait()

    def _wait_at_exit(self) -> None:
        # Python ignores exceptions at exit and would exit with status 0: a save that failed
        # unnoticed must fail the process instead (so torchrun sees it, for one).
        try:
            self.wait_idle()
        except BaseException:  # noqa: BLE001 - reported, then the process fails
            traceback.print_exc()
            sys.stderr.write("zerokit: the checkpoint being saved at exit failed (see above).\n")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


def writer_channel(engine) -> WriterChannel:
    parent = None
    if engine.world_size > 1:
        parent = engine._comm.group or dist.group.WORLD
    return _channel(parent)


@functools.cache
def _channel(parent: Optional[dist.ProcessGroup]) -> WriterChannel:
    return WriterChannel(parent)
