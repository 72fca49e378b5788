"""Turn each unit's parameters into flat sharded groups, materializing meta-device models.

A model built under `torch.device("meta")` never exists in full anywhere: each unit in turn
gets an fp32 buffer on the device, its modules' initializers fill it, and every rank keeps only
its shard. Initializers run under a seed shared by all ranks (derived per unit), so the shards
form one consistent model whatever the world size. A model built on a real device is copied in
and broadcast from rank 0, so all ranks start from the same weights even if seeded differently.
"""
from __future__ import annotations

import torch
from torch import nn

from zerokit.zero.flat_group import FlatParamGroup, ShardingContext, layout
from zerokit.zero.policy import ShardingPolicy
from zerokit.zero.runtime import ShardedUnit
from zerokit.zero.units import UnitSpec


def check_initializers(model: nn.Module, specs: list[UnitSpec]) -> None:
    """Fail before any work if a meta-device module has no way to initialize itself."""
    for spec in specs:
        for module in spec.init_modules:
            if _has_meta_state(module) and _initializer(model, module) is None:
                raise ValueError(
                    f"module {type(module).__name__} was built on the meta device but has no reset_parameters(); "
                    "give it one that initializes its parameters and buffers, or build it on a real device."
                )


def shared_seed(ctx: ShardingContext) -> int:
    """One seed for all ranks: rank 0's initial seed."""
    seed = torch.tensor([torch.initial_seed() % (2**62)], dtype=torch.int64, device=ctx.device)
    ctx.comm.broadcast(seed, src=0)
    return int(seed.item())


def build_unit(
    model: nn.Module, spec: UnitSpec, ctx: ShardingContext, policy: ShardingPolicy, seed: int, index: int,
    optimizer_offloaded: bool,
) -> ShardedUnit:
    """The unit's flat groups (trainable, then frozen); `index` names its offloaded states;
    `optimizer_offloaded`: the trainable group's optimizer lives with `ctx.offload`."""
    by_kind = {
        trainable: [(name, p) for name, p in spec.params if p.requires_grad == trainable] for trainable in (True, False)
    }
    keep_gathered = policy.keeps_gathered(sum(p.numel() for _, p in spec.params))
    needs_init = [m for m in spec.init_modules if _has_meta_state(m)]  # before meta tensors get storage
    plans = []
    for trainable, params in by_kind.items():
        if not params:
            continue
        slots, shard_numel = layout(params, ctx.num_shards)
        source = torch.zeros(shard_numel * ctx.num_shards, dtype=torch.float32, device=ctx.device)
        for slot in slots:
            if slot.param.is_meta:
                alias = torch.empty(0, device=ctx.device).set_(source.untyped_storage(), slot.offset, slot.param.shape)
                torch.utils.swap_tensors(slot.param, nn.Parameter(alias, requires_grad=slot.param.requires_grad))
            else:
                source[slot.offset : slot.offset + slot.numel].copy_(slot.param.detach().reshape(-1))
        plans.append((trainable, slots, shard_numel, source))

    if needs_init:
        _run_initializers(model, needs_init, ctx, seed)
    else:
        for _, _, _, source in plans:
            ctx.comm.broadcast(source, src=0)

    groups = [
        FlatParamGroup(slots, shard_numel, source, ctx, trainable=trainable, keep_gathered=keep_gathered,
                       optimizer_offloaded=optimizer_offloaded,
                       key=f"unit{index}/{'trainable' if trainable else 'frozen'}")
        for trainable, slots, shard_numel, source in plans
    ]  # fmt: skip
    return ShardedUnit(spec.name, spec.module, groups, is_root=spec.module is model)


def move_buffers(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for buffer in module.buffers(recurse=False):
            if buffer.is_meta:
                raise ValueError(
                    f"buffer of {type(module).__name__} is still on the meta device after initialization; "
                    "give the module a reset_parameters() that fills its buffers."
                )
            if buffer.device != device:
                torch.utils.swap_tensors(buffer, buffer.to(device))


def _has_meta_state(module: nn.Module) -> bool:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return any(t.is_meta for t in tensors)


def _initializer(model: nn.Module, module: nn.Module):
    # A root with `config` and `_init_weights(module)` (Hugging Face's convention) initializes
    # every submodule, rotary buffers included; other modules use their own reset_parameters.
    if callable(getattr(model, "_init_weights", None)) and hasattr(model, "config"):
        return lambda: model._init_weights(module)
    if callable(getattr(module, "reset_parameters", None)):
        return module.reset_parameters
    return None


def _run_initializers(model: nn.Module, modules: list[nn.Module], ctx: ShardingContext, seed: int) -> None:
    for module in modules:
        for buffer in module.buffers(recurse=False):
            if buffer.is_meta:
                torch.utils.swap_tensors(buffer, torch.empty_like(buffer, device=ctx.device))
    devices = [ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for module in modules:
            _initializer(model, module)()
