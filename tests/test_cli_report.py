"""`zerokit report`: GPU links, NCCL and the rest, with and without NVML, nvidia-smi and GPUs."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from zerokit.cli import main


def _report(capsys) -> str:
    assert main(["report"]) == 0
    return capsys.readouterr().out


def _row(out: str, label: str) -> list[str]:
    """Values of the rows with this label (a section prints `  label  value`)."""
    return [line.strip()[len(label):].strip() for line in out.splitlines() if line.strip().startswith(label + "  ")]


def _without_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no nvidia-smi
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: no NVML


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only wording")
def test_without_gpu_nvml_or_nvidia_smi_it_says_so(capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _without_nvidia_smi(monkeypatch, tmp_path)
    out = _report(capsys)
    assert "\nGPU links\n" in out
    assert "NVML  not available (pynvml missing or no NVIDIA driver); listing through torch" in out
    assert "none: CUDA is not available, zerokit runs on the CPU" in out
    assert "not available (pynvml missing or no NVIDIA driver): NVLink state unknown" in out
    assert "nvidia-smi  not installed: no topology matrix" in out
    assert "NCCL            n/a (no CUDA)" in out
    assert "backends        gloo" in out
    assert "locked-memory limit" in out and "/dev/shm" in out


class _FakeNvml(SimpleNamespace):
    """Two GPUs joined by four NVLinks, and a third on PCIe only."""

    NVML_NVLINK_MAX_LINKS = 6
    NVML_FEATURE_ENABLED = 1
    NVMLError = RuntimeError
    BUSES = [b"00000000:18:00.0", b"00000000:2A:00.0", b"00000000:3A:00.0"]

    def __init__(self) -> None:
        super().__init__(shut=0)

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut += 1

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"999.1"

    def nvmlDeviceGetCount(self) -> int:
        return 3

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "Fake H100"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=80 * 2**30, used=2**30)

    def nvmlDeviceGetPciInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self.BUSES[handle])

    def nvmlDeviceGetNvLinkState(self, handle: int, link: int) -> int:
        if handle == 2 or link >= 4:
            raise self.NVMLError("not supported")
        return 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: int, link: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self.BUSES[1 - handle].lower())


def test_nvlink_state_from_nvml_and_the_topology_matrix(capsys, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '        GPU0    GPU1'\necho 'GPU0     X      NV4'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    out = _report(capsys)
    assert _row(out, "driver") == ["999.1"]
    assert _row(out, "GPU 0") == ["Fake H100, 80.0 GiB total, 1.0 GiB used", "4 NVLink links active: 4 to GPU 1"]
    assert _row(out, "GPU 1")[1] == "4 NVLink links active: 4 to GPU 0"
    assert _row(out, "GPU 2")[1] == "no active NVLink (PCIe only)"
    assert _row(out, "topo -m") == ["GPU0    GPU1"] and "GPU0     X      NV4" in out
    assert fake.shut == 2  # every nvmlInit paired with a shutdown


def test_a_failing_nvidia_smi_is_reported(capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _without_nvidia_smi(monkeypatch, tmp_path)
    smi = tmp_path / "nvidia-smi"
    failure = "NVIDIA-SMI has failed because it could not communicate with the driver"
    smi.write_text(f"#!/bin/sh\necho '{failure}' >&2\nexit 9\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    out = _report(capsys)
    assert _row(out, "topo -m")[0].startswith("failed: NVIDIA-SMI has failed")
