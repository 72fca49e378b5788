"""Partial optimizer offload (offload_optimizer.ratio < 1), with two ranks: the units a forward
uses first keep their optimizer on the device, the last ones are offloaded.

- the placement on known unit sizes, and on AwkwardLM's units;
- training (stages 1-3, CPU and NVMe, with parameter offload, the step overlapped or on the
  training thread, gradient accumulation and clipping): the same losses and parameters as plain
  PyTorch (fp32, 1e-5); with the Python CPU Adam, bit for bit those of the engine without offload;
- memory where the plan puts it; host bytes smaller than with ratio 1 by the device units' share;
- checkpoints move between ratios and to no offload;
- settings that make no sense are refused when the config is read."""
from __future__ import annotations

import os

import pytest
import torch

from tests.models import AwkwardLM
from tests.multiprocess import run_world
from tests.test_checkpoint_training import SAVED_AT, assert_resharded, make_engine, resume, save_reference, train
from tests.test_offload_engine import (
    ACCUMULATION,
    BUDGET,
    CLIPPING,
    STAGE3,
    WORLD,
    assert_identical,
    assert_matches_pytorch,
    offload_config,
    train_offloaded,
)
from tests.test_zero_parity import reference_run
from zerokit.config import Config, ConfigError
from zerokit.zero.flat_group import layout
from zerokit.zero.memory import FP32_BYTES, model_state_bytes
from zerokit.zero.policy import OffloadPolicy, ShardingPolicy, offloaded_unit_count
from zerokit.zero.units import plan_units


def cpu(ratio: float, **settings) -> dict:
    return {"device": "cpu", "ratio": ratio, **settings}


def scenarios(nvme: str) -> dict[str, dict]:
    """name: zero_optimization section. AwkwardLM's units in forward order are the root (1255
    trainable elements), blocks.0, blocks.1, blocks.2 (709 each): ratio 0.5 offloads blocks.1 and
    blocks.2, ratio 0.25 blocks.2 alone."""
    nvme_optimizer = {"device": "nvme", "nvme_path": nvme, "ratio": 0.5, "tile_size": 64, "buffer_count": 2}
    return {
        "ratio05_stage1": {"stage": 1, "offload_optimizer": cpu(0.5)},
        "ratio05_stage2": {"stage": 2, "offload_optimizer": cpu(0.5, tile_size=48, buffer_count=2)},
        "ratio05_stage2_on_training_thread": {"stage": 2, "offload_optimizer": cpu(0.5, overlap_step=False)},
        "ratio025_stage3": {**STAGE3, "offload_optimizer": cpu(0.25)},
        "ratio05_stage3_on_training_thread": {**STAGE3, "offload_optimizer": cpu(0.5, overlap_step=False)},
        "ratio05_nvme_stage2": {"stage": 2, "offload_optimizer": nvme_optimizer},
        "ratio05_params_cpu_stage3": {**STAGE3, "offload_optimizer": cpu(0.5), "offload_param": {"device": "cpu"}},
    }  # fmt: skip


FP16 = {"fp16": {"enabled": True, "initial_scale_power": 20, "loss_scale_window": 2}}  # 6 of 10 steps skipped
EXACT = {  # name: (zero_optimization section, the same without offload, precision section)
    "ratio05_stage2": ({"stage": 2, "offload_optimizer": cpu(0.5, tile_size=48)}, {"stage": 2}, {}),
    "ratio025_stage3": ({**STAGE3, "offload_optimizer": cpu(0.25)}, STAGE3, {}),
    "fp16_ratio05_stage3": ({**STAGE3, "offload_optimizer": cpu(0.5)}, STAGE3, FP16),
}


# -- placement --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, ratio, expected",
    [
        ([1255, 709, 709, 709], 1.0, 4),  # everything, as without ratio
        ([1255, 709, 709, 709], 0.5, 2),  # 1418 of 3382 is closer to 1691 than 2127
        ([1255, 709, 709, 709], 0.25, 1),
        ([1255, 709, 709, 709], 0.01, 1),  # at least one unit
        ([10, 10, 10, 10], 0.625, 3),  # a tie (20 and 30 both 5 from 25) offloads more
        ([10, 10, 10, 10], 0.6, 2),
        ([10, 20, 0], 0.1, 2),  # a unit without trainable elements does not count as the one
        ([], 0.5, 0),
    ],
)  # fmt: skip
def test_offloaded_unit_count(sizes: list[int], ratio: float, expected: int) -> None:
    assert offloaded_unit_count(sizes, ratio) == expected


def _policy(ratio: float, device: str = "cpu") -> OffloadPolicy:
    zero = Config.load({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": device, "ratio": ratio}}})
    return OffloadPolicy.from_config(zero.zero_optimization)


def test_the_units_a_forward_uses_first_keep_their_optimizer_on_the_device() -> None:
    specs = plan_units(AwkwardLM())
    assert [spec.name for spec in specs] == ["blocks.0", "blocks.1", "blocks.2", ""]
    sizes = [spec.trainable_numel for spec in specs]
    assert sizes == [709, 709, 709, 1255]
    assert _policy(0.5).optimizer_offloaded(sizes) == [False, True, True, False]
    assert _policy(0.25).optimizer_offloaded(sizes) == [False, False, True, False]
    assert _policy(0.7).optimizer_offloaded(sizes) == [True, True, True, False]
    assert _policy(0.9).optimizer_offloaded(sizes) == [True] * 4  # 3382 is closer to 3044 than 2127
    assert _policy(1.0).optimizer_offloaded(sizes) == [True] * 4
    assert OffloadPolicy().optimizer_offloaded(sizes) == [False] * 4


# -- training ---------------------------------------------------------------------------------------


def _runs(rank: int, nvme: str) -> dict:
    return {name: train_offloaded(rank, zero) for name, zero in scenarios(nvme).items()}


def _exact_runs(rank: int) -> dict:
    os.environ["ZEROKIT_PYTHON_OPS"] = "1"  # a fresh process: read when the ops are first loaded
    return {
        name: (train_offloaded(rank, zero, precision), train_offloaded(rank, baseline, precision))
        for name, (zero, baseline, precision) in EXACT.items()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    nvme = str(tmp_path_factory.mktemp("nvme"))
    return {"nvme": nvme, "ranks": run_world(_runs, WORLD, nvme)}


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict]:
    return reference_run(ACCUMULATION, CLIPPING)


@pytest.mark.parametrize("name", list(scenarios("")))
def test_partial_offload_matches_pytorch(world: dict, reference, name: str) -> None:
    assert_matches_pytorch(world["ranks"], name, reference)


def test_partial_offload_path_is_exact() -> None:
    """The Python CPU Adam follows torch's operation order: the offloaded and the device units
    together give the very values of the engine without offload (one clipping norm and, in fp16,
    one overflow check over both)."""
    for rank_results in run_world(_exact_runs, WORLD):
        for name, (result, baseline) in rank_results.items():
            assert_identical(result, baseline, name)
        assert rank_results["fp16_ratio05_stage3"][0]["skipped"] > 0  # the overflow path ran


# -- memory -----------------------------------------------------------------------------------------


def _plan(zero: dict, rank: int):
    config = Config.load(offload_config(zero)).zero_optimization
    return model_state_bytes(plan_units(AwkwardLM()), ShardingPolicy.from_config(config), torch.float32, WORLD, rank,
                             torch.float32, OffloadPolicy.from_config(config), ACCUMULATION, pin=False)  # fmt: skip


@pytest.mark.parametrize("name", list(scenarios("")))
def test_memory_is_where_the_plan_puts_it(world: dict, name: str) -> None:
    for rank, result in enumerate(rank_results[name] for rank_results in world["ranks"]):
        plan, held = _plan(scenarios(world["nvme"])[name], rank), result["breakdown"]
        assert plan.optimizer_states > 0  # both placements in use
        assert plan.offload.host["gradients"] > 0
        for category, expected in plan.offload.host.items():
            if category == "staging":  # pools fill up to their budget only as needed
                assert 0 < held["host_staging"] <= expected
            else:
                assert held[f"host_{category}"] == expected, category
        for category, expected in plan.offload.nvme.items():
            assert held[f"nvme_{category}"] == expected, category
        assert (held["master_weights"], held["optimizer_states"]) == (plan.master_weights, plan.optimizer_states)
        assert held["parameters"] == plan.parameters
        assert result["host_peak"] <= min(BUDGET, plan.offload.host_total)


def test_the_device_units_share_moves_from_host_to_device() -> None:
    full, partial, plain = (_plan(zero, 0) for zero in (
        {"stage": 2, "offload_optimizer": cpu(1.0)}, {"stage": 2, "offload_optimizer": cpu(0.5)}, {"stage": 2}))
    on_device = {"", "blocks.0"}  # see scenarios
    numel = sum(
        layout([(name, p) for name, p in spec.params if p.requires_grad], WORLD)[1]
        for spec in plan_units(AwkwardLM()) if spec.name in on_device
    )  # fmt: skip
    moved = {"master_weights": numel * FP32_BYTES, "gradients": numel * FP32_BYTES,
             "optimizer_states": 2 * numel * FP32_BYTES}  # fmt: skip
    for category, nbytes in moved.items():
        assert full.offload.host[category] - partial.offload.host[category] == nbytes, category
    # on the device: gradient shards and moments (fp32 masters alias the gathered fp32 parameters)
    assert (full.gradients, full.optimizer_states) == (0, 0)
    assert partial.gradients == numel * FP32_BYTES
    assert 0 < partial.optimizer_states < plain.optimizer_states
    assert partial.parameters == full.parameters == plain.parameters


# -- checkpoints ------------------------------------------------------------------------------------


SCHEDULED = {
    "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
    "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 20, "warmup_num_steps": 4,
                                                       "warmup_max_lr": 0.01}},
}  # fmt: skip


def offloaded(ratio: float) -> dict:
    return {**SCHEDULED, "zero_optimization": {"stage": 2, "offload_optimizer": cpu(ratio, tile_size=64)}}


PLAIN = {**SCHEDULED, "zero_optimization": {"stage": 2}}


def _checkpoints(rank: int, root: str) -> dict:
    directory = os.path.join(root, "ratio05")
    engine = make_engine(offloaded(0.5))
    train(engine, 0, SAVED_AT)
    results = {"optimizer_state_on_device": len(engine.optimizer.state)}
    results["saved"] = save_reference(engine, directory)
    placements = {"round_trip": offloaded(0.5), "to_ratio1": offloaded(1.0), "to_ratio025": offloaded(0.25),
                  "to_plain": PLAIN}  # fmt: skip
    for name, config in placements.items():
        results[name] = resume(config, directory)
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[dict]:
    return run_world(_checkpoints, WORLD, str(tmp_path_factory.mktemp("ratio_checkpoints")))


def test_device_pieces_keep_their_states_in_the_optimizer(checkpoints: list[dict]) -> None:
    assert all(result["optimizer_state_on_device"] > 0 for result in checkpoints)


def test_round_trip_resumes_bit_identically(checkpoints: list[dict]) -> None:
    for result in checkpoints:
        assert result["round_trip"]["continued"] == result["saved"]["continued"]


@pytest.mark.parametrize("name", ["to_ratio1", "to_ratio025", "to_plain"])
def test_checkpoint_loads_with_another_placement(checkpoints: list[dict], name: str) -> None:
    assert_resharded([result[name] for result in checkpoints], [result["saved"] for result in checkpoints])


# -- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offload, message",
    [
        ({"offload_optimizer": {"device": "cpu", "ratio": 0}}, r"ratio=0\.0 is invalid: expected a fraction in \(0, 1\]"),
        ({"offload_optimizer": {"device": "cpu", "ratio": 1.5}}, r"expected a fraction in \(0, 1\]"),
        ({"offload_optimizer": {"ratio": 0.5}}, "ratio applies to optimizer offload: set offload_optimizer.device cpu "
                                                "or nvme, or remove ratio"),
        ({"offload_optimizer": {"device": "cpu", "ratio": 0.5, "delayed_parameter_update_after": 3}},
         "set ratio 1.0 or remove delayed_parameter_update_after"),
    ],
)  # fmt: skip
def test_contradictory_settings_are_refused(offload: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load({"zero_optimization": {"stage": 2, **offload}})
