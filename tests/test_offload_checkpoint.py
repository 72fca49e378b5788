"""Checkpoints of offloaded engines: a round trip resumes bit-identically (optimizer states in
host memory, or masters, moments and parameter shards on NVMe), and checkpoints move between
offloaded and non-offloaded engines and across world sizes with parameters and optimizer states
exactly equal, read and written range by range."""
from __future__ import annotations

import os

import pytest
import torch

from tests.multiprocess import run_world
from tests.test_checkpoint_training import (
    MORE, SAVED_AT, STAGE1, assert_resharded, make_engine, resume, save_reference, train,
)  # fmt: skip
from zerokit.checkpoint import load_checkpoint, save_checkpoint
CPU = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "tile_size": 64}}}


def nvme(root: str) -> dict:
    path = os.path.join(root, "nvme")
    os.makedirs(path, exist_ok=True)
    return {"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0,
        "offload_optimizer": {"device": "nvme", "nvme_path": path, "tile_size": 64},
        "offload_param": {"device": "nvme", "nvme_path": path, "max_in_cpu": 0},
    }}  # fmt: skip


def _round_trip(config: dict, directory: str, async_save: bool) -> dict:
    engine = make_engine(config)
    train(engine, 0, SAVED_AT)
    handle = save_checkpoint(engine, directory, async_save=async_save)
    continued = train(engine, SAVED_AT, MORE)  # while an async save is being written
    handle.wait()
    restored = make_engine(config)
    load_checkpoint(restored, directory)
    return {"continued": continued, "resumed": train(restored, SAVED_AT, MORE)}


def _two_ranks(rank: int, root: str) -> dict:
    results = {
        "round_trip_cpu": _round_trip(CPU, os.path.join(root, "cpu"), async_save=True),
        "round_trip_nvme": _round_trip(nvme(root), os.path.join(root, "nvme_round_trip"), async_save=False),
    }
    engine = make_engine(nvme(root))
    train(engine, 0, SAVED_AT)
    results["offloaded_reference"] = save_reference(engine, os.path.join(root, "offloaded"))
    results["offloaded_to_plain"] = resume(STAGE1, os.path.join(root, "offloaded"))
    results["offloaded_to_cpu"] = resume(CPU, os.path.join(root, "offloaded"))
    engine = make_engine(STAGE1)
    train(engine, 0, SAVED_AT)
    results["plain_reference"] = save_reference(engine, os.path.join(root, "plain"))
    results["plain_to_nvme"] = resume(nvme(root), os.path.join(root, "plain"))
    return results


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("offload_checkpoints"))
    two = run_world(_two_ranks, 2, root)
    one_from_two = resume(nvme(root), os.path.join(root, "offloaded"))
    return {"two": two, "one_from_two": one_from_two}


@pytest.mark.parametrize("name", ["round_trip_cpu", "round_trip_nvme"])
def test_round_trip_resumes_bit_identically(worlds: dict, name: str) -> None:
    for result in (r[name] for r in worlds["two"]):
        assert result["resumed"] == result["continued"]


def test_offloaded_checkpoint_loads_without_offload(worlds: dict) -> None:
    saved = [r["offloaded_reference"] for r in worlds["two"]]
    assert_resharded([r["offloaded_to_plain"] for r in worlds["two"]], saved)
    assert_resharded([r["offloaded_to_cpu"] for r in worlds["two"]], saved)


def test_plain_checkpoint_loads_into_offload(worlds: dict) -> None:
    saved = [r["plain_reference"] for r in worlds["two"]]
    assert_resharded([r["plain_to_nvme"] for r in worlds["two"]], saved)


def test_two_offloaded_ranks_to_one(worlds: dict) -> None:
    saved = [r["offloaded_reference"] for r in worlds["two"]]
    assert_resharded([worlds["one_from_two"]], saved)


def _trainable_shard_values(rank: int) -> list[tuple[str, bool]]:
    """Under parameter offload alone (the optimizer on the device), in bf16, after two steps: each
    trainable parameter's checkpoint values, their dtype and whether they are its fp32 master."""
    engine = make_engine({"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "offload_param": {"device": "cpu"}}})  # fmt: skip
    train(engine, 0, 2)
    seen = []
    for group in engine._groups:
        for index in range(len(group.slots)):
            values = group.shard_values(index)
            if values is not None:
                lo, hi = group._locate(index)
                seen.append((str(values.dtype), torch.equal(values, group.master[lo:hi])))
    return seen


def test_checkpoints_take_trainable_values_from_the_fp32_masters_under_parameter_offload() -> None:
    """The host shard holds the bf16 copies; a checkpoint of a trainable parameter is its master."""
    (seen,) = run_world(_trainable_shard_values, 1)
    assert seen and all(entry == ("torch.float32", True) for entry in seen)
