"""Read a DeepSpeed ZeRO checkpoint (stages 1, 2 and 3) as consolidated weights, by range.

The layout follows DeepSpeed's own `zero_to_fp32.py`:

- `*_optim_states.pt` (one per data-parallel rank) hold the fp32 master partitions. Stages 1
  and 2: per parameter group, the ranks' partitions (padding removed) concatenate to the group's
  flat vector, in which the parameters of `param_shapes` lie one after another, separated by
  `param_alignment_paddings`. Stage 3: every parameter is split on its own into
  ceil(numel / world_size) elements per rank (the last rank zero-padded); a rank's flat groups,
  concatenated, hold its part of each parameter in `param_shapes` order.
- `*_model_states.pt` hold buffers (in `module`), `param_shapes`, tied names (`shared_params`,
  alias -> stored name) and frozen parameters: whole (stage 2) or partitioned like stage 3.
  Stage 1 saves no frozen fragments; frozen parameters are then read from `module`.

Files are memory-mapped; DeepSpeed's own classes inside them (loss scaler, stage enum) are read
as plain stand-ins, so DeepSpeed need not be installed.
"""
from __future__ import annotations

import glob
import math
import os
import pickle
import re
from typing import Any, Optional

import torch

from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.sources import TensorSource


class DeepSpeedSource(TensorSource):
    def __init__(self, checkpoint_dir: str | os.PathLike, tag: Optional[str] = None):
        self.path = _tag_dir(os.fspath(checkpoint_dir), tag)
        optim_files = _files(self.path, "*_optim_states.pt")
        model_files = _files(self.path, "*_model_states.pt")
        optim = [_load(path)["optimizer_state_dict"] for path in optim_files]
        models = [_load(path) for path in model_files]
        if "zero_stage" not in optim[0]:
            raise CheckpointError(f"{optim_files[0]} is not a DeepSpeed ZeRO checkpoint (no zero_stage).")
        self.stage = int(optim[0]["zero_stage"])
        count = optim[0]["partition_count"]
        self.world_size = max(int(c) for c in count) if isinstance(count, (list, tuple)) else int(count)
        if self.world_size != len(optim_files):
            raise CheckpointError(
                f"{self.path} should hold {self.world_size} '*_optim_states.pt' files (one per rank) but holds "
                f"{len(optim_files)}; a rank's file is missing or the folder mixes two checkpoints."
            )
        first = models[0]
        if "buffer_names" not in first or first.get("param_shapes") is None:
            raise CheckpointError(f"{model_files[0]} is not a DeepSpeed ZeRO model states file (no param_shapes).")
        self.aliases = dict(first.get("shared_params") or {})
        self._buffers = {k: v for k, v in first["module"].items() if k in set(first["buffer_names"])}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._readers: dict[str, Any] = {}
        if self.stage <= 2:
            self._index_stage12(optim, first)
        elif self.stage == 3:
            self._index_stage3(optim, models)
        else:
            raise CheckpointError(f"{self.path}: unknown ZeRO stage {self.stage}.")
        for name, tensor in self._buffers.items():
            self._shapes[name] = tuple(tensor.shape)
            self._readers[name] = _Whole(tensor)

    # -- TensorSource ----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._readers)

    def has(self, name: str) -> bool:
        return name in self._readers

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._readers[name].dtype

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._readers[name].read(start, stop)

    # -- layouts ---------------------------------------------------------------------------------

    def _index_stage12(self, optim: list[dict], model: dict) -> None:
        partitions = [state["single_partition_of_fp32_groups"] for state in optim]
        paddings = optim[0].get("param_alignment_paddings")
        for group, shapes in enumerate(model["param_shapes"]):
            vector = _Concatenated([rank_partitions[group] for rank_partitions in partitions])
            offset = 0
            for position, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                self._shapes[name] = tuple(shape)
                self._readers[name] = _Slice(vector, offset, numel)
                offset += numel + (paddings[group][position] if paddings is not None else 0)
            align = 2 * self.world_size  # DeepSpeed pads each group to a multiple of 2 x world size
            if -(-offset // align) * align != -(-vector.numel // align) * align:
                raise CheckpointError(
                    f"{self.path}: parameter group {group} holds {vector.numel} elements but its parameters need "
                    f"{offset}; the checkpoint does not match its param_shapes."
                )
        fragments = model.get("frozen_param_fragments") or {}
        for name, shape in (model.get("frozen_param_shapes") or {}).items():
            self._shapes[name] = tuple(shape)
            self._readers[name] = _Whole(fragments[name])
        # Stage 1 saves no frozen fragments: the module state holds every parameter in full.
        known = set(self._readers) | set(self.aliases) | set(self._buffers)
        for name, tensor in model["module"].items():
            if name not in known and isinstance(tensor, torch.Tensor):
                self._shapes[name] = tuple(tensor.shape)
                self._readers[name] = _Whole(tensor)

    def _index_stage3(self, optim: list[dict], models: list[dict]) -> None:
        flats = [_Concatenated(list(state["fp32_flat_groups"])) for state in optim]
        shapes = {name: shape for group in models[0]["param_shapes"] for name, shape in group.items()}
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = -(-numel // self.world_size)
            self._shapes[name] = tuple(shape)
            self._readers[name] = _Partitioned([_Slice(flat, offset, part) for flat in flats], numel)
            offset += part
        if offset != flats[0].numel:
            raise CheckpointError(
                f"{self.path}: each rank holds {flats[0].numel} fp32 elements but the parameters need {offset}; the "
                "checkpoint does not match its param_shapes."
            )
        if len(models) != self.world_size and models[0].get("frozen_param_shapes"):
            raise CheckpointError(
                f"{self.path} should hold {self.world_size} '*_model_states.pt' files for its frozen parameters."
            )
        for name, shape in (models[0].get("frozen_param_shapes") or {}).items():
            numel = math.prod(shape)
            self._shapes[name] = tuple(shape)
            fragments = [_Whole(model["frozen_param_fragments"][name]) for model in models]
            self._readers[name] = _Partitioned(fragments, numel)


class _Whole:
    def __init__(self, tensor: torch.Tensor):
        self._flat = tensor.reshape(-1)
        self.numel = self._flat.numel()
        self.dtype = tensor.dtype

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self._flat[start:stop]


class _Concatenated:
    """1-D tensors read as if concatenated."""

    def __init__(self, parts: list[torch.Tensor]):
        self._parts = [part.reshape(-1) for part in parts]
        self._starts = [0]
        for part in self._parts:
            self._starts.append(self._starts[-1] + part.numel())
        self.numel = self._starts[-1]
        self.dtype = self._parts[0].dtype

    def read(self, start: int, stop: int) -> torch.Tensor:
        pieces = [
            part[max(start, lo) - lo : min(stop, hi) - lo]
            for part, lo, hi in zip(self._parts, self._starts, self._starts[1:])
            if lo < stop and start < hi
        ]
        if not pieces:
            return self._parts[0][:0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class _Slice:
    def __init__(self, base, offset: int, numel: int):
        self._base, self._offset, self.numel, self.dtype = base, offset, numel, base.dtype

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self._base.read(self._offset + start, self._offset + stop)


class _Partitioned:
    """A parameter split into equal consecutive parts, one per rank (the last one padded)."""

    def __init__(self, parts: list, numel: int):
        self._parts, self.numel, self.dtype = parts, numel, parts[0].dtype
        self._size = -(-numel // len(parts))

    def read(self, start: int, stop: int) -> torch.Tensor:
        pieces = []
        for rank, part in enumerate(self._parts):
            lo, hi = max(start, rank * self._size), min(stop, (rank + 1) * self._size, self.numel)
            if lo < hi:
                pieces.append(part.read(lo - rank * self._size, hi - rank * self._size))
        if not pieces:
            return torch.empty(0, dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _tag_dir(path: str, tag: Optional[str]) -> str:
    if not os.path.isdir(path):
        raise CheckpointError(f"DeepSpeed checkpoint directory {path} does not exist.")
    if tag is None and not glob.glob(os.path.join(path, "*_optim_states.pt")):
        latest = os.path.join(path, "latest")
        if not os.path.isfile(latest):
            raise CheckpointError(
                f"{path} holds no '*_optim_states.pt' files and no 'latest' file; pass the tag directory or tag=."
            )
        with open(latest, encoding="utf-8") as handle:
            tag = handle.read().strip()
    return path if tag is None else os.path.join(path, tag)


def _files(path: str, pattern: str) -> list[str]:
    def natural(text: str) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]

    files = sorted(glob.glob(os.path.join(path, pattern)), key=natural)
    if not files:
        raise CheckpointError(f"{path} holds no {pattern} files; it is not a DeepSpeed ZeRO checkpoint.")
    return files


class _StandIn:
    """Takes the place of a DeepSpeed class while unpickling (its fields are kept, unused)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __int__(self) -> int:  # ZeroStageEnum values
        return int(self.args[0])


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "deepspeed" or module.startswith("deepspeed."):
            return _StandIn
        return super().find_class(module, name)


class _StandInPickle:
    """A pickle module for torch.load whose unpickler stands in for DeepSpeed's classes."""

    __name__ = "zerokit_deepspeed_pickle"
    Unpickler = _Unpickler

    @staticmethod
    def load(handle, **kwargs):
        return _Unpickler(handle, **kwargs).load()


def _load(path: str) -> dict:
    # Not weights_only: DeepSpeed pickles its own objects (only stand-ins are created for them).
    # Import only checkpoints you trust, as with DeepSpeed itself.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False, pickle_module=_StandInPickle)
