"""Optimizer and parameter offload inside the sharding engine, with two ranks, for every
placement (CPU or NVMe; stages 1-3; gradient accumulation and clipping):

- with the native CPU Adam (what training uses): the same losses and final parameters as plain
  PyTorch (fp32, 1e-5), and the same losses as the engine without offload (1e-5);
- with the Python CPU Adam, which follows torch's operation order: bit for bit the losses and
  parameters of the engine without offload, so every copy, accumulation, tile and upload of the
  offload path is exact (the native kernel differs from torch.optim by fp32 rounding, which ten
  steps at lr 1e-2 of this small model amplify to about 1e-5 between the two engines);
- swap files that really hold the states during training and go away with the engine, and
  host memory where the plan puts it, within the budget."""
from __future__ import annotations

import gc
import hashlib
import os

import pytest
import torch

import zerokit
from tests.models import AwkwardLM, batches, lm_loss
from tests.multiprocess import run_world
from tests.test_zero_parity import BATCH, LR, STEPS, reference_run
from zerokit.config import Config
from zerokit.zero.memory import model_state_bytes
from zerokit.zero.policy import OffloadPolicy, ShardingPolicy
from zerokit.zero.units import plan_units

WORLD = 2
ACCUMULATION, CLIPPING = 2, 0.5
BUDGET = 1 << 20  # bytes of host memory per rank: ample for this model, checked before training
STAGE3 = {"stage": 3, "stage3_param_persistence_threshold": 0}


def scenarios(nvme: str) -> dict[str, dict]:
    """name: zero_optimization section. Small tiles and two upload buffers exercise tiles that
    split parameters, several tiles per group and buffers reused while uploads are in flight."""
    cpu = {"device": "cpu"}
    nvme_optimizer = {"device": "nvme", "nvme_path": nvme, "tile_size": 64, "buffer_count": 2}
    return {
        "optimizer_cpu_stage1": {"stage": 1, "offload_optimizer": cpu},
        "optimizer_cpu_stage2": {"stage": 2, "offload_optimizer": {**cpu, "tile_size": 48, "buffer_count": 2}},
        "optimizer_cpu_stage3": {**STAGE3, "offload_optimizer": cpu},
        "optimizer_cpu_stage3_persistent": {"stage": 3, "stage3_param_persistence_threshold": 500,
                                            "offload_optimizer": cpu},
        "optimizer_nvme_stage1": {"stage": 1, "offload_optimizer": nvme_optimizer},
        "optimizer_nvme_stage2": {"stage": 2, "offload_optimizer": nvme_optimizer},
        "optimizer_nvme_stage3": {**STAGE3, "offload_optimizer": nvme_optimizer},
        "params_cpu_stage3": {**STAGE3, "offload_optimizer": cpu, "offload_param": cpu},
        "params_nvme_stage3": {**STAGE3, "offload_optimizer": nvme_optimizer,
                               "offload_param": {"device": "nvme", "nvme_path": nvme, "max_in_cpu": 0,
                                                 "buffer_count": 2}},
        # parameters only (the optimizer on the device), some shards in host memory, some on NVMe
        "params_only_nvme_stage3": {**STAGE3, "offload_param": {"device": "nvme", "nvme_path": nvme,
                                                                "max_in_cpu": 400}},
    }  # fmt: skip


BASELINES = {"stage1": {"stage": 1}, "stage2": {"stage": 2}, "stage3": STAGE3,
             "stage3_persistent": {"stage": 3, "stage3_param_persistence_threshold": 500}}  # fmt: skip


# name: (zero_optimization section, precision section); each against its stage without offload
MIXED_PRECISION = {
    "bf16_optimizer_cpu_stage2": ({"stage": 2, "offload_optimizer": {"device": "cpu", "tile_size": 48}},
                                  {"bf16": {"enabled": True}}),
    # a loss scale that overflows at first: skipped steps, then scaled gradients in host memory
    "fp16_params_cpu_stage3": ({**STAGE3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
                               {"fp16": {"enabled": True, "initial_scale_power": 30, "loss_scale_window": 2}}),
}  # fmt: skip


def offload_config(zero: dict, world: int = WORLD) -> dict:
    """The training config around a zero_optimization section: a host memory budget wherever
    something is offloaded."""
    return {
        "train_micro_batch_size_per_gpu": BATCH // world,
        "gradient_accumulation_steps": ACCUMULATION,
        "gradient_clipping": CLIPPING,
        "zero_optimization": {**zero, "host_memory_budget": BUDGET} if "offload_optimizer" in zero
        or "offload_param" in zero else zero,
    }


def _swap_files(engine: zerokit.Engine) -> dict[str, tuple[int, str]]:
    """Each swap file: (size, digest)."""
    files = {}
    for directory in engine.swap_directories():
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                files[path] = (os.path.getsize(path), hashlib.sha256(handle.read()).hexdigest())
    return files


def train_offloaded(rank: int, zero: dict, precision: dict | None = None) -> dict:
    """STEPS optimizer steps of AwkwardLM on this rank's share of each batch, inside run_world."""
    torch.manual_seed(0)
    model = AwkwardLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    world = int(os.environ["WORLD_SIZE"])  # run_world's: fewer ranks than WORLD where GPUs are few
    engine = zerokit.initialize(model, optimizer, {**offload_config(zero, world), **(precision or {})})
    breakdown_at_start = engine.memory_breakdown()
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    losses, host_peak, swap_history = [], 0, []
    for index, (tokens, targets) in enumerate(batches(STEPS * ACCUMULATION, BATCH)):
        loss = lm_loss(engine(tokens[share].to(engine.device)), targets[share].to(engine.device))
        engine.backward(loss)
        host_peak = max(host_peak, _host_bytes(engine))
        engine.step()
        host_peak = max(host_peak, _host_bytes(engine))
        losses.append(loss.item())
        if (index + 1) % ACCUMULATION == 0:
            swap_history.append(_swap_files(engine))
    result = {
        "losses": losses,
        "state": engine.full_state_dict(),
        "steps": engine.global_step,
        "breakdown": engine.memory_breakdown(),
        "breakdown_at_start": breakdown_at_start,
        "host_peak": host_peak,
        "swap_history": swap_history,
        "swap_directories": engine.swap_directories(),
        "skipped": engine.skipped_steps,
    }
    engine.close()
    result["left_after_close"] = [d for d in result["swap_directories"] if os.path.exists(d)]
    del engine
    gc.collect()
    return result


def _host_bytes(engine: zerokit.Engine) -> int:
    return sum(v for k, v in engine.memory_breakdown().items() if k.startswith("host_"))


def _runs(rank: int, nvme: str) -> dict:
    keep = os.path.join(nvme, "user_file.txt")  # not ours: must survive
    if rank == 0:
        with open(keep, "w") as handle:
            handle.write("mine")
    results = {name: train_offloaded(rank, zero) for name, zero in {**BASELINES, **scenarios(nvme)}.items()}
    results["user_file_kept"] = os.path.exists(keep)
    results["nvme_left"] = sorted(n for n in os.listdir(nvme) if n != "user_file.txt")
    return results


def _runs_with_python_ops(rank: int, nvme: str) -> dict:
    os.environ["ZEROKIT_PYTHON_OPS"] = "1"  # a fresh process: read when the ops are first loaded
    results = _runs(rank, nvme)
    for name, (zero, precision) in MIXED_PRECISION.items():
        baseline = {key: value for key, value in zero.items() if not key.startswith("offload")}
        results[name] = (train_offloaded(rank, zero, precision), train_offloaded(rank, baseline, precision))
    return results


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    nvme = str(tmp_path_factory.mktemp("nvme"))
    return {"nvme": nvme, "ranks": run_world(_runs, WORLD, nvme)}


@pytest.fixture(scope="module")
def exact_world(tmp_path_factory) -> list[dict]:
    return run_world(_runs_with_python_ops, WORLD, str(tmp_path_factory.mktemp("nvme_exact")))


def _baseline(name: str) -> str:
    stage = name.split("_stage")[1]
    return "stage" + stage


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict]:
    return reference_run(ACCUMULATION, CLIPPING)


def assert_matches_pytorch(ranks: list[dict], name: str, reference: tuple[list[float], dict]) -> None:
    """Run `name` of every rank ended with plain PyTorch's parameters, and the ranks' mean losses
    are its losses (fp32, 1e-5)."""
    ref_losses, ref_state = reference
    for result in (rank_results[name] for rank_results in ranks):
        assert result["steps"] == STEPS
        for key, expected in ref_state.items():
            torch.testing.assert_close(result["state"][key], expected, rtol=0, atol=1e-5, msg=f"{name}: {key}")
    mean = [sum(v) / len(ranks) for v in zip(*(r[name]["losses"] for r in ranks))]
    assert mean == pytest.approx(ref_losses, abs=1e-5)


def assert_identical(result: dict, baseline: dict, name: str) -> None:
    """Two runs with the same losses, skipped steps and parameters, bit for bit."""
    assert result["losses"] == baseline["losses"] and result["skipped"] == baseline["skipped"], name
    for key, expected in baseline["state"].items():
        assert torch.equal(result["state"][key], expected), f"{name}: {key}"


@pytest.mark.parametrize("name", list(scenarios("")))
def test_offload_matches_pytorch(world: dict, reference, name: str) -> None:
    assert_matches_pytorch(world["ranks"], name, reference)
    for rank_results in world["ranks"]:
        assert rank_results[name]["losses"] == pytest.approx(rank_results[_baseline(name)]["losses"], abs=1e-5)
    assert reference[0][-1] < reference[0][0]


@pytest.mark.parametrize("name", list(MIXED_PRECISION))
def test_mixed_precision_offload_is_exact(exact_world: list[dict], name: str) -> None:
    for rank_results in exact_world:
        assert_identical(*rank_results[name], name)
    if name.startswith("fp16"):
        assert exact_world[0][name][0]["skipped"] > 0  # the overflow path ran


@pytest.mark.parametrize("name", list(scenarios("")))
def test_offload_path_is_exact(exact_world: list[dict], name: str) -> None:
    for rank_results in exact_world:
        assert_identical(rank_results[name], rank_results[_baseline(name)], name)


def _plan(name: str, nvme: str, rank: int):
    torch.manual_seed(0)
    config = Config.load(offload_config(scenarios(nvme)[name]))
    zero = config.zero_optimization
    specs = plan_units(AwkwardLM(), zero.shard_unit_classes)
    return model_state_bytes(specs, ShardingPolicy.from_config(zero), torch.float32, WORLD, rank, torch.float32,
                             OffloadPolicy.from_config(zero), ACCUMULATION, pin=False)  # fmt: skip


@pytest.mark.parametrize("name", list(scenarios("")))
def test_memory_is_where_the_plan_puts_it(world: dict, name: str) -> None:
    for rank, rank_results in enumerate(world["ranks"]):
        result, plan = rank_results[name], _plan(name, world["nvme"], rank)
        held = result["breakdown"]
        for category, expected in plan.offload.host.items():
            if category == "staging":  # pools fill up to their budget only as needed
                assert 0 < held["host_staging"] <= expected
            else:
                assert held[f"host_{category}"] == expected, category
        for category, expected in plan.offload.nvme.items():
            assert held[f"nvme_{category}"] == expected, category
        # the device keeps none of what was offloaded
        assert (held["master_weights"], held["optimizer_states"]) == (
            plan.master_weights, plan.optimizer_states)
        assert held["parameters"] == plan.parameters
        assert result["host_peak"] <= min(BUDGET, plan.offload.host_total)


@pytest.mark.parametrize("name", [n for n in scenarios("") if "nvme" in n])
def test_swap_files_hold_the_states_during_training(world: dict, name: str) -> None:
    for rank, rank_results in enumerate(world["ranks"]):
        result, plan = rank_results[name], _plan(name, world["nvme"], rank)
        expected = sorted(b for b in (plan.offload.optimizer_nvme_bytes, plan.offload.param_nvme_bytes) if b)
        for files in result["swap_history"]:
            assert sorted(size for size, _ in files.values()) == expected
            assert all(os.path.dirname(os.path.dirname(path)) == world["nvme"] for path in files)
        # what the files hold changes with every optimizer step
        history = result["swap_history"]
        if plan.offload.optimizer_nvme_bytes:
            digests = [{path: digest for path, (_, digest) in files.items()} for files in history]
            optimizer_file = next(p for p, (size, _) in history[0].items() if size == plan.offload.optimizer_nvme_bytes)
            assert len({d[optimizer_file] for d in digests}) == len(digests)
        assert result["left_after_close"] == []


def test_swap_files_are_ours_alone(world: dict) -> None:
    for rank_results in world["ranks"]:
        assert rank_results["user_file_kept"]
        assert rank_results["nvme_left"] == []  # every swap directory removed, nothing else touched
