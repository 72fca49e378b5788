"""Choosing the sharding units of a model and which parameters each one owns.

A unit is a module whose parameters are gathered, freed and reduced together: by default the
repeated blocks of every ModuleList (transformer layers), else each direct child of the model
that has parameters. The model itself is the root unit and owns every parameter outside the
units, and every parameter that two units share (tied weights), so no parameter is owned twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class UnitSpec:
    name: str  # module path, "" for the root
    module: nn.Module
    params: tuple[tuple[str, nn.Parameter], ...]  # owned parameters with their first path
    # Modules whose own parameters or buffers belong to this unit: these run their initializer
    # when the unit is materialized from the meta device.
    init_modules: tuple[nn.Module, ...]

    @property
    def trainable_numel(self) -> int:
        return sum(p.numel() for _, p in self.params if p.requires_grad)


def plan_units(model: nn.Module, unit_classes: tuple[str, ...] = ()) -> list[UnitSpec]:
    """The units of `model`, root last; units left without parameters are dropped."""
    chosen = _choose_unit_modules(model, unit_classes)
    index_of = {id(module): i for i, (_, module) in enumerate(chosen)}
    root = len(chosen)
    owners: dict[int, set[int]] = {}
    first_seen: dict[int, tuple[str, nn.Parameter]] = {}
    module_unit: dict[int, tuple[nn.Module, int]] = {}

    def visit(module: nn.Module, prefix: str, unit: int) -> None:
        module_unit.setdefault(id(module), (module, unit))
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), set()).add(unit)
            first_seen.setdefault(id(param), (prefix + name, param))
        for child_name, child in module.named_children():
            visit(child, f"{prefix}{child_name}.", index_of.get(id(child), unit))

    visit(model, "", root)

    def owner(param: nn.Parameter) -> int:
        units = owners[id(param)]
        return next(iter(units)) if len(units) == 1 else root

    params_of: dict[int, list[tuple[str, nn.Parameter]]] = {i: [] for i in range(root + 1)}
    for name, param in first_seen.values():
        params_of[owner(param)].append((name, param))

    init_of: dict[int, list[nn.Module]] = {i: [] for i in range(root + 1)}
    for module, unit in module_unit.values():
        own = [owner(p) for _, p in module.named_parameters(recurse=False)]
        if own:
            # a module whose parameters were promoted to the root initializes with the root
            init_of[root if root in own else own[0]].append(module)
        elif next(module.buffers(recurse=False), None) is not None:
            init_of[unit].append(module)

    names = [name for name, _ in chosen] + [""]
    modules = [module for _, module in chosen] + [model]
    return [
        UnitSpec(names[i], modules[i], tuple(params_of[i]), tuple(init_of[i]))
        for i in range(root + 1)
        if params_of[i] or i == root
    ]


def in_forward_order(units: Sequence[T]) -> list[T]:
    """Units listed as plan_units lists them (root last), or what stands for each, in the order a
    forward first uses them: the root's forward begins first (embeddings), then the units in
    module order."""
    return [*units[-1:], *units[:-1]]


def _choose_unit_modules(model: nn.Module, unit_classes: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    chosen: list[tuple[str, nn.Module]] = []

    def is_repeated_block(parent: nn.Module, child: nn.Module) -> bool:
        return (
            isinstance(parent, nn.ModuleList)
            and len(parent) > 1
            and len({type(m) for m in parent}) == 1
            and next(child.parameters(), None) is not None
        )

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            wanted = type(child).__name__ in unit_classes if unit_classes else is_repeated_block(module, child)
            if wanted:
                chosen.append((path, child))  # outermost only: a unit's inside is not split further
            else:
                visit(child, path + ".")

    visit(model, "")
    if unit_classes and not chosen:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"zero_optimization.shard_unit_classes={list(unit_classes)} matches no module of the model; "
            f"module classes present: {', '.join(present)}."
        )
    if not chosen:
        chosen = [(name, child) for name, child in model.named_children() if next(child.parameters(), None) is not None]
    return chosen
