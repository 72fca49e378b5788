"""Per-rank bytes of optimizer states, gradients and parameters are 1/world of the totals (plus
alignment padding) for the stages that shard them, and whole for the stages that do not."""
from __future__ import annotations

import pytest
import torch

import zerokit
from tests.models import AwkwardLM, batches, lm_loss
from tests.multiprocess import run_world
from zerokit.zero.flat_group import ALIGNMENT

WORLD = 2


def _model() -> AwkwardLM:
    torch.manual_seed(0)
    return AwkwardLM(vocab=500, dim=64, hidden=256, layers=4)


def _measure(rank: int) -> dict:
    results = {}
    for stage in (0, 1, 2, 3):
        for accumulation in (1, 2):
            model = _model()
            engine = zerokit.initialize(
                model,
                torch.optim.AdamW(model.parameters(), lr=1e-3),
                {"gradient_accumulation_steps": accumulation,
                 "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}},
            )
            tokens, targets = batches(1, 4, vocab=500)[0]
            engine.backward(lm_loss(engine(tokens), targets))
            after_first_backward = engine.memory_breakdown()
            engine.step()
            for _ in range(accumulation - 1):
                engine.backward(lm_loss(engine(tokens), targets))
                engine.step()
            results[(stage, accumulation)] = (after_first_backward, engine.memory_breakdown())
    return results


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    return run_world(_measure, WORLD)


def _totals() -> tuple[int, int, int]:
    model = _model()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    slack = 4 * ALIGNMENT * (len(list(model.parameters())) + 2 * 6)  # per-parameter alignment + shard padding
    return trainable, frozen, slack


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_state_bytes_per_rank(measured: list[dict], stage: int) -> None:
    trainable, frozen, slack = _totals()
    shards = WORLD if stage >= 1 else 1
    for rank_result in measured:
        during, after = rank_result[(stage, 1)]
        # AdamW: two fp32 moments per owned element (+ one 4-byte step counter per piece)
        assert after["optimizer_states"] == pytest.approx(8 * trainable / shards, abs=2 * slack)
        # gradients after backward: reduced fp32 shards
        assert during["gradients"] == pytest.approx(4 * trainable / shards, abs=slack)
        assert after["gradients"] == 0  # released after the step
        if stage == 3:
            assert after["parameters"] == pytest.approx(4 * frozen / WORLD, abs=slack)  # only the frozen shard
            assert after["master_weights"] == pytest.approx(4 * trainable / WORLD, abs=slack)
        else:
            assert after["parameters"] == pytest.approx(4 * (trainable + frozen), abs=slack)  # replicated
            assert after["master_weights"] == 0  # fp32 masters alias the replicated parameters


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradients_between_micro_steps(measured: list[dict], stage: int) -> None:
    trainable, _, slack = _totals()
    during, _ = measured[0][(stage, 2)]
    if stage == 1:
        # stage 1 keeps unsharded gradients until the accumulation boundary
        assert during["gradients"] == pytest.approx(4 * trainable, abs=slack)
    else:
        assert during["gradients"] == pytest.approx(4 * trainable / WORLD, abs=slack)
