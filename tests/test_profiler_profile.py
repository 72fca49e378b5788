"""The pieces of `zerokit profile`: launch commands, the phase API, attribution and output files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from zerokit.profiler import outputs
from zerokit.profiler.launch import BOOTSTRAP, LaunchError, plan_script, plan_wrapped
from zerokit.profiler.phases import active_session, phase, track_model_states
from zerokit.profiler.session import ProfileSession, SessionConfig


def test_script_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("train.py").write_text("")
    single = plan_script(["train.py", "--steps", "3"], nproc=1)
    assert single.command == (sys.executable, "-m", BOOTSTRAP, "train.py", "--steps", "3")
    several = plan_script(["train.py"], nproc=4)
    assert several.command[:5] == (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4")
    assert several.command[5:] == ("-m", BOOTSTRAP, "train.py") and several.local_ranks == 4
    with pytest.raises(LaunchError, match="give the training script"):
        plan_script([], nproc=1)
    with pytest.raises(LaunchError, match="'missing.py' not found"):
        plan_script(["missing.py"], nproc=1)


def test_wrapped_commands_keep_their_options() -> None:
    torchrun = plan_wrapped(["torchrun", "--nnodes", "1", "--nproc-per-node", "2", "train.py", "--lr", "1e-3"])
    assert torchrun.command == (sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                                "-m", BOOTSTRAP, "train.py", "--lr", "1e-3")  # fmt: skip
    assert torchrun.local_ranks == 2
    module = plan_wrapped(["/usr/bin/torchrun", "--standalone", "-m", "pkg.train", "-x"])
    assert module.command[-5:] == ("-m", BOOTSTRAP, "--module", "pkg.train", "-x") and module.local_ranks == 1
    assert plan_wrapped(["python3", "-m", "torch.distributed.run", "--nproc-per-node=3", "t.py"]).local_ranks == 3
    assert plan_wrapped(["python", "t.py", "a"]).command == (sys.executable, "-m", BOOTSTRAP, "t.py", "a")
    assert plan_wrapped(["python", "-m", "pkg.t"]).command == (sys.executable, "-m", BOOTSTRAP, "--module", "pkg.t")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["torchrun", "--no-python", "echo"], "runs a program"),
        (["bash", "train.sh"], "cannot profile"),
        ([], "nothing to run"),
    ],
)
def test_unwrappable_commands_are_refused(command: list[str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        plan_wrapped(command)


def test_phase_api_is_a_no_op_without_a_session() -> None:
    assert active_session() is None
    with phase("forward"):
        track_model_states(lambda: {"parameters": 1})
    with pytest.raises(ValueError, match="phase must be one of"):
        with phase("lunch"):
            pass


def test_memory_beyond_model_states_in_forward_and_backward_is_activations() -> None:
    memory = [10, 10, 15, 20, 14, 12]
    states = [5, 5, 5, 5, 5, 6]
    outer = ["idle", "forward", "forward", "backward", "backward", "step"]
    activations, other = outputs._attribute(memory, states, outer)
    assert activations == [0, 0, 5, 10, 4, 0]
    assert [m - s - a for m, s, a in zip(memory, states, activations)] == other


class _Engine:
    """Stands in for the engine: a memory_breakdown that changes over time."""

    def __init__(self) -> None:
        self.held = {"parameters": 100, "optimizer_states": 0}

    def memory_breakdown(self) -> dict[str, int]:
        return dict(self.held)


def test_session_records_phases_and_writes_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = ProfileSession(SessionConfig(out_dir=tmp_path, interval_s=0.005, snapshot=True, rank=3))
    session.start()
    engine = _Engine()
    session.track_model_states(engine.memory_breakdown)
    with session.phase("forward"):
        kept = torch.ones(1 << 18)
    with session.phase("backward"):
        with session.phase("communication"):
            pass
    engine.held["optimizer_states"] = 200
    with session.phase("step"):
        del kept
    # on CUDA the snapshot is dumped; pretend this rank recorded one, to check what is written
    monkeypatch.setattr(session, "recording_snapshot", True)
    monkeypatch.setattr(outputs, "dump", lambda path: path.write_bytes(b"snapshot") and path)
    files = session.finish("ok")
    assert {f.name for f in files} == {"rank3.json", "rank3.png", "rank3_snapshot.pickle"}
    data = json.loads((tmp_path / "rank3.json").read_text())
    assert data["snapshot"] == "rank3_snapshot.pickle" and data["snapshot_note"] is None
    assert [(p["name"], p["depth"]) for p in data["phases"]] == [
        ("forward", 0), ("communication", 1), ("backward", 0), ("step", 0)
    ]
    assert data["model_state_breakdown"] == {"parameters": 100, "optimizer_states": 200}
    assert max(data["samples"]["model_states"]) == 300
    assert data["memory_source"] == "host_rss" and min(data["samples"]["host_rss"]) > 0
    assert json.loads((tmp_path / "status" / "rank3.json").read_text())["done"] is True
    assert session.finish("ok") == []  # once only
    with session.phase("forward"):  # after the end: nothing recorded
        pass
    assert len(session.spans) == 4


def test_bootstrap_needs_the_profiler_environment(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from zerokit.profiler import bootstrap

    monkeypatch.delenv("ZEROKIT_PROFILE_DIR", raising=False)
    assert bootstrap.main(["train.py"]) == 2
    assert "zerokit profile" in capsys.readouterr().err
    assert bootstrap.main([]) == 2
