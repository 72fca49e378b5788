"""Consolidated weights to read from, by element range: a state_dict in memory, safetensors or
torch files (single or sharded with a Hugging Face-style index), or a zerokit checkpoint.

Reads are ranged so a rank importing a model keeps only its shards: safetensors files are read
by rows through `safe_open`, torch files are memory-mapped.
"""
from __future__ import annotations

import json
import math
import os
import types
from typing import Any, Mapping, Union

import torch

from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.reader import CheckpointReader
from zerokit.checkpoint.snapshot import dtype_from_name

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
TIED_METADATA_KEY = "tied_weights"  # safetensors header: JSON {alias: stored name}


class TensorSource:
    """Named tensors readable by ranges of their flattened elements."""

    # alias -> stored name, for tied weights stored once
    aliases: Mapping[str, str] = types.MappingProxyType({})

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor `name`, 1-D, on the CPU."""
        raise NotImplementedError

    def resolve(self, name: str) -> str | None:
        """The stored name that `name` reads from, or None when the source lacks it."""
        if self.has(name):
            return name
        stored = self.aliases.get(name)
        return stored if stored is not None and self.has(stored) else None

    def read_full(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self.read(name, 0, math.prod(shape)).view(shape)


class DictSource(TensorSource):
    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self._tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}

    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name].detach().reshape(-1)[start:stop].cpu()


class TorchFilesSource(DictSource):
    """torch.save files of state_dicts, memory-mapped (tied names share a tensor, nothing to resolve)."""

    def __init__(self, files: list[str]):
        merged: dict[str, torch.Tensor] = {}
        for path in files:
            try:
                loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # saved in the legacy (non-zip) format, which cannot be memory-mapped
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, Mapping):
                raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state_dict.")
            merged.update(loaded)
        super().__init__(merged)


def import_safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError(
            "the safetensors package is not installed: pip install safetensors, or use torch files (format='torch')."
        ) from None
    return safetensors


class SafetensorsSource(TensorSource):
    def __init__(self, files: list[str]):
        safe_open = import_safetensors().safe_open
        self._handles = [safe_open(path, framework="pt") for path in files]
        self._owner: dict[str, Any] = {}
        aliases: dict[str, str] = {}
        for handle in self._handles:
            for name in handle.keys():
                self._owner[name] = handle
            tied = (handle.metadata() or {}).get(TIED_METADATA_KEY)
            if tied:
                aliases.update(json.loads(tied))
        self.aliases = aliases

    def names(self) -> list[str]:
        return list(self._owner)

    def has(self, name: str) -> bool:
        return name in self._owner

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._owner[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._owner[name].get_slice(name).get_dtype()]

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        shape = self.shape(name)
        if len(shape) == 0 or start >= stop:
            return self._owner[name].get_tensor(name).reshape(-1)[start:stop]
        row = math.prod(shape[1:])  # read whole rows around the range: safetensors slices by dimension
        first, last = start // row, -(-stop // row)
        rows = self._owner[name].get_slice(name)[first:last].reshape(-1)
        return rows[start - first * row : stop - first * row]


class CheckpointSource(TensorSource):
    """The weights of a zerokit checkpoint tag: fp32 masters (frozen parameters in their saved
    dtype) and buffers, in the model's state_dict order, tied parameters once."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        metadata = reader.metadata
        self.aliases = dict(metadata["tied"])
        self._parameters = metadata["parameters"]
        self._buffers = metadata["buffers"]
        self._order = [k for k in metadata["state_dict_keys"] if k not in self.aliases]

    def names(self) -> list[str]:
        return list(self._order)

    def has(self, name: str) -> bool:
        return name in self._parameters or name in self._buffers

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self._parameters.get(name) or self._buffers[name]
        return tuple(entry["shape"])

    def dtype(self, name: str) -> torch.dtype:
        if name in self._parameters:
            return self.reader.dtype(name)
        return dtype_from_name(self._buffers[name]["dtype"])

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self._parameters:
            return self.reader.read_range(name, start, stop)
        return self.reader.buffer(name).reshape(-1)[start:stop]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def open_consolidated(source: Union[Mapping[str, torch.Tensor], str, os.PathLike, TensorSource]) -> TensorSource:
    """A TensorSource for a state_dict, a weights file, or a folder of weights (with or without
    an index), as written by `zerokit export`, `save_pretrained` or torch.save."""
    if isinstance(source, TensorSource):
        return source
    if isinstance(source, Mapping):
        return DictSource(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        for index, kind in ((SAFE_INDEX, SafetensorsSource), (TORCH_INDEX, TorchFilesSource)):
            if os.path.isfile(os.path.join(path, index)):
                return kind(_indexed_files(os.path.join(path, index)))
        if os.path.isfile(os.path.join(path, SAFE_WEIGHTS)):
            return SafetensorsSource([os.path.join(path, SAFE_WEIGHTS)])
        if os.path.isfile(os.path.join(path, TORCH_WEIGHTS)):
            return TorchFilesSource([os.path.join(path, TORCH_WEIGHTS)])
        raise CheckpointError(
            f"{path} holds no weights: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {TORCH_WEIGHTS} or {TORCH_INDEX}."
        )
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist; pass a state_dict, a weights file or a folder of weights.")
    if path.endswith(".json"):
        files = _indexed_files(path)
        return SafetensorsSource(files) if files[0].endswith(".safetensors") else TorchFilesSource(files)
    if path.endswith(".safetensors"):
        return SafetensorsSource([path])
    return TorchFilesSource([path])


def read_state_dict(source: Union[str, os.PathLike, TensorSource]) -> dict[str, torch.Tensor]:
    """Every tensor of a consolidated source in full, tied names included (sharing one tensor),
    ready for `model.load_state_dict(..., strict=True)` on a plain model."""
    opened = open_consolidated(source)
    state = {name: opened.read_full(name) for name in opened.names()}
    for alias, name in opened.aliases.items():
        state[alias] = state[name]
    return state


def _indexed_files(index_path: str) -> list[str]:
    with open(index_path, encoding="utf-8") as handle:
        try:
            weight_map = json.load(handle)["weight_map"]
        except (ValueError, KeyError):
            raise CheckpointError(f"{index_path} is not a weights index (no weight_map).") from None
    folder = os.path.dirname(index_path)
    files = [os.path.join(folder, name) for name in dict.fromkeys(weight_map.values())]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise CheckpointError(f"{index_path} names files that do not exist: {', '.join(missing)}.")
    return files
