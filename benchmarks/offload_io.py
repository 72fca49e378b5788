"""Bandwidth of the offload engine's data paths (host<->GPU copies, NVMe I/O) against raw baselines.

Copy engine (needs CUDA): --size bytes per copy between pinned host memory and the GPU, h2d, d2h
and both at once. "raw": torch's `copy_(non_blocking=True)` on tensors from torch's pinned
allocator, on the current stream (both at once: one side stream per direction). "engine":
CopyEngine on host buffers from offload.host_memory. One warm-up, then --repeats copies timed with
CUDA events from issue to completion; medians.

NVMe (with --nvme-path): --nvme-bytes written, then read back, in a fresh directory under
--nvme-path (removed at the end). Baselines, --threads threads on disjoint 4 MiB blocks of one
file, striped over the threads: buffered os.pwrite/os.preadv ("buffered"), and the same with
O_DIRECT from page-aligned buffers ("direct"), and with O_DIRECT from each block's own place in
one large buffer, as zerokit's data lives ("direct_in_place"); the fastest is the disk's
"ceiling". zerokit, with
--threads threads: AsyncIO with every 64 MiB request in flight ("aio"), and NVMeSwapper swapping
64 MiB pieces of one host tensor out and in ("swapper"). Write times include fsync. Before each
read the file's pages are dropped with posix_fadvise(DONTNEED) where available (fadvise_dontneed;
a no-op on tmpfs). Each method writes once untimed, so timed writes overwrite; then
--nvme-repeats rounds each time every method once (write, then read), in a rotating order, so a
drift of the disk during the run reaches all methods alike; zerokit's ratio is the median over
rounds of its figure over that round's ceiling.

Every measurement prints one JSON line (also appended to --out): bench (copy | nvme), method, op
(h2d | d2h | both | write | read), gbps (1e9 bytes/s; for "both" the sum, with h2d_gbps and
d2h_gbps) and, for zerokit, ratio (engine / raw, or zerokit / ceiling).

    python benchmarks/offload_io.py                                    # copy engine only
    python benchmarks/offload_io.py --nvme-path /local_nvme --threads 8 --out io.jsonl
    python benchmarks/offload_io.py --size 64MiB --nvme-path /local_nvme   # quick check, CUDA optional
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout; an install wins
from offload.aio import AsyncIO  # noqa: E402
from offload.copy_engine import CopyEngine  # noqa: E402
from offload.extension import extension_status  # noqa: E402
from offload.host_memory import allocate_host_buffer  # noqa: E402
from offload.nvme import SWAP_FILE_NAME, NVMePathError, NVMeSwapper, check_nvme_path  # noqa: E402

GB = 1e9
MiB = 2**20
BLOCK = 4 * MiB  # I/O block of the baselines and of zerokit's I/O threads
REQUEST = 64 * MiB  # bytes per AsyncIO request and per swapped tensor
UNITS = {"": MiB, "kib": 2**10, "mib": MiB, "gib": 2**30}
COPY_OPS = {"h2d": ("h2d",), "d2h": ("d2h",), "both": ("h2d", "d2h")}
Report = Callable[..., None]


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmg]ib)?", text.strip(), re.IGNORECASE)
    if match is None or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give a number of MiB, or e.g. 512MiB, 1GiB")
    return int(match[1]) * UNITS[(match[2] or "").lower()]


def timed_event(stream: "torch.cuda.Stream") -> "torch.cuda.Event":
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def time_copies(issue: Callable[[], list], repeats: int) -> tuple[list[float], float]:
    """Median seconds from start to each event issue() returns, and to the last of them; one warm-up."""
    samples = []
    for repeat in range(repeats + 1):
        torch.cuda.synchronize()
        start = timed_event(torch.cuda.current_stream())
        ends = issue()
        torch.cuda.synchronize()
        if repeat:
            samples.append([start.elapsed_time(end) / 1e3 for end in ends])
    return [statistics.median(column) for column in zip(*samples)], statistics.median(max(s) for s in samples)


def copy_section(size: int, repeats: int, report: Report) -> None:
    if not torch.cuda.is_available():
        report(bench="copy", skipped="CUDA is not available; the copy engine section needs a GPU")
        return
    device = torch.device("cuda", torch.cuda.current_device())
    raw_host = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    buffers = [allocate_host_buffer(size, pin=True) for _ in range(2)]
    gpu = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]
    side = [torch.cuda.Stream(device) for _ in range(2)]  # raw copies done both at once; engine markers
    engine = CopyEngine(device)
    index = {"h2d": 0, "d2h": 1}  # h2d copies host[0] -> gpu[0], d2h copies gpu[1] -> host[1]

    def raw(direction: str, stream: "torch.cuda.Stream") -> "torch.cuda.Event":
        i = index[direction]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            (gpu[i].copy_(raw_host[i], non_blocking=True) if direction == "h2d"
             else raw_host[i].copy_(gpu[i], non_blocking=True))  # fmt: skip
        return timed_event(stream)

    def engine_copy(direction: str) -> "torch.cuda.Event":
        i = index[direction]
        handle = (engine.to_device(buffers[i].tensor, out=gpu[i])[1] if direction == "h2d"
                  else engine.to_host(gpu[i], buffers[i].tensor))  # fmt: skip
        handle.wait_stream(side[i])  # the engine's events cannot time; an event on our stream after it can
        return timed_event(side[i])

    common = dict(bench="copy", size_bytes=size, gpu=torch.cuda.get_device_name(device))
    engine_info = dict(host_pinned=all(b.pinned for b in buffers), pin_reason=buffers[0].pin_reason,
                       extension=extension_status().path)  # fmt: skip
    for op, directions in COPY_OPS.items():
        stream_of = {d: side[index[d]] if op == "both" else torch.cuda.current_stream() for d in directions}
        gbps = {}
        for method, issue in (
            ("raw", lambda: [raw(d, stream_of[d]) for d in directions]),
            ("engine", lambda: [engine_copy(d) for d in directions]),
        ):
            per_direction, span = time_copies(issue, repeats)
            gbps[method] = len(directions) * size / GB / span
            fields = {f"{d}_gbps": size / GB / t for d, t in zip(directions, per_direction)} if op == "both" else {}
            if method == "engine":
                fields.update(ratio=gbps["engine"] / gbps["raw"], **engine_info)
            report(**common, method=method, op=op, gbps=gbps[method], **fields)
        engine.synchronize()


def flush(path: Path, drop: bool = False) -> bool:
    """fsync the file; with drop, also ask the kernel to forget its cached pages (best effort)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return True
        return False
    except OSError as error:  # fsync failing is an error; fadvise failing only loses the cache drop
        if not drop:
            raise
        print(f"posix_fadvise(DONTNEED) on {path} failed: {error}", file=sys.stderr)
        return False
    finally:
        os.close(fd)


def time_pass(path: Path, write: Callable[[], None], read: Callable[[], None]) -> dict:
    """Seconds of one write + fsync, and of one read after dropping the page cache."""
    start = time.perf_counter()
    write()
    flush(path)
    seconds = dict(write=time.perf_counter() - start)
    dropped = flush(path, drop=True)
    start = time.perf_counter()
    read()
    return dict(seconds, read=time.perf_counter() - start, fadvise_dontneed=dropped)


def threaded_pio(fd: int, blocks: list[mmap.mmap], total: int, write: bool, whole: mmap.mmap | None = None) -> None:
    """Thread t moves blocks t, t + threads, ... through its own buffer (or, given `whole`, through
    the block's own place in that one large buffer, as the engine's data lives): the disk sees one
    sequential stream (on the disks tried, faster than a contiguous range per thread)."""
    threads = len(blocks)

    def work(thread: int) -> None:
        for offset in range(thread * BLOCK, total, threads * BLOCK):
            buffer = blocks[thread] if whole is None else memoryview(whole)[offset : offset + BLOCK]
            moved = os.pwrite(fd, buffer, offset) if write else os.preadv(fd, [buffer], offset)
            if moved != BLOCK:
                raise RuntimeError(f"short {'write' if write else 'read'} at offset {offset}: {moved} of {BLOCK} bytes")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))


@dataclass
class DiskMethod:
    name: str
    path: Path
    write: Callable[[], None]
    read: Callable[[], None]
    close: Callable[[], None]
    fields: dict


BASELINES = ("buffered", "direct", "direct_in_place")


def baseline_methods(directory: str, total: int, threads: int, report: Report) -> list[DiskMethod]:
    blocks = [mmap.mmap(-1, BLOCK) for _ in range(threads)]  # page-aligned, as O_DIRECT needs
    for block in blocks:
        block[:] = os.urandom(BLOCK)
    whole = mmap.mmap(-1, total)
    for offset in range(0, total, BLOCK):  # every page touched first, as the engine's pinned buffers are
        whole[offset : offset + BLOCK] = blocks[0]
    methods = []
    for name in BASELINES:
        path = Path(directory) / f"{name}.bin"
        flags = os.O_RDWR | os.O_CREAT
        if name.startswith("direct"):
            try:
                os.close(os.open(path, flags | os.O_DIRECT, 0o600))
            except (AttributeError, OSError) as error:  # no O_DIRECT here, or the filesystem refuses it
                report(bench="nvme", method=name, skipped=f"O_DIRECT is not available: {error!r}")
                continue
            flags |= os.O_DIRECT
        fd = os.open(path, flags, 0o600)
        place = whole if name == "direct_in_place" else None
        methods.append(DiskMethod(
            name, path,
            lambda fd=fd, place=place: threaded_pio(fd, blocks, total, write=True, whole=place),
            lambda fd=fd, place=place: threaded_pio(fd, blocks, total, write=False, whole=place),
            lambda fd=fd: os.close(fd), dict(direct=name != "buffered"),
        ))  # fmt: skip
    return methods


def zerokit_methods(directory: str, total: int, threads: int) -> list[DiskMethod]:
    data = allocate_host_buffer(total).tensor  # pinned when CUDA is present, like the engine's buffers
    data.view(-1, BLOCK)[:] = torch.frombuffer(bytearray(os.urandom(BLOCK)), dtype=torch.uint8)
    pieces = [(offset, data[offset : offset + REQUEST]) for offset in range(0, total, REQUEST)]
    extension = extension_status().path

    io = AsyncIO(threads, BLOCK)
    file = io.open(Path(directory) / "aio.bin")

    def aio(submit: Callable) -> None:
        for request in [submit(file, piece, offset) for offset, piece in pieces]:
            request.wait()

    swapper = NVMeSwapper(directory, total, num_threads=threads, block_size=BLOCK)

    def swap(operation: Callable) -> None:
        for handle in [operation(f"piece{offset}", piece) for offset, piece in pieces]:
            handle.wait()

    return [
        DiskMethod("aio", Path(file.path), lambda: aio(io.write), lambda: aio(io.read), file.close,
                   dict(direct=file.direct, fallback_reason=file.fallback_reason, extension=extension)),
        DiskMethod("swapper", swapper.directory / SWAP_FILE_NAME, lambda: swap(swapper.swap_out),
                   lambda: swap(swapper.swap_in), swapper.close,
                   dict(direct=swapper.direct, fallback_reason=swapper.fallback_reason, extension=extension)),
    ]  # fmt: skip


def nvme_section(nvme_path: str, total: int, threads: int, rounds: int, report: Report) -> None:
    """Every method writes once untimed; then `rounds` rounds, each timing every method once in a
    rotating order, so that the disk's drift within a run reaches baselines and zerokit alike.
    zerokit's ratio is taken round by round against that round's ceiling (the fastest baseline),
    then the median over rounds."""
    common = dict(bench="nvme", bytes=total, threads=threads, block_bytes=BLOCK, rounds=rounds)
    with tempfile.TemporaryDirectory(prefix="zerokit-io-bench-", dir=nvme_path) as directory:
        methods = baseline_methods(directory, total, threads, report) + zerokit_methods(directory, total, threads)
        try:
            for method in methods:
                method.write()
            passes = {method.name: [] for method in methods}
            for round_index in range(rounds):
                shift = round_index % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    passes[method.name].append(time_pass(method.path, method.write, method.read))
        finally:
            for method in methods:
                method.close()
        for op in ("write", "read"):
            gbps = {name: [total / GB / one[op] for one in runs] for name, runs in passes.items()}
            ceilings = [max(gbps[name][index] for name in BASELINES if name in gbps) for index in range(rounds)]
            for method in methods:
                fields = dict(method.fields, fadvise_dontneed=all(one["fadvise_dontneed"] for one in passes[method.name]))
                if method.name not in BASELINES:
                    ratios = [mine / ceiling for mine, ceiling in zip(gbps[method.name], ceilings)]
                    fields.update(ratio=statistics.median(ratios), ratios=[round(r, 3) for r in ratios])
                report(**common, method=method.name, op=op, gbps=statistics.median(gbps[method.name]),
                       per_round=[round(g, 3) for g in gbps[method.name]], **fields)  # fmt: skip
            report(**common, method="ceiling", op=op, gbps=statistics.median(ceilings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=2**30, help="bytes per copy (MiB, or e.g. 512MiB)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats of each copy")
    parser.add_argument("--nvme-path", help="a directory on the disk to measure; without it, no NVMe section")
    parser.add_argument("--nvme-bytes", type=parse_size, help="bytes written and read per pass (default 4 x --size)")
    parser.add_argument("--nvme-repeats", type=int, default=3, help="rounds: timed write + read passes per method")
    parser.add_argument("--threads", type=int, default=8, help="I/O threads of the baselines and of zerokit")
    parser.add_argument("--out", help="append the JSON lines to this file")
    args = parser.parse_args()
    nvme_bytes = args.nvme_bytes or 4 * args.size
    if min(args.repeats, args.nvme_repeats, args.threads) < 1:
        parser.error("--repeats, --nvme-repeats and --threads must be at least 1")
    if args.nvme_path:
        if nvme_bytes % BLOCK:
            parser.error(f"--nvme-bytes must be a multiple of 4 MiB, got {nvme_bytes} bytes")
        try:
            check_nvme_path(args.nvme_path, (len(BASELINES) + 2) * nvme_bytes)  # every method's file at once
        except NVMePathError as error:
            parser.error(str(error))

    def report(**fields) -> None:
        line = json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as out:
                out.write(line + "\n")

    copy_section(args.size, args.repeats, report)
    if args.nvme_path:
        nvme_section(args.nvme_path, nvme_bytes, args.threads, args.nvme_repeats, report)


if __name__ == "__main__":
    main()
