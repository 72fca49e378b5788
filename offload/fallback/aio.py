"""Asynchronous positioned file I/O on Python threads (os.preadv/os.pwrite release the GIL).

Same behaviour as csrc/async_io.cpp: requests split into blocks spread over the threads,
O_DIRECT where the filesystem allows it, unaligned buffers and tails through an aligned bounce
buffer, file offsets multiples of IO_ALIGNMENT.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from offload.fallback.host_memory import allocate_host
from offload.raw_memory import IO_ALIGNMENT, aligned_size, byte_view, tensor_nbytes


class IoFile:
    def __init__(self, fd: int, path: str, direct: bool, fallback_reason: str):
        self._fd = fd
        self.path = path
        self.direct = direct
        self.fallback_reason = fallback_reason
        self._lock = threading.Lock()
        self._in_flight = 0  # blocks submitted and not finished; guarded by _lock

    @staticmethod
    def open(path: str, create: bool, direct: bool) -> "IoFile":
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        reason = ""
        if direct:
            if hasattr(os, "O_DIRECT"):
                try:
                    return IoFile(os.open(path, flags | os.O_DIRECT, 0o600), path, True, "")
                except OSError as error:
                    if error.errno != 22:  # EINVAL: the filesystem refuses O_DIRECT
                        raise RuntimeError(f"cannot open {path}: {error.strerror}") from None
                reason = "the filesystem does not support O_DIRECT (open returned EINVAL); using buffered I/O"
            else:
                reason = "O_DIRECT is not available on this platform; using buffered I/O"
        try:
            return IoFile(os.open(path, flags, 0o600), path, False, reason)
        except OSError as error:
            raise RuntimeError(f"cannot open {path}: {error.strerror}") from None

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            if self._in_flight:
                raise RuntimeError(
                    f"cannot close {self.path}: {self._in_flight} I/O blocks are still in flight; "
                    "wait for its requests first"
                )
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)


class IoRequest:
    def __init__(self, nbytes: int, blocks: int, keep_alive: Optional[torch.Tensor]):
        self.nbytes = nbytes
        self._finished = threading.Condition()
        self._remaining = blocks
        self._error = ""
        self._keep_alive = keep_alive if blocks else None  # the buffer, held until the last block

    def done(self) -> bool:
        with self._finished:
            return self._remaining == 0

    def wait(self) -> None:
        with self._finished:
            self._finished.wait_for(lambda: self._remaining == 0)
            if self._error:
                raise RuntimeError(self._error)

    @property
    def error(self) -> str:
        with self._finished:
            return self._error

    def _finish_block(self, error: str) -> None:
        with self._finished:
            if error and not self._error:
                self._error = error
            self._remaining -= 1
            if self._remaining == 0:
                self._keep_alive = None
                self._finished.notify_all()


class IoPool:
    open = staticmethod(IoFile.open)

    def __init__(self, num_threads: int, block_size: int):
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if block_size <= 0 or block_size % IO_ALIGNMENT:
            raise ValueError(f"block_size must be a positive multiple of {IO_ALIGNMENT}, got {block_size}")
        self.num_threads = num_threads
        self.block_size = block_size
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="zerokit-io")
        self._bounce = threading.local()  # per-thread aligned staging buffer of block_size bytes

    def submit(self, file: IoFile, buffer: torch.Tensor, offset: int, write: bool) -> IoRequest:
        if offset < 0 or offset % IO_ALIGNMENT:
            raise ValueError(
                f"file offset {offset} is not a non-negative multiple of {IO_ALIGNMENT}; "
                "place extents at aligned offsets"
            )
        nbytes = tensor_nbytes(buffer)
        blocks = -(-nbytes // self.block_size)
        request = IoRequest(nbytes, blocks, buffer)
        if blocks == 0:
            return request
        with file._lock:
            if file._fd < 0:
                raise ValueError(f"file {file.path} is closed")
            file._in_flight += blocks
        view = byte_view(buffer)
        aligned_base = buffer.data_ptr() % IO_ALIGNMENT == 0
        for start in range(0, nbytes, self.block_size):
            block = view[start : start + self.block_size]
            self._executor.submit(self._run_block, file, request, block, aligned_base, offset + start, write)
        return request

    def _run_block(
        self, file: IoFile, request: IoRequest, block: memoryview, aligned: bool, offset: int, write: bool
    ) -> None:
        error = ""
        try:
            nbytes = len(block)
            if not file.direct or (aligned and nbytes % IO_ALIGNMENT == 0):
                _transfer(file, block, nbytes, offset, write)
            else:  # O_DIRECT needs aligned address and length: go through the bounce buffer
                padded = aligned_size(nbytes)
                staging = self._staging()[:padded]
                if write:
                    staging[:nbytes] = block
                    staging[nbytes:] = bytes(padded - nbytes)
                    _transfer(file, staging, nbytes, offset, write)
                else:
                    _transfer(file, staging, nbytes, offset, write)
                    block[:] = staging[:nbytes]
        except Exception as exc:  # reported through the request, like the native pool
            error = str(exc)
        finally:
            with file._lock:
                file._in_flight -= 1
            request._finish_block(error)

    def _staging(self) -> memoryview:
        view = getattr(self._bounce, "view", None)
        if view is None:
            tensor, _, _ = allocate_host(self.block_size, IO_ALIGNMENT, pin=False)
            self._bounce.tensor, self._bounce.view = tensor, byte_view(tensor)
            view = self._bounce.view
        return view


def _transfer(file: IoFile, view: memoryview, need: int, offset: int, write: bool) -> None:
    """Write all of view, or read into view until it is full or the file ends after `need` bytes."""
    done = 0
    while done < len(view):
        try:
            if write:
                n = os.pwrite(file._fd, view[done:], offset + done)
            else:
                n = os.preadv(file._fd, [view[done:]], offset + done)
        except OSError as error:
            op = "pwrite" if write else "pread"
            raise RuntimeError(
                f"{op} of {need} bytes at offset {offset} in {file.path} failed: {error.strerror}"
            ) from None
        if n == 0:
            break
        done += n
    if done < need:
        if write:
            raise RuntimeError(f"pwrite of {need} bytes at offset {offset} in {file.path} made no progress")
        raise RuntimeError(
            f"pread of {need} bytes at offset {offset} in {file.path} hit end of file after {done} bytes "
            "(was this extent written?)"
        )
