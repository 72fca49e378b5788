"""Which modules are blocks, and which policy each block gets."""
from __future__ import annotations

from torch import nn

from zerokit.activations.config import ActivationMemoryConfig
from zerokit.zero.units import _choose_unit_modules

_POLICY_OF = {"memo": "memo", "recompute": "recompute", "swap": "swap", "none": "keep"}
_KV_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def find_blocks(model: nn.Module, class_names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """The blocks of `model` (module path, module), in module order: the modules of the named
    classes, else the repeated blocks of a ModuleList (the rule that picks ZeRO sharding units)."""
    if class_names:
        present = {type(m).__name__ for m in model.modules()}
        if not any(name in present for name in class_names):
            raise ValueError(
                f"activation_memory.blocks={list(class_names)} matches no module of the model; "
                f"module classes present: {', '.join(sorted(present))}."
            )
        return _choose_unit_modules(model, class_names)
    chosen = _choose_unit_modules(model, ())
    modules = dict(model.named_modules())
    repeated = [(name, module) for name, module in chosen if _in_module_list(modules, name)]
    if not repeated or len(repeated) != len(chosen):
        raise ValueError(
            f"{type(model).__name__} has no repeated blocks (a ModuleList of modules of one class, such as "
            "transformer layers), so activation memory has nothing to manage; name the block classes with "
            "activation_memory.blocks."
        )
    return repeated


def _in_module_list(modules: dict[str, nn.Module], path: str) -> bool:
    parent = modules[path.rpartition(".")[0]]
    return isinstance(parent, nn.ModuleList) and len({type(m) for m in parent}) == 1


def assign_policies(config: ActivationMemoryConfig, count: int) -> list[str]:
    """One of keep | recompute | swap | memo per block."""
    if config.block_policies:
        if len(config.block_policies) != count:
            raise ValueError(
                f"activation_memory.block_policies has {len(config.block_policies)} entries but the model has "
                f"{count} blocks; give one policy per block."
            )
        return list(config.block_policies)
    policy = _POLICY_OF[config.policy]
    policies = [policy] * count
    if policy in ("swap", "memo"):
        for index in range(max(count - config.keep_last, 0), count):
            policies[index] = "keep"
    return policies


def check_attention_implementation(model: nn.Module) -> None:
    """memo answers attention from stored outputs, which it can only do for
    torch.nn.functional.scaled_dot_product_attention."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation is not None and implementation != "sdpa":
        raise ValueError(
            f"activation_memory.policy 'memo' needs attention computed by "
            f"torch.nn.functional.scaled_dot_product_attention, but the model uses "
            f"attn_implementation={implementation!r}; load it with attn_implementation=\"sdpa\"."
        )


def check_no_kv_cache(block_name: str, kwargs: dict) -> None:
    """A block that is run again must not update a key/value cache a second time."""
    for key in _KV_CACHE_ARGUMENTS:
        if kwargs.get(key) is not None:
            raise ValueError(
                f"block {block_name} got a key/value cache ({key}=...), which running its forward again "
                "would update twice; call the model with use_cache=False when training."
            )
