"""Export a checkpoint as one consolidated state_dict: safetensors (default) or torch files,
sharded by size with a Hugging Face-style index, so plain PyTorch and `from_pretrained` load it.

Tensors are streamed one at a time from the rank files into the output shard being built; at
most one output shard is in memory. Tied parameters are written once under their first name,
as `save_pretrained` writes them (safetensors cannot alias); the safetensors header records the
other names, and torch files store them as a second key of the same tensor.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Optional, Union

import torch

from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.files import fsync_directory, write_atomically, write_bytes_atomically
from zerokit.checkpoint.layout import LATEST, latest_tag
from zerokit.checkpoint.manifest import MANIFEST
from zerokit.checkpoint.reader import CheckpointReader
from zerokit.checkpoint.sources import (
    SAFE_INDEX, SAFE_WEIGHTS, TIED_METADATA_KEY, TORCH_INDEX, TORCH_WEIGHTS, CheckpointSource, TensorSource,
    import_safetensors,
)

FORMATS = ("safetensors", "torch")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")


def export_checkpoint(
    checkpoint: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    *,
    tag: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: Union[int, str] = "5GB",
    format: str = "safetensors",
    config: Union[str, os.PathLike, None] = None,
) -> list[str]:
    """Write the weights of a checkpoint (a checkpoint directory, whose `latest` tag is used
    unless `tag` is given, or one tag directory) to `out_dir`; floating-point tensors are cast
    to `dtype`. `config` (a Hugging Face config.json) is copied next to them. Returns the
    files written."""
    reader = CheckpointReader(resolve_tag_dir(checkpoint, tag))
    reader.verify(record.name for record in reader.manifest.files)
    source = CheckpointSource(reader)
    total_parameters = sum(math.prod(entry["shape"]) for entry in reader.parameters.values())
    written = write_consolidated(source, out_dir, dtype=dtype, max_shard_size=max_shard_size, format=format,
                                 total_parameters=total_parameters)
    if config is not None:
        target = os.path.join(os.fspath(out_dir), "config.json")
        shutil.copyfile(os.fspath(config), target)
        written.append(target)
    return written


def resolve_tag_dir(checkpoint: Union[str, os.PathLike], tag: Optional[str]) -> str:
    path = os.fspath(checkpoint)
    if tag is not None:
        return os.path.join(path, tag)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    found = latest_tag(path)
    if found is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint tag directory (no {MANIFEST}) nor a checkpoint directory with a "
            f"{LATEST!r} file; pass a tag directory or --tag."
        )
    return os.path.join(path, found)


def write_consolidated(
    source: TensorSource,
    out_dir: Union[str, os.PathLike],
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: Union[int, str] = "5GB",
    format: str = "safetensors",
    total_parameters: Optional[int] = None,
) -> list[str]:
    if format not in FORMATS:
        raise CheckpointError(f"export format {format!r} is unknown: use one of {', '.join(FORMATS)}.")
    limit = parse_size(max_shard_size)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    def out_dtype(name: str) -> torch.dtype:
        stored = source.dtype(name)
        return dtype if stored.is_floating_point else stored

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    sizes = {name: math.prod(source.shape(name)) * out_dtype(name).itemsize for name in source.names()}
    for name, size in sizes.items():
        if shards[-1] and shard_bytes + size > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    aliases_of: dict[str, list[str]] = {}
    for alias, name in source.aliases.items():
        aliases_of.setdefault(name, []).append(alias)

    single, index_name = (SAFE_WEIGHTS, SAFE_INDEX) if format == "safetensors" else (TORCH_WEIGHTS, TORCH_INDEX)
    stem, suffix = single.rsplit(".", 1)
    file_names = [single] if len(shards) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{suffix}" for i in range(len(shards))
    ]
    written, weight_map = [], {}
    for file_name, names in zip(file_names, shards):
        tensors = {name: _compact(source.read_full(name).to(out_dtype(name))) for name in names}
        tied = {alias: name for name in names for alias in aliases_of.get(name, [])}
        path = os.path.join(out_dir, file_name)
        _write_shard(path, tensors, tied, format)
        written.append(path)
        weight_map.update({name: file_name for name in names})
        if format == "torch":
            weight_map.update({alias: file_name for alias in tied})
        del tensors
    keep = set(file_names)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        if total_parameters is not None:
            index["metadata"]["total_parameters"] = total_parameters
        path = os.path.join(out_dir, index_name)
        write_bytes_atomically(path, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        written.append(path)
        keep.add(index_name)
    _remove_stale_weights(out_dir, keep)
    return written


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as "5GB" (10^9) or "2GiB" (2^30)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if match is None or match.group(2) not in _UNITS:
            raise CheckpointError(f"max shard size {size!r} is not a size: write it like 5GB, 500MB or 2GiB.")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise CheckpointError(f"max shard size {size!r} must be positive.")
    return value


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its elements: torch.save writes a view's whole storage."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _write_shard(path: str, tensors: dict[str, torch.Tensor], tied: dict[str, str], format: str) -> None:
    if format == "safetensors":
        save_file = import_safetensors().torch.save_file
        metadata = {"format": "pt"}
        if tied:
            metadata[TIED_METADATA_KEY] = json.dumps(tied)
        directory, name = os.path.split(path)
        temporary = os.path.join(directory, f".{name}.tmp")
        save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(directory)
    else:
        state = dict(tensors)
        state.update({alias: tensors[name] for alias, name in tied.items()})
        write_atomically(path, lambda handle: torch.save(state, handle))


def _remove_stale_weights(out_dir: str, keep: set[str]) -> None:
    """Weight files of an earlier export to the same folder would confuse loaders."""
    for name in os.listdir(out_dir):
        stale = name in (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX) or _SHARD.fullmatch(name)
        if stale and name not in keep:
            os.remove(os.path.join(out_dir, name))
