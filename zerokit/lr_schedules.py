"""DeepSpeed's learning-rate schedules (the `scheduler` section), as torch LambdaLR schedules."""
from __future__ import annotations

import difflib
import math
from typing import Callable

import torch

from zerokit.config import ConfigError, SchedulerConfig

_PARAMS = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000, "warmup_type": "log"},
    "WarmupDecayLR": {
        "total_num_steps": None,
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 0.001,
        "warmup_num_steps": 1000,
        "warmup_type": "log",
    },
    "WarmupCosineLR": {
        "total_num_steps": None,
        "warmup_min_ratio": 0.0,
        "warmup_num_steps": 1000,
        "cos_min_ratio": 0.0001,
        "warmup_type": "log",
    },
}


def build_scheduler(config: SchedulerConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    if config.type not in _PARAMS:
        nearest = difflib.get_close_matches(config.type, list(_PARAMS), n=1)
        hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
        raise ConfigError(f"scheduler.type={config.type!r} is not supported.{hint} Use one of {', '.join(_PARAMS)}.")
    defaults = _PARAMS[config.type]
    for key in config.params:
        if key not in defaults:
            nearest = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
            raise ConfigError(f"scheduler.params.{key} is not a parameter of {config.type}.{hint}")
    p = {**defaults, **config.params}
    if p.get("total_num_steps", 0) is None:
        raise ConfigError(f"scheduler.params.total_num_steps is required for {config.type}.")
    if p["warmup_type"] not in ("log", "linear"):
        raise ConfigError(f"scheduler.params.warmup_type={p['warmup_type']!r} is invalid: expected 'log' or 'linear'.")
    warmup = _warmup_fraction(p["warmup_num_steps"], p["warmup_type"])

    if config.type == "WarmupCosineLR":
        # Ratios of the optimizer's own learning rate.
        def factor(step: int) -> float:
            if step < p["warmup_num_steps"]:
                return p["warmup_min_ratio"] + (1 - p["warmup_min_ratio"]) * warmup(step)
            span = max(1, p["total_num_steps"] - p["warmup_num_steps"])
            progress = min(1.0, (step - p["warmup_num_steps"]) / span)
            return p["cos_min_ratio"] + (1 - p["cos_min_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # WarmupLR and WarmupDecayLR set absolute learning rates, as in DeepSpeed.
    low, high = p["warmup_min_lr"], p["warmup_max_lr"]
    if high <= 0:
        raise ConfigError(f"scheduler.params.warmup_max_lr={high} must be positive.")
    for group in optimizer.param_groups:
        group["lr"] = high

    def absolute(step: int) -> float:
        if step < p["warmup_num_steps"]:
            return low + (high - low) * warmup(step)
        if config.type == "WarmupDecayLR":
            span = max(1, p["total_num_steps"] - p["warmup_num_steps"])
            return high * max(0.0, (p["total_num_steps"] - step) / span)
        return high

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: absolute(step) / high)


def _warmup_fraction(steps: int, kind: str) -> Callable[[int], float]:
    if steps <= 1:
        return lambda step: 1.0
    if kind == "log":
        return lambda step: math.log(step + 1) / math.log(steps)
    return lambda step: step / steps
