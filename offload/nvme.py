"""Swap host tensors to files on a local NVMe drive, with asynchronous O_DIRECT reads and writes.

[Note: what the swapper touches]
Each NVMeSwapper creates one fresh directory under nvme_path (zerokit-swap-rank<r>-<random>) and
one swap file in it; it never reads, writes or removes anything else there. The file and the
directory are removed on close(), when the swapper is garbage collected, and at interpreter exit.
Tensors live at extents aligned to IO_ALIGNMENT, allocated the first time a key is swapped out;
a key keeps its size. Operations on one key are ordered: a swap_in waits for that key's pending
swap_out, and the other way round.

Set ZEROKIT_NVME_CHECKSUM=1 (or checksum=True) to verify every swapped-in tensor against a CRC32
taken at swap-out: slower, for debugging.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from offload.aio import DEFAULT_BLOCK_SIZE, AsyncIO, IoFile, IoRequest
from offload.raw_memory import aligned_size, byte_view, check_host_buffer, tensor_nbytes

CHECKSUM_ENV = "ZEROKIT_NVME_CHECKSUM"
SWAP_DIR_PREFIX = "zerokit-swap-"
SWAP_FILE_NAME = "swap.bin"


class NVMePathError(ValueError):
    """nvme_path cannot hold the swap files; the message says why and what to do."""


def check_nvme_path(nvme_path: str | os.PathLike, required_bytes: int) -> Path:
    """Raise NVMePathError unless nvme_path is an existing, writable directory with required_bytes free."""
    path = Path(nvme_path)
    if not path.exists():
        raise NVMePathError(
            f"nvme_path {path} does not exist; create it, or point nvme_path at a directory on a local NVMe drive"
        )
    if not path.is_dir():
        raise NVMePathError(
            f"nvme_path {path} is not a directory; point nvme_path at a directory on a local NVMe drive"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise NVMePathError(
            f"nvme_path {path} is not writable by this process (uid {os.getuid()}); "
            "fix its permissions or choose another directory"
        )
    free = shutil.disk_usage(path).free
    if required_bytes > free:
        raise NVMePathError(
            f"nvme_path {path} has {free} bytes ({free / 2**30:.2f} GiB) free, but {required_bytes} bytes "
            f"({required_bytes / 2**30:.2f} GiB) are needed; free space there or choose another nvme_path"
        )
    return path


@dataclass(frozen=True)
class SwapExtent:
    offset: int  # in the swap file, a multiple of IO_ALIGNMENT
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class SwapHandle:
    """Completion of one swap_in or swap_out; wait() raises on I/O errors or checksum mismatches."""

    def __init__(self, request: IoRequest, verify: Optional[Callable[[], None]] = None):
        self._request = request
        self._verify = verify

    def done(self) -> bool:
        return self._request.done()

    def wait(self) -> None:
        self._request.wait()
        if self._verify is not None:
            verify, self._verify = self._verify, None
            verify()


class _SwapFiles:
    """What the swapper created on disk and the I/O still touching it: all that cleanup needs."""

    def __init__(self, directory: Path, file: IoFile):
        self.directory = directory
        self.file = file
        self.pending: dict[str, SwapHandle] = {}  # the last operation per key

    def remove(self) -> None:
        for handle in self.pending.values():
            try:
                handle.wait()
            except Exception:  # removing the file anyway; the failure was reported to the waiter
                pass
        self.pending.clear()
        self.file.close()
        Path(self.file.path).unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:  # someone put something in our directory; leave it rather than delete it
            pass


class NVMeSwapper:
    def __init__(
        self,
        nvme_path: str | os.PathLike,
        capacity_bytes: int,
        *,
        rank: int = 0,
        io: Optional[AsyncIO] = None,
        num_threads: int = 4,
        block_size: int = DEFAULT_BLOCK_SIZE,
        direct: bool = True,
        checksum: Optional[bool] = None,
    ):
        """capacity_bytes: the most this swapper will hold, checked against the free space before
        anything is created (size it with NVMeSwapper.bytes_needed). io: share an AsyncIO across
        swappers, else one with num_threads and block_size is made."""
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        check_nvme_path(nvme_path, capacity_bytes)
        self.capacity_bytes = capacity_bytes
        self.checksum = os.environ.get(CHECKSUM_ENV, "0") == "1" if checksum is None else checksum
        self.io = io if io is not None else AsyncIO(num_threads, block_size)
        directory = Path(tempfile.mkdtemp(prefix=f"{SWAP_DIR_PREFIX}rank{rank}-", dir=nvme_path))
        try:
            file = self.io.open(directory / SWAP_FILE_NAME, create=True, direct=direct)
        except Exception:
            directory.rmdir()
            raise
        self._files = _SwapFiles(directory, file)
        self._cleanup = weakref.finalize(self, _SwapFiles.remove, self._files)  # also runs at exit
        self._extents: dict[str, SwapExtent] = {}
        self._checksums: dict[str, int] = {}
        self._used_bytes = 0

    @staticmethod
    def bytes_needed(tensors: Sequence[torch.Tensor]) -> int:
        """The capacity_bytes that holds these tensors (each extent is aligned)."""
        return sum(aligned_size(tensor_nbytes(t)) for t in tensors)

    @property
    def directory(self) -> Path:
        return self._files.directory

    @property
    def direct(self) -> bool:
        """Whether the swap file uses O_DIRECT (see fallback_reason when not)."""
        return self._files.file.direct

    @property
    def fallback_reason(self) -> str:
        return self._files.file.fallback_reason

    def extent(self, key: str) -> SwapExtent:
        try:
            return self._extents[key]
        except KeyError:
            raise KeyError(f"{key!r} was never swapped out") from None

    def swap_out(self, key: str, tensor: torch.Tensor) -> SwapHandle:
        """Write tensor (contiguous, on the CPU) to key's extent; keep tensor unchanged until done."""
        self._check_open()
        check_host_buffer(tensor, "tensor")
        extent = self._extent_for(key, tensor)
        self._wait_pending(key)
        if self.checksum:
            self._checksums[key] = zlib.crc32(byte_view(tensor))
        handle = SwapHandle(self.io.write(self._files.file, tensor, extent.offset))
        self._files.pending[key] = handle
        return handle

    def swap_in(self, key: str, out: torch.Tensor) -> SwapHandle:
        """Read key's bytes into out (contiguous, on the CPU, of the size swapped out)."""
        self._check_open()
        check_host_buffer(out, "out")
        extent = self.extent(key)
        if tensor_nbytes(out) != extent.nbytes:
            raise ValueError(f"{key!r} holds {extent.nbytes} bytes, but out has {tensor_nbytes(out)}")
        self._wait_pending(key)
        verify = self._checksum_check(key, out) if self.checksum else None
        handle = SwapHandle(self.io.read(self._files.file, out, extent.offset), verify)
        self._files.pending[key] = handle
        return handle

    def _checksum_check(self, key: str, out: torch.Tensor) -> Callable[[], None]:
        """Compares what was read into `out` with the CRC32 of what was written under `key`."""
        expected, path = self._checksums[key], self._files.file.path

        def verify() -> None:
            actual = zlib.crc32(byte_view(out))
            if actual != expected:
                raise RuntimeError(
                    f"checksum mismatch swapping in {key!r} from {path}: "
                    f"wrote crc32 {expected:#010x}, read {actual:#010x}"
                )

        return verify

    def staging_bytes(self, groups: Sequence[Sequence[str]]) -> int:
        """Bytes each of stream()'s two staging buffers needs for these groups."""
        return max((sum(aligned_size(self.extent(k).nbytes) for k in group) for group in groups), default=0)

    def stream(
        self,
        groups: Sequence[Sequence[str]],
        staging: Sequence[torch.Tensor],
        fn: Callable[[list[torch.Tensor]], None],
        *,
        write_back: bool = False,
    ) -> None:
        """Call fn on each group's tensors, read into two alternating staging buffers.

        Group i+1 is read while fn works on group i. With write_back, group i's tensors (as fn
        left them) are written back while fn works on group i+1; all writes finish before this
        returns. The views passed to fn are valid only during that call. If fn raises, nothing
        more is written back and the error propagates once in-flight I/O has finished.
        """
        if len(staging) != 2:
            raise ValueError(f"stream() double-buffers: pass 2 staging buffers, got {len(staging)}")
        if write_back:
            for i in range(len(groups) - 1):
                shared = set(groups[i]) & set(groups[i + 1])
                if shared:  # the next group is read before this one is written back
                    raise ValueError(
                        f"with write_back, consecutive groups must not share keys; groups {i} and {i + 1} "
                        f"share {sorted(shared)}"
                    )
        needed = self.staging_bytes(groups)
        for buffer in staging:
            check_host_buffer(buffer, "staging buffer")
            if tensor_nbytes(buffer) < needed:
                raise ValueError(
                    f"staging buffer of {tensor_nbytes(buffer)} bytes is smaller than the {needed} bytes the "
                    "largest group needs; size it with NVMeSwapper.staging_bytes(groups)"
                )
        staging = [buffer.view(torch.uint8).view(-1) for buffer in staging]
        reads: list[SwapHandle] = []
        writes: list[list[SwapHandle]] = [[], []]  # per staging buffer
        try:
            if groups:
                reads = self._read_group(groups[0], staging[0])
            for i, group in enumerate(groups):
                _wait_all(reads)
                if i + 1 < len(groups):
                    _wait_all(writes[(i + 1) % 2])  # the buffer being refilled is still being written
                    reads = self._read_group(groups[i + 1], staging[(i + 1) % 2])
                views = self._views(group, staging[i % 2])
                fn(views)
                if write_back:
                    writes[i % 2] = [self.swap_out(key, view) for key, view in zip(group, views)]
            _wait_all(writes[0] + writes[1])
        finally:  # also on errors: leave no I/O touching the caller's buffers
            for handle in reads + writes[0] + writes[1]:
                try:
                    handle.wait()
                except Exception:
                    pass

    def close(self) -> None:
        """Wait for pending I/O, then remove the swap file and directory."""
        self._cleanup()

    def __enter__(self) -> "NVMeSwapper":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._cleanup.alive:
            raise RuntimeError("this NVMeSwapper is closed")

    def _extent_for(self, key: str, tensor: torch.Tensor) -> SwapExtent:
        nbytes = tensor_nbytes(tensor)
        extent = self._extents.get(key)
        if extent is not None:
            if extent.nbytes != nbytes:
                raise ValueError(
                    f"{key!r} was swapped out with {extent.nbytes} bytes, now {nbytes}; a key keeps its size"
                )
            extent = SwapExtent(extent.offset, nbytes, tensor.dtype, tuple(tensor.shape))
            self._extents[key] = extent  # same bytes, possibly viewed as another dtype or shape
            return extent
        size = aligned_size(nbytes)
        if self._used_bytes + size > self.capacity_bytes:
            raise ValueError(
                f"swapping out {key!r} needs {size} bytes, but {self._used_bytes} of this swapper's "
                f"{self.capacity_bytes} bytes are in use; size capacity_bytes with NVMeSwapper.bytes_needed"
            )
        extent = SwapExtent(self._used_bytes, nbytes, tensor.dtype, tuple(tensor.shape))
        self._extents[key] = extent
        self._used_bytes += size
        return extent

    def _wait_pending(self, key: str) -> None:
        handle = self._files.pending.pop(key, None)
        if handle is not None:
            handle.wait()

    def _views(self, group: Sequence[str], buffer: torch.Tensor) -> list[torch.Tensor]:
        views, start = [], 0
        for key in group:
            extent = self.extent(key)
            views.append(buffer[start : start + extent.nbytes].view(extent.dtype).view(extent.shape))
            start += aligned_size(extent.nbytes)
        return views

    def _read_group(self, group: Sequence[str], buffer: torch.Tensor) -> list[SwapHandle]:
        return [self.swap_in(key, view) for key, view in zip(group, self._views(group, buffer))]


def _wait_all(handles: Sequence[SwapHandle]) -> None:
    for handle in handles:
        handle.wait()
