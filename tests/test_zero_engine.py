"""Engine behaviour in one process: bad input, the loop contract, fp16 loss scaling, schedules."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zerokit
from tests.models import AwkwardLM, batches, lm_loss


def _engine(config: dict | None = None, **optimizer_kwargs) -> zerokit.Engine:
    torch.manual_seed(0)
    model = AwkwardLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **optimizer_kwargs)
    return zerokit.initialize(model, optimizer, config or {"zero_optimization": {"stage": 3}})


def test_optimizer_must_come_from_one_place() -> None:
    model = AwkwardLM()
    with pytest.raises(zerokit.ConfigError, match="no optimizer"):
        zerokit.initialize(model)
    with pytest.raises(zerokit.ConfigError, match="keep only one"):
        zerokit.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), {"optimizer": {"type": "SGD"}})


def test_optimizer_over_foreign_tensors_is_rejected() -> None:
    model = AwkwardLM()
    stranger = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        zerokit.initialize(model, torch.optim.AdamW([*model.parameters(), stranger]))


def test_shape_dependent_optimizer_is_rejected() -> None:
    model = AwkwardLM()
    with pytest.raises(ValueError, match="element-wise optimizer"):
        zerokit.initialize(model, torch.optim.LBFGS(model.parameters()))


def test_unknown_config_optimizer_and_params() -> None:
    with pytest.raises(zerokit.ConfigError, match="Did you mean 'adamw'"):
        zerokit.initialize(AwkwardLM(), None, {"optimizer": {"type": "adamww"}})
    with pytest.raises(zerokit.ConfigError, match="Did you mean 'weight_decay'"):
        zerokit.initialize(AwkwardLM(), None, {"optimizer": {"type": "AdamW", "params": {"weight_decy": 0.1}}})


def test_unit_classes_that_match_nothing() -> None:
    with pytest.raises(ValueError, match="matches no module.*Block"):
        zerokit.initialize(AwkwardLM(), torch.optim.SGD(AwkwardLM().parameters(), lr=0.1),
                           {"zero_optimization": {"stage": 3, "shard_unit_classes": ["Blok"]}})


def test_loss_backward_outside_the_engine_is_caught() -> None:
    engine = _engine()
    tokens, targets = batches(1, 2)[0]
    lm_loss(engine(tokens), targets).backward()
    with pytest.raises(RuntimeError, match="engine.backward"):
        engine.step()


def test_non_scalar_loss_is_rejected() -> None:
    engine = _engine()
    tokens, _ = batches(1, 2)[0]
    with pytest.raises(ValueError, match="scalar loss"):
        engine.backward(engine(tokens).sum(-1))


def test_eval_forward_frees_stage3_parameters() -> None:
    engine = _engine({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    sharded = engine.memory_breakdown()["parameters"]  # only the frozen group's shard
    assert sharded < 0.2 * 4 * sum(p.numel() for p in engine.module.parameters())
    tokens, _ = batches(1, 2)[0]
    with torch.no_grad():
        engine.eval()(tokens)
    assert engine.memory_breakdown()["parameters"] == sharded  # the root was freed too
    engine.train()


def test_fp16_overflow_skips_the_step_and_lowers_the_scale() -> None:
    config = {"fp16": {"enabled": True, "initial_scale_power": 8, "hysteresis": 1, "loss_scale_window": 2},
              "zero_optimization": {"stage": 2}}
    engine = _engine(config)
    tokens, targets = batches(1, 2)[0]
    before = engine.full_state_dict()
    engine.backward(lm_loss(engine(tokens), targets) * math.inf)
    engine.step()
    assert engine.skipped_steps == 1 and engine.loss_scale == 2**7
    after = engine.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was updated
    for _ in range(2):
        engine.backward(lm_loss(engine(tokens), targets))
        engine.step()
    assert engine.skipped_steps == 1 and engine.loss_scale == 2**8  # two good steps: the scale grows back
    assert not torch.equal(before["blocks.0.up.weight"], engine.full_state_dict()["blocks.0.up.weight"])


def test_fp16_training_tracks_fp32() -> None:
    data = batches(6, 4)
    runs = {}
    for name, extra in (("fp32", {}), ("fp16", {"fp16": {"enabled": True, "initial_scale_power": 8}})):
        engine = _engine({"zero_optimization": {"stage": 2}, **extra})
        runs[name] = []
        for tokens, targets in data:
            loss = lm_loss(engine(tokens), targets)
            engine.backward(loss)
            engine.step()
            runs[name].append(loss.item())
        assert engine.skipped_steps == 0
    assert runs["fp16"] == pytest.approx(runs["fp32"], rel=1e-2)


def test_deepspeed_warmup_schedule() -> None:
    config = {"zero_optimization": {"stage": 1},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.1,
                                                           "warmup_num_steps": 4, "warmup_type": "linear"}}}
    engine = _engine(config)
    tokens, targets = batches(1, 2)[0]
    seen = []
    for _ in range(6):
        seen.append(engine.optimizer.param_groups[0]["lr"])
        engine.backward(lm_loss(engine(tokens), targets))
        engine.step()
    assert seen == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])


def test_user_optimizer_instance_is_kept() -> None:
    torch.manual_seed(0)
    model = AwkwardLM()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    engine = zerokit.initialize(model, optimizer, {"zero_optimization": {"stage": 3}})
    assert engine.optimizer is optimizer
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in decay + no_decay)  # a world of one owns every element


def test_dropping_the_engine_frees_the_model() -> None:
    import gc
    import weakref

    engine = _engine({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    model = weakref.ref(engine.module)
    tokens, targets = batches(1, 2)[0]
    engine.backward(lm_loss(engine(tokens), targets))
    engine.step()
    del engine
    gc.collect()
    assert model() is None  # no hook keeps the model (and its GPU memory) alive
