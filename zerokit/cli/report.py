"""`zerokit report`: the environment zerokit sees, one section per function.

Each section function returns a Section; add one by writing a function and listing it in
`_sections`. Sections degrade gracefully: a missing GPU, NVML or extension is reported, not raised.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

PROBE_MIB_DEFAULT = 256
PROBE_MIB_MAX = 512


@dataclass(frozen=True)
class Section:
    title: str
    rows: tuple[tuple[str, str], ...]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="print versions, devices, host memory and offload support")
    parser.add_argument(
        "--nvme-path", type=Path, default=None, help="also probe write/read throughput of this directory"
    )
    parser.add_argument(
        "--probe-mib", type=int, default=PROBE_MIB_DEFAULT,
        help=f"size of the throughput probe in MiB (1..{PROBE_MIB_MAX}, default {PROBE_MIB_DEFAULT})",
    )  # fmt: skip
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.probe_mib <= PROBE_MIB_MAX:
        print(
            f"zerokit report: --probe-mib must be between 1 and {PROBE_MIB_MAX}, got {args.probe_mib}",
            file=sys.stderr,
        )
        return 2
    for section in _sections(args):
        print(format_section(section))
    return 0


def _sections(args: argparse.Namespace) -> list[Section]:
    builders: list[Callable[[], Section]] = [versions_section, gpus_section, host_memory_section, extension_section]
    if args.nvme_path is not None:
        builders.append(lambda: nvme_probe_section(args.nvme_path, args.probe_mib << 20))
    return [build() for build in builders]


def format_section(section: Section) -> str:
    width = max((len(label) for label, _ in section.rows), default=0)
    lines = [f"{section.title}"] + [f"  {label.ljust(width)}  {value}" for label, value in section.rows]
    return "\n".join(lines) + "\n"


def versions_section() -> Section:
    cuda = torch.version.cuda or "none (CPU build of torch)"
    rows = [
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("torch CUDA", cuda),
        ("CUDA available", "yes" if torch.cuda.is_available() else "no"),
        ("NCCL", _nccl_version()),
    ]
    return Section("versions", tuple(rows))


def _nccl_version() -> str:
    if not torch.cuda.is_available():
        return "n/a (no CUDA)"
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError) as error:
        return f"unavailable ({error})"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def gpus_section() -> Section:
    rows = _gpus_from_nvml()
    if rows is None:
        rows = [("NVML", "not available (pynvml missing or no NVIDIA driver); listing through torch")]
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                rows.append((f"GPU {i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
        else:
            rows.append(("GPUs", "none: CUDA is not available, zerokit runs on the CPU"))
    return Section("GPUs", tuple(rows))


def _gpus_from_nvml() -> Optional[list[tuple[str, str]]]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, or NVMLError when no driver is loaded
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        rows = [("driver", driver.decode() if isinstance(driver, bytes) else str(driver))]
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            rows.append(("GPUs", "none found by NVML"))
        for i in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            rows.append((
                f"GPU {i}",
                f"{name.decode() if isinstance(name, bytes) else name}, "
                f"{memory.total / 2**30:.1f} GiB total, {memory.used / 2**30:.1f} GiB used",
            ))  # fmt: skip
        return rows
    finally:
        pynvml.nvmlShutdown()


def host_memory_section() -> Section:
    import psutil

    memory = psutil.virtual_memory()
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    rows = [
        ("CPU cores", f"{psutil.cpu_count(logical=False)} physical, {psutil.cpu_count()} logical"),
        ("host memory", f"{memory.total / 2**30:.1f} GiB total, {memory.available / 2**30:.1f} GiB available"),
        ("locked-memory limit", f"soft {_limit(soft)}, hard {_limit(hard)} (ulimit -l)"),
    ]
    return Section("host", tuple(rows))


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else f"{value} bytes ({value / 2**20:.1f} MiB)"


def extension_section() -> Section:
    from offload.extension import extension_status, native_ops

    status = extension_status()
    ops = native_ops()
    pin = ops.cuda_host_register_unavailable_reason() if torch.cuda.is_available() else "no CUDA, nothing to pin for"
    rows = [
        ("path", status.path),
        ("reason", status.reason),
        ("CPU Adam SIMD", ops.adam_simd_level()),
        ("host pinning", pin or "cudaHostRegister"),
    ]
    return Section("native extension", tuple(rows))


def nvme_probe_section(nvme_path: Path, nbytes: int) -> Section:
    from offload.aio import AsyncIO
    from offload.host_memory import allocate_host_buffer
    from offload.nvme import NVMePathError, check_nvme_path

    try:
        check_nvme_path(nvme_path, nbytes)
    except NVMePathError as error:
        return Section(f"NVMe probe of {nvme_path}", (("error", str(error)),))
    directory = Path(tempfile.mkdtemp(prefix="zerokit-probe-", dir=nvme_path))
    try:
        io = AsyncIO(num_threads=4)
        file = io.open(directory / "probe.bin", create=True, direct=True)
        data = allocate_host_buffer(nbytes, pin=False).tensor
        data.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
        back = allocate_host_buffer(nbytes, pin=False).tensor
        write_s = _timed(lambda: (io.write(file, data, 0).wait(), file.direct or _fsync(file.path)))
        read_s = _timed(lambda: io.read(file, back, 0).wait())
        verified = torch.equal(data, back)
        file.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # our own fresh directory only
    mode = "O_DIRECT" if file.direct else f"buffered ({file.fallback_reason}; reads may come from the page cache)"
    rows = [
        ("mode", mode),
        ("size", f"{nbytes / 2**20:.0f} MiB, 4 threads, 4 MiB blocks"),
        ("write", f"{nbytes / write_s / 1e9:.2f} GB/s"),
        ("read", f"{nbytes / read_s / 1e9:.2f} GB/s"),
        ("read back", "identical" if verified else "MISMATCH: data read differs from data written"),
    ]
    return Section(f"NVMe probe of {nvme_path}", tuple(rows))


def _fsync(path: str) -> None:
    """Flush buffered writes to the drive, so a buffered write probe measures the drive too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return max(time.perf_counter() - start, 1e-9)
