"""Damaged, missing and mismatched checkpoints give clear errors before anything is changed;
a failed save never harms the checkpoints already there; fallback finds the newest good one."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

import zerokit
from tests.models import AwkwardLM, batches, lm_loss
from zerokit.checkpoint import (
    CheckpointError, complete_tags, latest_tag, load_checkpoint, save_checkpoint, wait_for_checkpoint,
)
from zerokit.checkpoint import writer as writer_module


def make_engine(model: torch.nn.Module | None = None, optimizer: str = "adamw", stage: int = 2,
                accumulation: int = 1) -> zerokit.Engine:
    torch.manual_seed(0)
    model = model or AwkwardLM()
    if optimizer == "adamw":
        built = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        built = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    return zerokit.initialize(model, built, {"gradient_accumulation_steps": accumulation,
                                             "zero_optimization": {"stage": stage}})


def train(engine: zerokit.Engine, steps: int) -> None:
    for tokens, targets in batches(steps * engine.config.accumulation_steps, 4):
        loss = lm_loss(engine(tokens), targets)
        engine.backward(loss)
        engine.step()


@pytest.fixture
def saved(tmp_path) -> tuple[zerokit.Engine, str]:
    """Checkpoints after steps 1 and 2 (latest: global_step2)."""
    engine = make_engine()
    train(engine, 1)
    save_checkpoint(engine, tmp_path)
    train(engine, 1)
    save_checkpoint(engine, tmp_path)
    return engine, str(tmp_path)


def test_layout_of_a_checkpoint(saved) -> None:
    _, directory = saved
    assert latest_tag(directory) == "global_step2"
    assert complete_tags(directory) == ["global_step1", "global_step2"]
    assert sorted(os.listdir(os.path.join(directory, "global_step2"))) == ["manifest.json", "metadata.json", "rank_00000.pt"]


def test_missing_directory_latest_and_tag(saved, tmp_path) -> None:
    _, directory = saved
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(make_engine(), tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no 'latest' file. It holds no complete checkpoint"):
        load_checkpoint(make_engine(), empty)
    missing = "global_step9 does not exist; complete tags there: global_step1, global_step2"
    with pytest.raises(CheckpointError, match=missing):
        load_checkpoint(make_engine(), directory, tag="global_step9")


def test_incomplete_checkpoint(saved) -> None:
    _, directory = saved
    os.remove(os.path.join(directory, "global_step2", "manifest.json"))
    with pytest.raises(CheckpointError, match="incomplete: it has no manifest.json"):
        load_checkpoint(make_engine(), directory)


def test_corrupt_and_truncated_files_are_named(saved) -> None:
    _, directory = saved
    path = os.path.join(directory, "global_step2", "rank_00000.pt")
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    engine = make_engine()
    before = engine.full_state_dict()
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt is corrupt: its sha256"):
        load_checkpoint(engine, directory)
    after = engine.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed
    os.truncate(path, 100)
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt has 100 bytes but was saved with \d+ \(truncated"):
        load_checkpoint(engine, directory)
    metadata = os.path.join(directory, "global_step2", "metadata.json")
    with open(metadata, "a") as handle:
        handle.write(" ")
    with pytest.raises(CheckpointError, match=r"metadata\.json has \d+ bytes"):
        load_checkpoint(engine, directory)


def test_fallback_to_previous_loads_the_newest_good_one(saved, caplog) -> None:
    _, directory = saved
    os.truncate(os.path.join(directory, "global_step2", "rank_00000.pt"), 10)
    engine = make_engine()
    with caplog.at_level(logging.WARNING, logger="zerokit"):
        load_checkpoint(engine, directory, fallback_to_previous=True)
    assert engine.global_step == 1
    assert "checkpoint global_step2 cannot be loaded" in caplog.text
    assert "loaded checkpoint global_step1 instead of global_step2" in caplog.text
    os.truncate(os.path.join(directory, "global_step1", "rank_00000.pt"), 10)
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be loaded: global_step2: .*global_step1: "):
        load_checkpoint(engine, directory, fallback_to_previous=True)


def test_fallback_never_goes_to_a_newer_tag(saved) -> None:
    _, directory = saved
    os.truncate(os.path.join(directory, "global_step1", "rank_00000.pt"), 10)
    with pytest.raises(CheckpointError, match=r"can be loaded: global_step1: [^|]*$"):
        load_checkpoint(make_engine(), directory, tag="global_step1", fallback_to_previous=True)


def test_model_mismatch_names_the_parameters(saved) -> None:
    _, directory = saved
    shapes = r"with different shapes: embed\.weight: checkpoint \(50, 24\), model \(50, 16\)"
    with pytest.raises(CheckpointError, match=shapes):
        load_checkpoint(make_engine(AwkwardLM(dim=16)), directory)
    with pytest.raises(CheckpointError, match=r"not in the model: blocks\.2\.norm\.weight"):
        load_checkpoint(make_engine(AwkwardLM(layers=2)), directory)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: blocks\.3\.norm\.weight"):
        load_checkpoint(make_engine(AwkwardLM(layers=4)), directory)


def test_other_optimizer_needs_weights_only_load(saved) -> None:
    original, directory = saved
    engine = make_engine(optimizer="sgd")
    other = "holds AdamW states but the engine's optimizer is SGD; pass load_optimizer_states=False"
    with pytest.raises(CheckpointError, match=other):
        load_checkpoint(engine, directory)
    load_checkpoint(engine, directory, load_optimizer_states=False)
    expected, loaded = original.full_state_dict(), engine.full_state_dict()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)
    assert engine.global_step == 2 and not engine.optimizer.state


def test_failed_save_leaves_existing_checkpoints(saved, monkeypatch) -> None:
    engine, directory = saved
    save_checkpoint(engine, directory, tag="last")
    kept = engine.full_state_dict()
    train(engine, 1)

    def full_disk(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module, "write_atomically", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(engine, directory, tag="last")  # would replace "last"
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(engine, directory)
    monkeypatch.undo()

    def crash_before_publishing(save_dir, staging, tag):
        raise OSError("power cut")

    monkeypatch.setattr(writer_module, "publish", crash_before_publishing)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(engine, directory, tag="last")
    monkeypatch.undo()

    assert latest_tag(directory) == "last"
    assert complete_tags(directory) == ["global_step1", "global_step2", "last"]
    restored = make_engine()
    load_checkpoint(restored, directory)
    loaded = restored.full_state_dict()
    assert all(torch.equal(kept[k], loaded[k]) for k in kept)
    # a later successful save of the same tag replaces it and cleans up the failed attempts
    save_checkpoint(engine, directory, tag="last")
    assert load_checkpoint(restored, directory) is None and restored.global_step == 3
    assert sorted(os.listdir(directory)) == ["global_step1", "global_step2", "last", "latest"]


def test_async_save_errors_are_raised(saved, monkeypatch) -> None:
    engine, directory = saved
    monkeypatch.setattr(writer_module, "write_atomically", lambda path, write: (_ for _ in ()).throw(OSError("disk gone")))
    handle = save_checkpoint(engine, directory, tag="async", async_save=True)
    with pytest.raises(OSError, match="disk gone"):
        handle.wait()
    save_checkpoint(engine, directory, tag="async_again", async_save=True)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(engine, directory)  # the next save reports the failure of the one in flight
    monkeypatch.undo()
    wait_for_checkpoint(engine)  # reported once only
    assert latest_tag(directory) == "global_step2"


def test_async_save_failing_at_exit_fails_the_process(tmp_path) -> None:
    script = f"""
import torch, zerokit
from tests.models import AwkwardLM
from zerokit.checkpoint import save_checkpoint, writer

def full_disk(path, write):
    raise OSError("disk gone")

writer.write_atomically = full_disk
model = AwkwardLM()
engine = zerokit.initialize(model, torch.optim.AdamW(model.parameters()))
save_checkpoint(engine, {str(tmp_path)!r}, async_save=True)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 1 and "OSError: disk gone" in done.stderr, done.stderr
    assert "the checkpoint being saved at exit failed" in done.stderr


def test_save_rejects_bad_calls(tmp_path) -> None:
    engine = make_engine(accumulation=2)
    tokens, targets = batches(1, 4)[0]
    engine.backward(lm_loss(engine(tokens), targets))
    engine.step()
    with pytest.raises(CheckpointError, match="in the middle of gradient accumulation"):
        save_checkpoint(engine, tmp_path)
    engine = make_engine()
    with pytest.raises(CheckpointError, match="checkpoint tag '../x' is invalid"):
        save_checkpoint(engine, tmp_path, tag="../x")

    class Position:
        pass

    with pytest.raises(CheckpointError, match="client_state cannot be saved for a safe load .*Position"):
        save_checkpoint(engine, tmp_path, client_state={"position": Position()})
    assert not os.path.exists(tmp_path / "latest")
