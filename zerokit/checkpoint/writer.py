"""Writing a snapshot to disk, in the calling thread or a background one.

Each rank writes its file into the staging directory; once every rank has reported its file
(name, size, sha256), rank 0 writes the manifest, renames the staging directory to the tag and
updates `latest`. A failure anywhere leaves the previous checkpoints and `latest` untouched.
"""
from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from zerokit.checkpoint.coordination import Coordinator, describe
from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.files import FileRecord, write_atomically, write_bytes_atomically
from zerokit.checkpoint.layout import METADATA, publish, rank_file
from zerokit.checkpoint.manifest import new_manifest
from zerokit.checkpoint.snapshot import RankSnapshot


@dataclass
class WriteJob:
    save_dir: str
    staging: str
    tag: str
    global_step: int
    snapshot: RankSnapshot
    metadata: Optional[bytes]  # rank 0 only
    coordinator: Coordinator


class SaveHandle:
    """A checkpoint being written. `wait()` returns its directory once it is complete and
    re-raises whatever made the save fail."""

    def __init__(self, job: WriteJob, background: bool):
        self.tag = job.tag
        self.path = os.path.join(job.save_dir, job.tag)
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        if background:
            # Not a daemon: an interpreter that exits mid-write still lets the file complete.
            self._thread = threading.Thread(target=self._run, args=(job,), name=f"zerokit-save-{job.tag}")
            self._thread.start()
        else:
            self._run(job)

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> str:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.path

    def _run(self, job: WriteJob) -> None:
        try:
            write(job)
        except BaseException as error:  # noqa: BLE001 - kept for wait(), which re-raises it
            self._error = error


def write(job: WriteJob) -> None:
    coordinator = job.coordinator
    records: list[FileRecord] = []
    error: Optional[BaseException] = None
    try:
        job.snapshot.wait_ready()
        path = os.path.join(job.staging, rank_file(coordinator.rank))
        records.append(write_atomically(path, lambda handle: torch.save(job.snapshot.payload, handle)))
        if job.metadata is not None:
            records.append(write_bytes_atomically(os.path.join(job.staging, METADATA), job.metadata))
    except Exception as caught:  # noqa: BLE001 - reported to every rank below
        error = caught
    reports = coordinator.all_gather((records, None if error is None else describe(error)))
    failed = [(rank, message) for rank, (_, message) in enumerate(reports) if message is not None]
    if failed:
        if coordinator.rank == 0:
            shutil.rmtree(job.staging, ignore_errors=True)
        if error is not None:
            raise error
        raise CheckpointError(f"saving checkpoint {job.tag!r} failed on rank {failed[0][0]}: {failed[0][1]}")

    def finish() -> None:
        if coordinator.rank == 0:
            files = [record for rank_records, _ in reports for record in rank_records]
            new_manifest(job.tag, job.global_step, coordinator.world_size, files).write(job.staging)
            publish(job.save_dir, job.staging, job.tag)

    try:
        finish()
        error = None
    except Exception as caught:  # noqa: BLE001 - reported to every rank below
        error = caught
        shutil.rmtree(job.staging, ignore_errors=True)
    coordinator.agree(error)
