"""The manifest: the list of a checkpoint tag's files with their sizes and checksums.

It is written last, after every rank's file, so a tag directory with a manifest is complete;
its records let a reader detect missing, truncated and corrupt files before using any of them.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Iterable

from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.files import FileRecord, file_sha256, write_bytes_atomically

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    tag: str
    global_step: int
    world_size: int
    created: float  # seconds since the epoch
    files: tuple[FileRecord, ...]

    def record(self, name: str) -> FileRecord:
        for record in self.files:
            if record.name == name:
                return record
        raise CheckpointError(f"the manifest of checkpoint {self.tag!r} lists no file {name!r}; the checkpoint is damaged.")

    def write(self, tag_dir: str) -> FileRecord:
        data = {
            "format_version": FORMAT_VERSION,
            "tag": self.tag,
            "global_step": self.global_step,
            "world_size": self.world_size,
            "created": self.created,
            "files": [record.to_json() for record in self.files],
        }
        return write_bytes_atomically(os.path.join(tag_dir, MANIFEST), json.dumps(data, indent=1).encode())


def new_manifest(tag: str, global_step: int, world_size: int, files: Iterable[FileRecord]) -> Manifest:
    return Manifest(tag, global_step, world_size, time.time(), tuple(sorted(files, key=lambda r: r.name)))


def read_manifest(tag_dir: str) -> Manifest:
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint {tag_dir} is incomplete: it has no {MANIFEST} (its save did not finish). "
            "Load another tag, or pass fallback_to_previous=True to use the newest complete one."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {tag_dir} has format version {data['format_version']}, newer than this zerokit "
                f"reads ({FORMAT_VERSION}); upgrade zerokit to load it."
            )
        return Manifest(
            str(data["tag"]), int(data["global_step"]), int(data["world_size"]), float(data["created"]),
            tuple(FileRecord.from_json(record) for record in data["files"]),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"the manifest {path} is unreadable ({error}); the checkpoint is damaged.") from None


def check_present(tag_dir: str, manifest: Manifest) -> None:
    """Every listed file exists with its recorded size (cheap: no file is read)."""
    problems = []
    for record in manifest.files:
        path = os.path.join(tag_dir, record.name)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
        elif os.path.getsize(path) != record.size:
            problems.append(
                f"{path} has {os.path.getsize(path)} bytes but was saved with {record.size} (truncated or overwritten)"
            )
    if problems:
        raise CheckpointError(f"checkpoint {tag_dir} is damaged: " + "; ".join(problems) + ".")


def verify_checksums(tag_dir: str, manifest: Manifest, names: Iterable[str]) -> None:
    """The files `names` still hold the bytes that were saved."""
    for name in sorted(set(names)):
        record = manifest.record(name)
        path = os.path.join(tag_dir, name)
        actual = file_sha256(path)
        if actual != record.sha256:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt: its sha256 is {actual[:16]}…, the manifest recorded "
                f"{record.sha256[:16]}…. Load another tag, or pass fallback_to_previous=True."
            )
