"""Activation policies from the config's activation_memory section under ZeRO (gloo, two ranks):
the same losses and parameters as the ZeRO run without them. Under stage 3 recomputation runs inside backward, where the engine
gathers the block's parameters again; saved parameters are kept as references, never copied."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import zerokit
from tests.multiprocess import run_world

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, GPTConfig  # noqa: E402

STEPS, BATCH, SEQ = 3, 4, 16
POLICIES = {
    "recompute": {"policy": "recompute"},
    "swap": {"policy": "swap"},
    "memo": {"policy": "memo", "alpha": 0.5},
    "mixed": {"block_policies": ["memo", "swap", "recompute", "keep"], "alpha": 0.25},
}
STAGES = {"stage3": {"stage": 3, "stage3_param_persistence_threshold": 0}, "stage2": {"stage": 2}}


def _train(rank: int, zero: dict, section: dict | None) -> tuple:
    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=4, dim=32, heads=2, max_seq=64, vocab=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": BATCH // 2, "zero_optimization": zero}
    if section:
        config["activation_memory"] = section  # applied by zerokit.initialize
    engine = zerokit.initialize(model, optimizer, config)
    manager = engine.activations
    generator = torch.Generator().manual_seed(1)
    share = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    losses = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 64, (BATCH, SEQ), generator=generator)
        loss = engine(tokens[share], tokens[share])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    reports = manager.reports() if manager else []
    return losses, engine.full_state_dict(), reports


def _runs(rank: int) -> dict:
    results = {}
    for stage, zero in STAGES.items():
        results[(stage, "plain")] = _train(rank, zero, None)
        for name, section in POLICIES.items():
            if stage == "stage3" or name == "memo":
                results[(stage, name)] = _train(rank, zero, section)
    return results


def test_policies_under_zero():
    for results in run_world(_runs, 2):
        for (stage, name), (losses, state, reports) in results.items():
            plain_losses, plain_state, _ = results[(stage, "plain")]
            torch.testing.assert_close(losses, plain_losses, rtol=1e-6, atol=1e-6, msg=f"{stage} {name}")
            for key in plain_state:
                torch.testing.assert_close(
                    state[key], plain_state[key], rtol=1e-6, atol=1e-6, msg=f"{stage} {name} {key}"
                )
            assert reports or name == "plain"
            for report in reports:
                # parameters were recognised through the engine's flat buffers: referenced, not copied
                assert report.parameter_bytes > 0 and report.kept_bytes in (0, BATCH // 2 * SEQ * 32 * 4)
