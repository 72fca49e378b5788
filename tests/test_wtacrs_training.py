"""WTA-CRS through zerokit.initialize: the example GPT on the embedded corpus trains to within 2%
of exact training, and under ZeRO-3 with two ranks keep 1.0 reproduces exact training."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import zerokit
from tests.multiprocess import run_world

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from gpt import GPT, GPTConfig, sample_batch, stdlib_corpus  # noqa: E402

MODEL = GPTConfig(layers=2, dim=96, heads=4, max_seq=64)


def _train(config: dict, steps: int, rank: int = 0) -> tuple[list[float], float]:
    torch.manual_seed(0)
    model = GPT(MODEL)
    engine = zerokit.initialize(model, torch.optim.AdamW(model.parameters(), lr=3e-3), config)
    corpus = stdlib_corpus(max_bytes=1 << 20)
    generator = torch.Generator().manual_seed(10 + rank)
    losses = []
    for _ in range(steps):
        inputs, targets = sample_batch(corpus, 8, 64, generator)
        loss = engine(inputs, targets)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    held_out = torch.Generator().manual_seed(999)
    with torch.no_grad():
        engine.eval()
        final = sum(engine(*sample_batch(corpus, 16, 64, held_out)).item() for _ in range(4)) / 4
        engine.train()
    return losses, final


def test_keep_03_trains_within_2_percent_of_exact() -> None:
    _, exact = _train({"zero_optimization": {"stage": 0}}, steps=150)
    _, sampled = _train({"zero_optimization": {"stage": 0}, "wtacrs": {"keep_ratio": 0.3}}, steps=150)
    assert sampled == pytest.approx(exact, rel=0.02), (sampled, exact)
    assert exact < 3.5  # it learned something (uniform over bytes is 5.5)


def _zero3(rank: int) -> dict:
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    return {
        "exact": _train({"zero_optimization": zero}, steps=5, rank=rank)[0],
        "keep_1": _train({"zero_optimization": zero, "wtacrs": {"keep_ratio": 1.0}}, steps=5, rank=rank)[0],
        "keep_03": _train({"zero_optimization": zero, "wtacrs": {"keep_ratio": 0.3}}, steps=5, rank=rank)[0],
    }


def test_under_zero3_two_ranks() -> None:
    for result in run_world(_zero3, 2):
        assert result["keep_1"] == pytest.approx(result["exact"], abs=1e-5)
        assert result["keep_03"][0] == pytest.approx(result["exact"][0], abs=1e-6)  # forward is exact
        assert result["keep_03"][-1] < result["keep_03"][0]
