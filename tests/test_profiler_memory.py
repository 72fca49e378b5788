"""The model-state arithmetic shared by the engine's early check and `zerokit estimate` equals what
the engine holds (Engine.memory_breakdown) on every rank, for every stage, to the byte."""
from __future__ import annotations

import pytest
import torch

import zerokit
from tests.models import AwkwardLM, batches, lm_loss
from tests.multiprocess import run_world
from zerokit.config import ZeroConfig
from zerokit.zero.memory import model_state_bytes
from zerokit.zero.policy import ShardingPolicy
from zerokit.zero.units import plan_units

WORLD = 2
STAGE3 = {"stage3_param_persistence_threshold": 20_000}  # blocks (13k) kept gathered, the root (36k) sharded


def _model() -> AwkwardLM:
    torch.manual_seed(0)
    return AwkwardLM(vocab=500, dim=64, hidden=100, layers=3)  # uneven sizes: padding differs per rank


def _zero(stage: int) -> dict:
    return {"stage": stage, **(STAGE3 if stage == 3 else {})}


def _measure(rank: int) -> dict:
    results = {}
    for stage in (0, 1, 2, 3):
        for precision in ("fp32", "bf16"):
            model = _model()
            engine = zerokit.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), {
                "bf16": {"enabled": precision == "bf16"},
                "zero_optimization": _zero(stage),
            })  # fmt: skip
            tokens, targets = batches(1, 4, vocab=500)[0]
            engine.backward(lm_loss(engine(tokens), targets))
            after_backward = engine.memory_breakdown()
            engine.step()
            results[(stage, precision)] = (after_backward, engine.memory_breakdown())
    return results


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    return run_world(_measure, WORLD)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_state_bytes_equal_the_engine_on_every_rank(measured: list[dict], stage: int, precision: str) -> None:
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    policy = ShardingPolicy.from_config(ZeroConfig(**_zero(stage)))
    specs = plan_units(_model())
    shards = WORLD if stage >= 1 else 1
    for rank, rank_result in enumerate(measured):
        after_backward, after_step = rank_result[(stage, precision)]
        states = model_state_bytes(specs, policy, dtype, shards, shard_index=rank if shards > 1 else 0)
        assert after_step["parameters"] == states.parameters
        assert after_step["master_weights"] == states.master_weights
        assert after_step["optimizer_states"] == states.optimizer_states
        assert after_backward["gradients"] == states.gradients
    if stage == 3:
        assert any(u.keeps_gathered for u in states.units) and any(not u.keeps_gathered for u in states.units)
    # without a rank, the estimate is the rank that holds the most
    worst = model_state_bytes(specs, policy, dtype, shards)
    per_rank = [model_state_bytes(specs, policy, dtype, shards, r).optimizer_states for r in range(shards)]
    assert worst.optimizer_states == max(per_rank)


def test_bad_shard_arguments_are_rejected() -> None:
    specs = plan_units(_model())
    policy = ShardingPolicy.from_config(ZeroConfig(stage=1))
    with pytest.raises(ValueError, match="num_shards"):
        model_state_bytes(specs, policy, torch.float32, 0)
    with pytest.raises(ValueError, match="shard_index"):
        model_state_bytes(specs, policy, torch.float32, 2, shard_index=2)
