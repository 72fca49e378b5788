"""`zerokit.initialize`: the one entry point of a training script."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from zerokit.config import Config, ConfigError
from zerokit.distributed import setup_distributed
from zerokit.engine import Engine
from zerokit.nn import convert_to_wtacrs
from zerokit.optim import check_optimizer
from zerokit.zero.host_optimizer import check_offloadable, check_offloadable_config


def initialize(
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    config: Union[Config, Mapping[str, Any], str, os.PathLike, None] = None,
) -> Engine:
    """Shard `model` and `optimizer` across the ranks of this job and return the training engine.

    `optimizer` is an optimizer built over `model.parameters()` (zerokit keeps the instance and
    re-points it at this rank's shards) or None with an `optimizer` section in `config`.
    `config` is a zerokit.Config, a dict or a JSON path; DeepSpeed key names are accepted.
    """
    config = Config.load(config)
    if optimizer is None and config.optimizer is None:
        raise ConfigError("no optimizer: pass one to zerokit.initialize or add an 'optimizer' section to the config.")
    if optimizer is not None and config.optimizer is not None:
        raise ConfigError("an optimizer was passed and the config has an 'optimizer' section: keep only one of them.")
    if optimizer is not None:
        check_optimizer(optimizer)
    if config.zero_optimization.offload_optimizer.device != "none":
        if optimizer is not None:
            check_offloadable(optimizer)
        else:
            check_offloadable_config(config.optimizer)
    dist_ctx = setup_distributed()
    config = config.resolve_batch(dist_ctx.world_size)
    if config.wtacrs is not None:
        # Before the engine hooks the modules: conversion replaces module objects, keeping parameters.
        convert_to_wtacrs(model, **dataclasses.asdict(config.wtacrs))
    return Engine(model, optimizer, config, dist_ctx)
