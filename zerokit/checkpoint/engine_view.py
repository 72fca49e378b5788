"""What checkpointing needs to know about an engine: parameter names, this rank's element
ranges of each flattened parameter, the optimizer piece that steps each range (and its state),
and buffers.

The one place that reads the engine's sharding internals, so the rest of the package works
with parameter names and element ranges only. Under offload the values and optimizer states of
a range are read from and written to host memory or NVMe one range at a time: nothing gathers a
rank's states, let alone the model, in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from zerokit.checkpoint.errors import CheckpointError
from zerokit.zero.flat_group import FlatParamGroup


@dataclass(frozen=True)
class ShardEntry:
    """This rank's part [start, stop) of one flattened parameter."""

    name: str
    group: FlatParamGroup
    slot_index: int
    start: int
    stop: int
    optimizer_param: Optional[nn.Parameter]  # the piece the optimizer steps; None when frozen or not optimized
    piece_index: Optional[int] = None  # its index in the group's pieces

    def values(self) -> torch.Tensor:
        """This rank's values, 1-D (fp32 master, or compute dtype when frozen): a view where they
        are in memory, a copy where they are on NVMe."""
        return self.group.shard_values(self.slot_index)

    def write_values(self, values: torch.Tensor) -> None:
        self.group.set_shard_values(self.slot_index, values)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state of this range, as torch.optim keeps it ({} before a first step)."""
        if self.optimizer_param is None:
            return {}
        if self.group.host_optimizer is None:
            return optimizer.state.get(self.optimizer_param, {})
        piece = self.group.pieces[self.piece_index]
        return self.group.host_optimizer.piece_state(self.piece_index, piece.start, piece.stop)

    def load_optimizer_state(self, state: dict) -> None:
        """Offloaded optimizers only: set this range's state (torch.optim's form)."""
        piece = self.group.pieces[self.piece_index]
        self.group.host_optimizer.load_piece_state(self.piece_index, piece.start, piece.stop, state)


@dataclass(frozen=True)
class ParameterInfo:
    name: str
    shape: tuple[int, ...]
    trainable: bool
    aliases: tuple[str, ...]  # other names of a tied parameter


class EngineView:
    def __init__(self, engine):
        self.engine = engine
        engine.finish_optimizer_step()  # states are read and written only between steps
        module: nn.Module = engine.module
        self.groups: list[FlatParamGroup] = [group for unit in engine._runtime.units for group in unit.groups]
        slot_of = {id(slot.param): (group, index) for group in self.groups for index, slot in enumerate(group.slots)}

        names: dict[int, list[str]] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        self.parameters: list[ParameterInfo] = []
        slot_by_name: dict[str, tuple[FlatParamGroup, int]] = {}
        for name, param in module.named_parameters():
            group, index = slot_of[id(param)]
            self.parameters.append(ParameterInfo(name, tuple(param.shape), group.trainable, tuple(names[id(param)][1:])))
            slot_by_name[name] = (group, index)

        parameter_names = {n for all_names in names.values() for n in all_names}
        state = module.state_dict(keep_vars=True)
        self.state_dict_keys: list[str] = list(state)
        self.buffers: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key in parameter_names:
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"the model's state_dict entry {key!r} is a {type(value).__name__}, not a tensor (module extra "
                    "state); zerokit checkpoints hold tensors only."
                )
            self.buffers[key] = value

        optimizer_piece: dict[tuple[int, int], tuple[int, nn.Parameter]] = {
            (id(group), piece.slot_index): (index, param)
            for group in self.groups if group.trainable
            for index, (piece, param) in enumerate(zip(group.pieces, group.optimizer_params))
        }
        optimized = {id(p): index for index, g in enumerate(engine.optimizer.param_groups) for p in g["params"]}
        self.optimizer_group_of: dict[str, int] = {}  # optimizer param group of each optimized entry
        self.entries: list[ShardEntry] = []
        # Replicated shards (stage 0) are written by rank 0 alone.
        self.writes_shards = engine._ctx.num_shards > 1 or engine.rank == 0
        for info in self.parameters:
            group, index = slot_by_name[info.name]
            owned = group.owned_range(index)
            if owned is None:
                continue
            piece_index, piece = optimizer_piece.get((id(group), index), (None, None))
            piece = piece if piece is not None and id(piece) in optimized else None
            if piece is not None:
                self.optimizer_group_of[info.name] = optimized[id(piece)]
            self.entries.append(ShardEntry(info.name, group, index, owned[0], owned[1], piece, piece_index))

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        """Load a torch optimizer state_dict over this rank's pieces (numbered as the optimizer's
        param_groups list them): the hyper-parameters, and the states of pieces stepped on the
        device, into the optimizer itself; under optimizer offload each offloaded piece's state
        into the offloaded store."""
        optimizer = self.engine.optimizer
        entry_of = {id(e.optimizer_param): e for e in self.entries if e.optimizer_param is not None}
        entries = [entry_of.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
        offloaded = {i: e for i, e in enumerate(entries) if e is not None and e.group.host_optimizer is not None}
        on_device = {index: state for index, state in state_dict["state"].items() if index not in offloaded}
        optimizer.load_state_dict({"state": on_device, "param_groups": state_dict["param_groups"]})
        for index, entry in offloaded.items():
            entry.load_optimizer_state(state_dict["state"].get(index, {}))

    @property
    def aliases(self) -> dict[str, str]:
        """Tied parameters: every other name -> the name the parameter is saved under."""
        return {alias: info.name for info in self.parameters for alias in info.aliases}
