"""Models built on the meta device: every rank materializes only its shards, and the resulting
model is the same whatever the world size (one seed per unit, shared by all ranks)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import zerokit
from tests.models import AwkwardLM
from tests.multiprocess import run_world

CONFIG = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _meta_engine() -> zerokit.Engine:
    torch.manual_seed(123)
    with torch.device("meta"):
        model = AwkwardLM()
    return zerokit.initialize(model, torch.optim.AdamW(model.parameters()), CONFIG)


def _build(rank: int) -> tuple[dict, dict]:
    engine = _meta_engine()
    return engine.full_state_dict(), engine.memory_breakdown()


def test_meta_model_is_world_size_invariant() -> None:
    two_ranks = run_world(_build, 2)
    one_rank = _meta_engine().full_state_dict()
    for state, held in two_ranks:
        assert state.keys() == one_rank.keys()
        for key, value in one_rank.items():
            assert torch.equal(state[key], value), key
        trainable = sum(v.numel() for k, v in one_rank.items() if not k.startswith(("frozen", "scale")))
        assert held["master_weights"] < 0.6 * 4 * trainable  # a shard, not the model
    bound = 1 / 24**0.5  # nn.Linear's kaiming-uniform bound for fan_in 24
    assert 0 < one_rank["blocks.0.up.weight"].abs().max() <= bound
    assert torch.equal(one_rank["blocks.1.norm.weight"], torch.ones(24))
    assert one_rank["scale"].item() == 0.5  # a buffer filled by the module's reset_parameters


def test_meta_module_without_initializer_is_rejected() -> None:
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(4, 4))

        def forward(self, x):
            return x @ self.weight

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), Bare())
    with pytest.raises(ValueError, match="Bare was built on the meta device but has no reset_parameters"):
        zerokit.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1))
