"""convert_to_wtacrs: turn chosen nn.Linear layers of a model into WTACRSLinear, in place.

Default selection: every nn.Linear inside a repeated block (a child of an nn.ModuleList that
has submodules, or a child of an nn.Sequential whose class repeats among its siblings), which
covers the attention and MLP projections of transformer layers and, with peft, the LoRA A/B
layers and their frozen base layers. The output head is never taken by default or by a
wildcard: a layer whose name is (or sits inside) lm_head / head / classifier / score / output,
one whose weight is tied to an embedding, or the model's last linear layer when its
out_features is an embedding's vocabulary size; only layers outside the repeated blocks are
heads (so a block's ``output`` projection is not). Naming a head exactly in include converts it.

Memory with LoRA: a frozen base layer saves no input at all (PyTorch needs only W for ∇H), so
converting it changes nothing; the saving comes from lora_A, which otherwise keeps the layer's
whole input, and lora_B, which keeps lora_A's (rank-r) output.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Optional

import torch.nn as nn

from zerokit.nn.config import Patterns, WTACRSConfig
from zerokit.nn.linear import WTACRSLinear
from zerokit.nn.norm_cache import GradNormCache
from zerokit.nn.state import SamplingState

HEAD_NAMES = frozenset({"lm_head", "head", "classifier", "score", "output", "output_layer", "qa_outputs"})
# Head modules that may wrap several linear layers (a classification MLP, peft's modules_to_save).
HEAD_CONTAINER_NAMES = frozenset({"lm_head", "classifier", "score"})


def convert_to_wtacrs(
    model: nn.Module,
    keep_ratio: float = 0.3,
    include: Patterns = None,
    exclude: Patterns = None,
    *,
    dataset_size: Optional[int] = None,
    same_samples_across_ranks: bool = False,
) -> dict[str, nn.Linear]:
    """Replace the selected nn.Linear layers of ``model`` by WTACRSLinear layers sharing their parameters.

    The new layers hold the very same Parameter objects, so an optimizer built before keeps
    working; run this before registering hooks on those layers. All converted layers share one
    SamplingState (gradient-norm cache and sample indices, see sample_indices). Returns every
    fully-qualified name that was replaced, mapped to the original module.
    See WTACRSConfig for the arguments.
    """
    config = WTACRSConfig(keep_ratio, include, exclude, dataset_size, same_samples_across_ranks)
    chosen = {id(model.get_submodule(name)) for name in select_linear_layers(model, config.include, config.exclude)}
    state = SamplingState(GradNormCache(config.dataset_size), config.same_samples_across_ranks)
    converted: dict[int, WTACRSLinear] = {}
    replaced: dict[str, nn.Linear] = {}
    for name, linear in list(model.named_modules(remove_duplicate=False)):
        if id(linear) not in chosen:
            continue
        if id(linear) not in converted:
            _check_no_hooks(name, linear)
            converted[id(linear)] = WTACRSLinear.from_linear(linear, config.keep_ratio, state)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, converted[id(linear)])
        replaced[name] = linear
    return replaced


def select_linear_layers(model: nn.Module, include: Patterns = None, exclude: Patterns = None) -> list[str]:
    """Names of the nn.Linear layers convert_to_wtacrs would replace (see the module docstring)."""
    config = WTACRSConfig(include=include, exclude=exclude)
    linears = {name: m for name, m in model.named_modules(remove_duplicate=False) if type(m) is nn.Linear}
    if "" in linears:
        raise ValueError("the model is itself an nn.Linear: build WTACRSLinear.from_linear(model) instead")
    in_blocks = _names_in_repeated_blocks(model) & linears.keys()
    heads = _output_heads(model, {name: m for name, m in linears.items() if name not in in_blocks})
    if config.include is None:
        chosen = in_blocks - heads
    else:
        chosen = set()
        for pattern in config.include:
            matches = _matching(linears, pattern, "include")
            chosen.update(name for name in matches if name not in heads or name == pattern)
    for pattern in config.exclude or ():
        chosen.difference_update(_matching(linears, pattern, "exclude"))
    if not chosen and any(isinstance(m, WTACRSLinear) for m in model.modules()) and config.include is None:
        raise ValueError("the model's block linear layers are already WTA-CRS layers: convert_to_wtacrs runs once")
    if not chosen:
        raise ValueError(
            "no nn.Linear layer was selected for WTA-CRS. By default only linear layers inside the repeated "
            "blocks of an nn.ModuleList are taken (never the output head); name layers with include=[...] "
            "(fnmatch patterns). Only modules of type nn.Linear itself are converted (not subclasses, nor other "
            f"layer types such as transformers' Conv1D). Linear layers of this model: {_some(linears)}"
        )
    return [name for name in linears if name in chosen]


def _matching(linears: dict[str, nn.Linear], pattern: str, argument: str) -> list[str]:
    matches = [name for name in linears if fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")]
    if not matches:
        raise ValueError(
            f"{argument} pattern {pattern!r} matches no nn.Linear layer (patterns are fnmatch patterns of "
            f"fully-qualified module names). Linear layers of this model: {_some(linears)}"
        )
    return matches


def _some(names, limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "") if names else "(none)"


def _repeated_blocks(container: nn.Module) -> list[str]:
    children = [(name, child) for name, child in container.named_children() if next(child.children(), None) is not None]
    if isinstance(container, nn.ModuleList):
        return [name for name, _ in children]
    if isinstance(container, nn.Sequential):
        classes = [type(child) for _, child in children]
        return [name for name, child in children if classes.count(type(child)) > 1]
    return []


def _names_in_repeated_blocks(model: nn.Module) -> set[str]:
    names = set()
    for container_name, container in model.named_modules(remove_duplicate=False):
        for block_name in _repeated_blocks(container):
            prefix = f"{container_name}.{block_name}" if container_name else block_name
            block = container.get_submodule(block_name)
            names.update(f"{prefix}.{name}" for name, _ in block.named_modules(remove_duplicate=False) if name)
    return names


def _output_heads(model: nn.Module, linears: dict[str, nn.Linear]) -> set[str]:
    """The output heads among ``linears`` (the linear layers outside the repeated blocks)."""
    heads = {
        name
        for name in linears
        if name.split(".")[-1] in HEAD_NAMES or HEAD_CONTAINER_NAMES.intersection(name.split("."))
    }
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    tied = {id(e.weight) for e in embeddings}
    heads.update(name for name, linear in linears.items() if id(linear.weight) in tied)
    if linears:
        last = next(reversed(linears))
        if linears[last].out_features in {e.num_embeddings for e in embeddings}:
            heads.add(last)
    return heads


def _check_no_hooks(name: str, linear: nn.Linear) -> None:
    hooks = (linear._forward_pre_hooks, linear._forward_hooks, linear._backward_pre_hooks, linear._backward_hooks)
    if any(hooks):
        raise ValueError(
            f"layer {name!r} has module hooks; convert_to_wtacrs replaces the module object, so those hooks "
            "would be lost. Convert before registering hooks or wrapping the model (e.g. before sharding)."
        )
