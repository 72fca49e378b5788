"""The optimizer over this rank's shards: the user's own instance re-pointed, or one from config."""
from __future__ import annotations

import difflib
import inspect
import warnings
from typing import Iterable

import torch
from torch import nn

from zerokit.config import ConfigError, OptimizerConfig

# Optimizers whose update of an element depends only on that element's history: stepping the
# 1-D shard pieces gives exactly the unsharded update.
_ELEMENTWISE = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.Adamax,
    torch.optim.RMSprop,
    torch.optim.Rprop,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.ASGD,
)
_SHAPE_DEPENDENT = ("LBFGS", "SparseAdam", "Adafactor", "Muon", "Shampoo")


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    name = type(optimizer).__name__
    if name in _SHAPE_DEPENDENT:
        raise ValueError(
            f"{name} needs whole parameter tensors, but ZeRO steps flat shards of them; "
            "use an element-wise optimizer such as AdamW, Adam or SGD."
        )
    if not isinstance(optimizer, _ELEMENTWISE):
        warnings.warn(
            f"zerokit steps {name} over flat 1-D shards of each parameter; this is exact only if its update "
            "is element-wise (like Adam or SGD).",
            stacklevel=3,
        )
    if optimizer.state:
        raise ValueError(
            "the optimizer already holds state (it has taken steps); create it fresh before zerokit.initialize "
            "and restore states with engine.load_checkpoint."
        )


def repoint_optimizer(
    optimizer: torch.optim.Optimizer, model_params: Iterable[nn.Parameter], pieces: dict[int, nn.Parameter]
) -> torch.optim.Optimizer:
    """Replace each model parameter in the optimizer's groups by this rank's shard piece of it,
    keeping the instance, its class, groups and hyper-parameters."""
    known = {id(p) for p in model_params}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in known:
                raise ValueError(
                    "the optimizer holds a tensor that is not a parameter of the model; build it over "
                    "model.parameters() (or a subset) of the model passed to zerokit.initialize."
                )
        group["params"] = [pieces[id(p)] for p in group["params"] if id(p) in pieces]
    return optimizer


def build_optimizer(config: OptimizerConfig, params: list, device: torch.device) -> torch.optim.Optimizer:
    """An optimizer from a DeepSpeed-style `optimizer` section over `params` (tensors or groups)."""
    kind = config.type.lower()
    kwargs = dict(config.params)
    if kind == "adam":
        # DeepSpeed's "Adam" applies decoupled weight decay unless adam_w_mode is false.
        cls = torch.optim.AdamW if kwargs.pop("adam_w_mode", True) else torch.optim.Adam
    else:
        classes = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}
        if kind not in classes:
            nearest = difflib.get_close_matches(kind, ["adam", *classes], n=1)
            hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
            raise ConfigError(f"optimizer.type={config.type!r} is not supported.{hint} Use Adam, AdamW, SGD or Adagrad.")
        cls = classes[kind]
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    for key in kwargs:
        if key not in accepted:
            nearest = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
            raise ConfigError(f"optimizer.params.{key} is not a parameter of {cls.__name__}.{hint}")
    if "fused" in accepted and "foreach" not in kwargs and "fused" not in kwargs:
        kwargs["fused" if device.type == "cuda" else "foreach"] = True
    return cls(params, **kwargs)
