"""Models named on the command line, built without weights, and how one training forward calls them.

A model is named by a preset (`zerokit estimate --help` lists them), a Hugging Face `config.json`
(a file, or a directory holding one), or a `module:function` factory that returns an nn.Module
(called under `torch.device("meta")`, so it should build on the current default device).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from zerokit.profiler.presets import PRESETS


class ModelSourceError(ValueError):
    """The model name, path or factory cannot be used; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelSource:
    name: str
    build: Callable[[], nn.Module]  # builds on the current default device


def resolve_model(spec: str) -> ModelSource:
    """A preset name, a path to a Hugging Face config.json (or its directory), or module:function."""
    if spec in PRESETS:
        shape = PRESETS[spec]
        return ModelSource(spec, lambda: _hf_model(_llama_config(shape.config_kwargs())))
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ModelSourceError(f"directory {spec} has no config.json; pass the path of a Hugging Face config.json")
    if path.is_file():
        return ModelSource(str(path), lambda: _hf_model(_hf_config(path)))
    if ":" in spec and os.sep not in spec.split(":", 1)[0]:
        return ModelSource(spec, _factory(spec))
    raise ModelSourceError(
        f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}), not an existing config.json file or "
        "directory, and not a module:function factory (for example mypackage.models:build_model)."
    )


def build_on_meta(source: ModelSource, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device in training mode, its parameters in `dtype` (buffers keep
    theirs, as the engine keeps them)."""
    with torch.device("meta"):
        model = source.build()
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{source.name} returned {type(model).__name__}, not a torch.nn.Module")
    if not any(True for _ in model.parameters()):
        raise ModelSourceError(f"{source.name} has no parameters: nothing to train")
    model = model.to("meta") if any(not p.is_meta for p in model.parameters()) else model
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            torch.utils.swap_tensors(param, nn.Parameter(param.to(dtype), requires_grad=param.requires_grad))
    return model.train()


def training_loss(
    model: nn.Module, tokens: torch.Tensor, forward: Optional[Callable[..., Any]] = None
) -> torch.Tensor:
    """One training forward on `tokens` (batch x sequence of ids): a Hugging Face causal LM gets
    labels=tokens and computes its own loss; a forward taking (tokens, targets) returns the loss;
    a forward taking tokens returns logits, scored here with fp32 cross entropy. `forward` runs
    the model (default: the model itself; a zerokit engine wrapping it, for instance)."""
    run = model if forward is None else forward
    if _is_hugging_face(model):
        return run(input_ids=tokens, labels=tokens).loss
    parameters = [
        p for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]  # fmt: skip
    if len(parameters) >= 2:
        loss = run(tokens, tokens)
    else:
        logits = run(tokens)
        loss = F.cross_entropy(logits.flatten(0, -2).float(), tokens.flatten())
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ModelSourceError(
            f"{type(model).__name__}(tokens, targets) must return a scalar loss, got "
            f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}"
        )
    return loss


def _is_hugging_face(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelSourceError(
            "presets and config.json models are built with Hugging Face transformers: pip install transformers"
        ) from None
    return transformers


def _llama_config(kwargs: dict):
    return _transformers().LlamaConfig(**kwargs)


def _hf_config(path: Path):
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise ModelSourceError(f"{path} is not a Hugging Face model config ({error})") from None


def _hf_model(config) -> nn.Module:
    transformers = _transformers()
    config.use_cache = False  # training: no key/value cache
    try:
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError as error:
        if "sdpa" not in str(error).lower() and "scaled_dot_product" not in str(error).lower():
            raise ModelSourceError(f"cannot build a causal LM from this config: {error}") from None
    return transformers.AutoModelForCausalLM.from_config(config)  # this architecture has no SDPA path


def _factory(spec: str) -> Callable[[], nn.Module]:
    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # factories of the project one runs from
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelSourceError(f"cannot import {module_name!r} for factory {spec!r}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ModelSourceError(f"{module_name} has no callable {function_name!r} (factory {spec!r})")
    return function
