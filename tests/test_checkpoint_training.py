"""Training resumes exactly from a checkpoint: in the same world (bit-identical next losses,
stages 0-3, fp32, bf16 and fp16, async saves, scheduler and accumulation) and resharded across
world sizes and stages (ranks 1->2, 2->1, 2->4; stages 1->2, 1->3, 3->1, 3->0, 3->2):
parameters and optimizer states equal the saved ones exactly and the next losses match an
uninterrupted run to 1e-5.

The multi-process scenarios run in three launches: the world-1 checkpoint is made here first,
then two ranks make theirs and load the world-1 one, then one and four ranks load the two-rank one.
"""
from __future__ import annotations

import os
import random
import shutil

import pytest
import torch

import zerokit
from tests.models import AwkwardLM, batches, lm_loss
from tests.multiprocess import run_world
from zerokit.checkpoint import CheckpointError, latest_tag, load_checkpoint, save_checkpoint, wait_for_checkpoint
from zerokit.checkpoint.export import export_checkpoint
from zerokit.checkpoint.full_state import gather_optimizer_state, load_full_state_dict

BATCH = 8  # global, per micro-step
SAVED_AT, MORE = 3, 5  # optimizer steps before the save, and after it

ROUND_TRIPS = {
    # name: (config, async save)
    "stage0": ({"zero_optimization": {"stage": 0}}, False),
    "stage1": ({"zero_optimization": {"stage": 1}}, True),
    "stage2": ({"zero_optimization": {"stage": 2}}, False),
    "stage3": ({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}, True),
    "stage3_persistent": ({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 500}}, False),
    "stage2_accum_sched": ({
        "zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 20, "warmup_num_steps": 4,
                                                           "warmup_max_lr": 0.01}},
    }, True),
    "stage3_bf16": ({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                     "bf16": {"enabled": True}}, False),
    "stage1_fp16": ({"zero_optimization": {"stage": 1}, "fp16": {"enabled": True, "initial_scale_power": 4,
                                                                 "loss_scale_window": 2}}, False),
}


def make_engine(config: dict) -> zerokit.Engine:
    torch.manual_seed(0)
    model = AwkwardLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return zerokit.initialize(model, optimizer, {"train_micro_batch_size_per_gpu": 1, **config})


def train(engine: zerokit.Engine, first: int, steps: int) -> list[float]:
    """Optimizer steps first..first+steps-1 of one fixed data stream; each rank takes its share
    of every global micro-batch. Returns this rank's micro-batch losses."""
    accumulation = engine.config.accumulation_steps
    data = batches((first + steps) * accumulation, BATCH, seed=5)[first * accumulation:]
    share = slice(engine.rank * BATCH // engine.world_size, (engine.rank + 1) * BATCH // engine.world_size)
    losses = []
    for tokens, targets in data:
        loss = lm_loss(engine(tokens[share].to(engine.device)), targets[share].to(engine.device))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def state_of(engine: zerokit.Engine) -> dict:
    return {"weights": engine.full_state_dict(), "optimizer": gather_optimizer_state(engine),
            "lr": [g["lr"] for g in engine.optimizer.param_groups], "step": engine.global_step}


def save_reference(engine: zerokit.Engine, directory: str, tag: str | None = None) -> dict:
    """Save a checkpoint, then record what it holds and how training goes on without it."""
    save_checkpoint(engine, directory, tag=tag, client_state={"rank": engine.rank, "next_step": SAVED_AT})
    return {**state_of(engine), "continued": train(engine, SAVED_AT, MORE)}


def resume(config: dict, directory: str) -> dict:
    engine = make_engine(config)
    client_state = load_checkpoint(engine, directory)
    return {**state_of(engine), "client_state": client_state, "continued": train(engine, SAVED_AT, MORE)}


STAGE2 = {"zero_optimization": {"stage": 2}}
STAGE3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
STAGE1 = {"zero_optimization": {"stage": 1}}
STAGE0 = {"zero_optimization": {"stage": 0}}


def _two_ranks(rank: int, root: str) -> dict:
    results = {"round_trips": {}}
    for name, (config, async_save) in ROUND_TRIPS.items():
        directory = os.path.join(root, f"round_trip_{name}")
        engine = make_engine(config)
        train(engine, 0, SAVED_AT)
        handle = save_checkpoint(engine, directory, client_state={"rank": rank}, async_save=async_save)
        draws = (torch.rand(3), random.random())
        continued = train(engine, SAVED_AT, MORE)  # runs while an async save is being written
        handle.wait()
        restored = make_engine(config)
        client_state = load_checkpoint(restored, directory)
        redraws = (torch.rand(3), random.random())
        results["round_trips"][name] = {
            "continued": continued, "resumed": train(restored, SAVED_AT, MORE), "client_state": client_state,
            "draws": (draws, redraws), "steps": (engine.global_step, restored.global_step),
            "scale": (engine.loss_scale, restored.loss_scale), "skipped": (engine.skipped_steps, restored.skipped_steps),
        }
    # 1 -> 2 ranks, stage 1 -> 2 and 1 -> 3
    results["from_one_stage2"] = resume(STAGE2, os.path.join(root, "one"))
    results["from_one_stage3"] = resume(STAGE3, os.path.join(root, "one"))
    # the two-rank checkpoint for the other worlds, and stage changes within two ranks
    engine = make_engine(STAGE3)
    train(engine, 0, SAVED_AT)
    results["two_reference"] = save_reference(engine, os.path.join(root, "two"))
    results["from_two_stage1"] = resume(STAGE1, os.path.join(root, "two"))
    results["from_two_stage0"] = resume(STAGE0, os.path.join(root, "two"))
    # consolidated weights, each rank reading only its ranges
    imported = make_engine(STAGE3)
    load_full_state_dict(imported, os.path.join(root, "one_exported"))
    results["imported"] = imported.full_state_dict()
    wait_for_checkpoint(engine)
    return results


def _four_ranks(rank: int, root: str) -> dict:
    return {"from_two_stage2": resume(STAGE2, os.path.join(root, "two"))}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("checkpoints"))
    engine = make_engine(STAGE1)
    train(engine, 0, SAVED_AT)
    one = save_reference(engine, os.path.join(root, "one"))
    export_checkpoint(os.path.join(root, "one"), os.path.join(root, "one_exported"), max_shard_size="4KB")
    two = run_world(_two_ranks, 2, root)
    one_from_two = resume(STAGE1, os.path.join(root, "two"))
    four = run_world(_four_ranks, 4, root)
    return {"root": root, "one": one, "two": two, "one_from_two": one_from_two, "four": four}


def _mean(per_rank: list[list[float]]) -> list[float]:
    return [sum(values) / len(values) for values in zip(*per_rank)]


def assert_same_state(loaded: dict, saved: dict) -> None:
    assert loaded["weights"].keys() == saved["weights"].keys()
    for key, value in saved["weights"].items():
        assert torch.equal(loaded["weights"][key], value), key
    assert loaded["optimizer"].keys() == saved["optimizer"].keys() and saved["optimizer"]
    for name, state in saved["optimizer"].items():
        assert loaded["optimizer"][name].keys() == state.keys(), name
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(loaded["optimizer"][name][key]), torch.as_tensor(value)), (name, key)
    assert loaded["lr"] == saved["lr"] and loaded["step"] == saved["step"] == SAVED_AT


def assert_resharded(loaded_per_rank: list[dict], saved_per_rank: list[dict]) -> None:
    for loaded in loaded_per_rank:
        assert_same_state(loaded, saved_per_rank[0])
    expected = _mean([r["continued"] for r in saved_per_rank])
    assert _mean([r["continued"] for r in loaded_per_rank]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_round_trip_resumes_bit_identically(worlds: dict, name: str) -> None:
    for rank, result in enumerate(r["round_trips"][name] for r in worlds["two"]):
        assert result["resumed"] == result["continued"], f"rank {rank}"
        assert result["client_state"] == {"rank": rank}
        (tensor, number), (tensor_again, number_again) = result["draws"]
        assert torch.equal(tensor, tensor_again) and number == number_again  # RNG states restored
        assert result["steps"][0] == result["steps"][1] == SAVED_AT + MORE
        assert result["scale"][0] == result["scale"][1] and result["skipped"][0] == result["skipped"][1]
    if name == "stage1_fp16":
        assert worlds["two"][0]["round_trips"][name]["scale"][0] > 2**4  # the scaler's state mattered


def test_one_rank_to_two(worlds: dict) -> None:
    for stage in ("stage2", "stage3"):
        assert_resharded([r[f"from_one_{stage}"] for r in worlds["two"]], [worlds["one"]])


def test_two_ranks_to_one(worlds: dict) -> None:
    saved = [r["two_reference"] for r in worlds["two"]]
    assert_resharded([worlds["one_from_two"]], saved)
    assert worlds["one_from_two"]["client_state"] == {"rank": 0, "next_step": SAVED_AT}


def test_two_ranks_to_four(worlds: dict) -> None:
    saved = [r["two_reference"] for r in worlds["two"]]
    loaded = [r["from_two_stage2"] for r in worlds["four"]]
    assert_resharded(loaded, saved)
    # ranks the saving job did not have get rank 0's client state
    assert [r["client_state"]["rank"] for r in loaded] == [0, 1, 0, 0]


def test_stage_changes_within_two_ranks(worlds: dict) -> None:
    saved = [r["two_reference"] for r in worlds["two"]]
    for stage in ("stage1", "stage0"):
        assert_resharded([r[f"from_two_{stage}"] for r in worlds["two"]], saved)


def test_consolidated_weights_load_into_shards(worlds: dict) -> None:
    for result in worlds["two"]:
        for key, value in worlds["one"]["weights"].items():
            assert torch.equal(result["imported"][key], value), key


def test_missing_rank_file_is_named(worlds: dict, tmp_path) -> None:
    broken = tmp_path / "two"
    shutil.copytree(os.path.join(worlds["root"], "two"), broken)
    tag = latest_tag(str(broken))
    os.remove(broken / tag / "rank_00001.pt")
    with pytest.raises(CheckpointError, match=r"rank_00001\.pt is missing"):
        load_checkpoint(make_engine(STAGE1), broken)
