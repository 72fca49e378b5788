"""`zerokit profile` end to end on the CPU: two ranks training under a wrapped torchrun command, and
a run that dies of (simulated) out-of-memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from zerokit.cli import main

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A plain training loop: the engine itself reports its phases and model states.
TRAIN = textwrap.dedent("""
    import sys
    import torch
    import zerokit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    engine = zerokit.initialize(model, torch.optim.AdamW(model.parameters()), {"zero_optimization": {"stage": 2}})
    for step in range(int(sys.argv[1])):
        x = torch.randn(256, 256)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    if sys.argv[2:] == ["oom"]:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
""")


def _profile(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "zerokit", "profile", *args], cwd=tmp_path, env=environment,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _check_rank_files(out: Path, rank: int, outcome: str) -> dict:
    data = json.loads((out / f"rank{rank}.json").read_text())
    assert data["schema"] == "zerokit.profile.rank/1" and data["rank"] == rank and data["outcome"] == outcome
    assert data["snapshot"] is None and "without CUDA" in data["snapshot_note"]
    assert not list(out.glob("*snapshot*"))
    png = (out / f"rank{rank}.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    samples = data["samples"]
    assert len(samples["t"]) >= 3 and samples["t"] == sorted(samples["t"])
    assert min(samples["host_rss"]) > 50 * 2**20  # a Python process with torch loaded
    assert samples["cuda_allocated"] == [None] * len(samples["t"])  # no GPU here, and said so
    assert data["memory_source"] == "host_rss" and data["nvml"] == "no CUDA device"
    return data


def test_two_ranks_under_a_wrapped_torchrun_command(tmp_path: Path) -> None:
    command = ["--", "torchrun", "--standalone", "--nproc-per-node", "2", "train.py", "30"]
    result = _profile(tmp_path, "--out", "out", "--interval-ms", "10", *command)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    for rank in (0, 1):
        data = _check_rank_files(out, rank, "ok")
        names = {p["name"] for p in data["phases"]}
        # per step: forward, backward, its gradient communication, optimizer step
        assert names == {"forward", "backward", "communication", "step"} and len(data["phases"]) == 120
        states = data["samples"]["model_states"]
        after_step = sum(data["model_state_breakdown"].values())
        # parameters, fp32 moments (and, during backward, gradient shards) of 0.5M parameters
        assert after_step > 4_000_000 and max(states) >= after_step
        assert set(data["phase_peaks"]) <= {"idle", "forward", "backward", "communication", "step"}
        assert data["peak"]["memory"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema"] == "zerokit.profile/1" and summary["exit_code"] == 0
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert "zerokit profile:" in result.stderr and "ranks alive" in result.stderr
    assert "rank 1 (ok): peak" in result.stderr


def test_out_of_memory_dumps_before_the_process_dies(tmp_path: Path) -> None:
    result = _profile(tmp_path, "--out", "oom", "--interval-ms", "10", "train.py", "2", "oom")
    assert result.returncode == 1
    assert "torch.OutOfMemoryError: CUDA out of memory (simulated)" in result.stderr
    data = _check_rank_files(tmp_path / "oom", 0, "oom")
    assert data["error"] == "torch.OutOfMemoryError: CUDA out of memory (simulated)"
    assert len(data["phases"]) == 8  # two steps of forward, backward, communication, step
    assert "exit code 1" in result.stderr and "rank 0 (oom)" in result.stderr


def test_bad_invocations(capsys) -> None:
    assert main(["profile", "--", "bash", "run.sh"]) == 2
    assert "cannot profile" in capsys.readouterr().err
    assert main(["profile", "--interval-ms", "0", "train.py", "1"]) == 2
    assert "--interval-ms must be positive" in capsys.readouterr().err
    assert main(["profile", "no_such_script.py"]) == 2
    assert "'no_such_script.py' not found" in capsys.readouterr().err
    assert main(["profile", "bash", "run.sh"]) == 2  # not a script: run.sh is not bash's launcher form
    assert "not found" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_writes_a_snapshot_and_allocator_series(tmp_path: Path) -> None:
    result = _profile(tmp_path, "--out", "cuda", "--interval-ms", "10", "train.py", "5")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "cuda"
    data = json.loads((out / "rank0.json").read_text())
    assert data["snapshot"] == "rank0_snapshot.pickle" and (out / data["snapshot"]).stat().st_size > 0
    assert data["memory_source"] == "cuda_allocated" and data["peaks"]["cuda_allocated"] > 0
    assert data["peaks"]["cuda_reserved"] >= data["peaks"]["cuda_allocated"]
    if data["nvml"] == "ok":
        assert data["peaks"]["outside_allocator"] > 0  # the CUDA context at least
