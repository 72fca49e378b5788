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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

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
    builders: list[Callable[[], Section]] = [
        versions_section, gpus_section, links_section, host_memory_section, extension_section
    ]
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
        ("cuDNN", _cudnn_version()),
        ("backends", _distributed_backends()),
    ]
    return Section("versions", tuple(rows))


def _cudnn_version() -> str:
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return str(version) if version else "not available"


def _distributed_backends() -> str:
    import torch.distributed as dist

    if not dist.is_available():
        return "none: torch was built without torch.distributed"
    found = [name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()),
                                   ("mpi", dist.is_mpi_available())) if ok]  # fmt: skip
    return ", ".join(found) or "none"


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


def _with_nvml(read: Callable[[Any], list[tuple[str, str]]]) -> Optional[list[tuple[str, str]]]:
    """read(pynvml) between NVML's init and shutdown; None where NVML cannot start."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, or NVMLError when no driver is loaded
        return None
    try:
        return read(pynvml)
    finally:
        pynvml.nvmlShutdown()


def _gpus_from_nvml() -> Optional[list[tuple[str, str]]]:
    return _with_nvml(_gpu_rows)


def _gpu_rows(pynvml) -> list[tuple[str, str]]:
    rows = [("driver", _text(pynvml.nvmlSystemGetDriverVersion()))]
    count = pynvml.nvmlDeviceGetCount()
    if count == 0:
        rows.append(("GPUs", "none found by NVML"))
    for i in range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        rows.append((
            f"GPU {i}",
            f"{_text(pynvml.nvmlDeviceGetName(handle))}, "
            f"{memory.total / 2**30:.1f} GiB total, {memory.used / 2**30:.1f} GiB used",
        ))  # fmt: skip
    return rows


def links_section() -> Section:
    """GPU interconnect: NVLink state per GPU from NVML, and `nvidia-smi topo -m` when installed."""
    rows = _nvlinks_from_nvml()
    if rows is None:
        rows = [("NVML", "not available (pynvml missing or no NVIDIA driver): NVLink state unknown")]
    rows += _topology_matrix()
    return Section("GPU links", tuple(rows))


def _nvlinks_from_nvml() -> Optional[list[tuple[str, str]]]:
    return _with_nvml(_nvlink_rows)


def _nvlink_rows(pynvml) -> list[tuple[str, str]]:
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    bus_ids = [_text(pynvml.nvmlDeviceGetPciInfo(h).busId).lower() for h in handles]
    rows = [] if handles else [("NVLink", "no GPU found by NVML")]
    for index, handle in enumerate(handles):
        peers: dict[str, int] = {}
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                if pynvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                    continue
                remote = _text(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId).lower()
            except pynvml.NVMLError:  # link absent or not supported on this GPU
                continue
            peer = f"GPU {bus_ids.index(remote)}" if remote in bus_ids else "NVSwitch/other"
            peers[peer] = peers.get(peer, 0) + 1
        detail = ", ".join(f"{count} to {peer}" for peer, count in sorted(peers.items()))
        rows.append((f"GPU {index}", f"{sum(peers.values())} NVLink links active: {detail}" if peers
                     else "no active NVLink (PCIe only)"))  # fmt: skip
    return rows


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _topology_matrix() -> list[tuple[str, str]]:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return [("nvidia-smi", "not installed: no topology matrix")]
    try:
        result = subprocess.run([binary, "topo", "-m"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return [("topo -m", f"failed: {error}")]
    if result.returncode != 0:
        return [("topo -m", f"failed: {(result.stderr or result.stdout).strip()[:200]}")]
    return [("topo -m" if i == 0 else "", line) for i, line in enumerate(result.stdout.rstrip().splitlines())]


def host_memory_section() -> Section:
    import psutil

    memory = psutil.virtual_memory()
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    rows = [
        ("CPU cores", f"{psutil.cpu_count(logical=False)} physical, {psutil.cpu_count()} logical"),
        ("host memory", f"{memory.total / 2**30:.1f} GiB total, {memory.available / 2**30:.1f} GiB available"),
        ("locked-memory limit", f"soft {_limit(soft)}, hard {_limit(hard)} (ulimit -l)"),
        ("/dev/shm", _shared_memory()),
    ]
    return Section("host", tuple(rows))


def _shared_memory() -> str:
    """NCCL and DataLoader workers need room here; containers often give it 64 MiB."""
    try:
        usage = shutil.disk_usage("/dev/shm")
    except OSError:
        return "not mounted"
    return f"{usage.total / 2**30:.1f} GiB total, {usage.free / 2**30:.1f} GiB free"


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
