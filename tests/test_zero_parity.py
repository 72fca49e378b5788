"""ZeRO stages 0-3 with two ranks (half the batch each) against plain single-process PyTorch on
the full batch: equal losses and final parameters (fp32, 1e-5), also with gradient
accumulation, clipping, boundary-only reduction and an optimizer built from the config."""
from __future__ import annotations

import pytest
import torch

import zerokit
from tests.models import AwkwardLM, batches, lm_loss
from tests.multiprocess import run_world

STEPS = 10
BATCH = 8  # global, per micro-step
LR = 1e-2

SCENARIOS = {
    # name: (zero_optimization section, gradient_accumulation_steps, gradient_clipping)
    "stage0": ({"stage": 0}, 1, 0.0),
    "stage1": ({"stage": 1}, 1, 0.0),
    "stage2": ({"stage": 2}, 1, 0.0),
    "stage3": ({"stage": 3, "stage3_param_persistence_threshold": 0}, 1, 0.0),
    "stage1_accum_clip": ({"stage": 1}, 2, 0.5),
    "stage2_accum_clip": ({"stage": 2}, 2, 0.5),
    "stage3_accum_clip": ({"stage": 3, "stage3_param_persistence_threshold": 0}, 2, 0.5),
    "stage2_boundary_only": ({"stage": 2, "reduce_at_boundary_only": True}, 2, 0.5),
    "stage3_boundary_only": (
        {"stage": 3, "reduce_at_boundary_only": True, "stage3_param_persistence_threshold": 0},
        2,
        0.5,
    ),
    # small units stay gathered; tiny prefetch and live budgets
    "stage3_persistent_small": ({"stage": 3, "stage3_param_persistence_threshold": 500}, 1, 0.5),
    "stage3_tight_prefetch": (
        {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 1,
         "stage3_max_live_parameters": 1, "reduce_bucket_size": 1},
        2,
        0.5,
    ),
}


def _config(zero: dict, accumulation: int, clipping: float) -> dict:
    return {
        "train_micro_batch_size_per_gpu": BATCH // 2,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": clipping,
        "zero_optimization": zero,
    }


def train(engine: zerokit.Engine, rank: int, world_size: int, accumulation: int) -> tuple[list[float], dict, int]:
    """STEPS optimizer steps; each rank takes its part of every global micro-batch."""
    losses = []
    share = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    for tokens, targets in batches(STEPS * accumulation, BATCH):
        loss = lm_loss(engine(tokens[share].to(engine.device)), targets[share].to(engine.device))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, engine.full_state_dict(), engine.global_step


def zerokit_runs(rank: int, scenarios: dict = SCENARIOS, extra: dict | None = None) -> dict:
    results = {}
    for name, (zero, accumulation, clipping) in scenarios.items():
        torch.manual_seed(0)
        model = AwkwardLM()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        engine = zerokit.initialize(model, optimizer, {**_config(zero, accumulation, clipping), **(extra or {})})
        results[name] = train(engine, rank, engine.world_size, accumulation)
    return results


def _with_config_optimizer(rank: int) -> dict:
    results = zerokit_runs(rank)
    torch.manual_seed(0)
    config = _config({"stage": 2}, 1, 0.0)
    config["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1}}
    engine = zerokit.initialize(AwkwardLM(), None, config)
    results["config_optimizer"] = train(engine, rank, engine.world_size, 1)
    return results


def reference_run(accumulation: int, clipping: float, device: str = "cpu") -> tuple[list[float], dict]:
    """Plain PyTorch, one process, the full batch."""
    torch.manual_seed(0)
    model = AwkwardLM().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    for index, (tokens, targets) in enumerate(batches(STEPS * accumulation, BATCH)):
        loss = lm_loss(model(tokens.to(device)), targets.to(device))
        (loss / accumulation).backward()
        losses.append(loss.item())
        if (index + 1) % accumulation == 0:
            if clipping:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clipping)
            optimizer.step()
            optimizer.zero_grad()
    return losses, {k: v.cpu() for k, v in model.state_dict().items()}


def assert_matches_reference(results: list[dict], name: str, device: str = "cpu", atol: float = 1e-5) -> None:
    zero, accumulation, clipping = SCENARIOS.get(name, ({}, 1, 0.0))
    ref_losses, ref_state = reference_run(accumulation, clipping, device)
    world_size = len(results)
    mean_losses = [sum(values) / world_size for values in zip(*(r[name][0] for r in results))]
    assert mean_losses == pytest.approx(ref_losses, abs=atol)
    assert ref_losses[-1] < ref_losses[0]  # training actually moved
    for rank_result in results:
        losses, state, global_step = rank_result[name]
        assert global_step == STEPS
        assert state.keys() == ref_state.keys()
        for key, expected in ref_state.items():
            torch.testing.assert_close(state[key], expected, rtol=0, atol=atol, msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def world_results() -> list[dict]:
    return run_world(_with_config_optimizer, 2)


@pytest.mark.parametrize("name", [*SCENARIOS, "config_optimizer"])
def test_matches_plain_pytorch(world_results: list[dict], name: str) -> None:
    assert_matches_reference(world_results, name)
