"""Crash-safe file writes: a temporary name in the same directory, flush, fsync, rename, fsync
the directory. A reader sees either the old file or the complete new one, never a torn write."""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Callable

_CHUNK = 16 << 20


@dataclass(frozen=True)
class FileRecord:
    """A written file: its name inside the checkpoint tag directory, size and sha256."""

    name: str
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict) -> "FileRecord":
        return cls(str(data["name"]), int(data["size"]), str(data["sha256"]))


class _HashingWriter:
    """Hashes and counts bytes on their way to a file, so nothing is read back."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self.size += view.nbytes
        return self._handle.write(view)

    def flush(self) -> None:
        self._handle.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> FileRecord:
    """Create or replace `path` with what `write(handle)` writes, atomically and durably."""
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            hashing = _HashingWriter(handle)
            write(hashing)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    fsync_directory(directory)
    return FileRecord(name, hashing.size, hashing.hexdigest())


def write_bytes_atomically(path: str, data: bytes) -> FileRecord:
    return write_atomically(path, lambda handle: handle.write(data))


def fsync_directory(path: str) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(descriptor)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
