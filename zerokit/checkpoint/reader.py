"""Reading one complete checkpoint tag by parameter element ranges.

Rank files are opened memory-mapped, so reading a range touches only its pages: a rank that
loads a resharded checkpoint reads just the ranges it owns under the new layout.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Any, Iterable, Optional

import torch
from torch.utils._pytree import tree_map

from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.layout import METADATA, rank_file
from zerokit.checkpoint.manifest import check_present, read_manifest, verify_checksums
from zerokit.checkpoint.metadata import METADATA_VERSION
from zerokit.checkpoint.snapshot import dtype_from_name


class CheckpointReader:
    def __init__(self, tag_dir: str):
        """Opens a tag after checking that it is complete, that every file it lists is present
        with its saved size, and that its metadata is intact."""
        if not os.path.isdir(tag_dir):
            raise CheckpointError(f"checkpoint {tag_dir} does not exist.")
        self.tag_dir = tag_dir
        self.manifest = read_manifest(tag_dir)
        check_present(tag_dir, self.manifest)
        verify_checksums(tag_dir, self.manifest, [METADATA])
        with open(os.path.join(tag_dir, METADATA), encoding="utf-8") as handle:
            self.metadata: dict[str, Any] = json.load(handle)
        if self.metadata.get("format_version", 0) > METADATA_VERSION:
            raise CheckpointError(
                f"checkpoint {tag_dir} was written by zerokit {self.metadata.get('zerokit_version')} in a newer format; "
                "upgrade zerokit to load it."
            )
        self._verified = {METADATA}
        self._open: dict[str, dict[str, Any]] = {}

    @property
    def tag(self) -> str:
        return self.manifest.tag

    @property
    def world_size(self) -> int:
        return int(self.metadata["world_size"])

    @property
    def parameters(self) -> dict[str, dict[str, Any]]:
        return self.metadata["parameters"]

    def verify(self, names: Iterable[str]) -> None:
        """Checksum the files `names` (each once)."""
        pending = set(names) - self._verified
        verify_checksums(self.tag_dir, self.manifest, pending)
        self._verified |= pending

    def files_for(self, name: str, start: int, stop: int) -> set[str]:
        return {p["file"] for p in self.parameters[name]["pieces"] if p["start"] < stop and start < p["stop"]}

    def dtype(self, name: str) -> torch.dtype:
        return dtype_from_name(self.parameters[name]["dtype"] or "float32")

    def state_keys(self, name: str) -> list[str]:
        """The element-wise optimizer state keys saved for parameter `name`."""
        pieces = self.parameters[name]["pieces"]
        if not pieces:
            return []
        return list(self._record(pieces[0]["file"], name).get("optimizer", {}))

    def copy_range(self, name: str, start: int, stop: int, out: torch.Tensor, state_key: Optional[str] = None) -> None:
        """Fill the 1-D `out` with elements [start, stop) of parameter `name` (or of its
        optimizer state `state_key`), from whichever files hold them."""
        covered = 0
        for piece in self.parameters[name]["pieces"]:
            lo, hi = max(start, piece["start"]), min(stop, piece["stop"])
            if lo >= hi:
                continue
            record = self._record(piece["file"], name)
            try:
                source = record["values"] if state_key is None else record["optimizer"][state_key]
            except KeyError:
                raise CheckpointError(
                    f"{os.path.join(self.tag_dir, piece['file'])} has no optimizer state {state_key!r} for {name}, "
                    "though other pieces of it do; the checkpoint is inconsistent."
                ) from None
            out[lo - start : hi - start].copy_(source[lo - piece["start"] : hi - piece["start"]])
            covered += hi - lo
        if covered != stop - start:
            raise CheckpointError(
                f"checkpoint {self.tag_dir} holds {covered} of elements [{start}, {stop}) of {name}; its metadata "
                "and files disagree (damaged checkpoint)."
            )

    def read_range(self, name: str, start: int, stop: int, state_key: Optional[str] = None) -> torch.Tensor:
        dtype = self.dtype(name) if state_key is None else self._state_dtype(name, state_key)
        out = torch.empty(stop - start, dtype=dtype)
        self.copy_range(name, start, stop, out, state_key)
        return out

    def optimizer_scalars(self, name: str) -> dict[str, Any]:
        """Non element-wise optimizer state of `name` (such as `step`), as saved with its first piece."""
        pieces = self.parameters[name]["pieces"]
        record = self._record(pieces[0]["file"], name)
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in record.get("optimizer_scalars", {}).items()}

    def buffer(self, name: str) -> torch.Tensor:
        return self._load(self.metadata["buffers"][name]["file"])["buffers"][name]

    def client_state(self, rank: int) -> Any:
        """Rank `rank`'s client_state, its tensors copied out of the memory-mapped file."""
        saved = self._load(rank_file(rank))["client_state"]
        return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, saved)

    def _state_dtype(self, name: str, key: str) -> torch.dtype:
        first = self.parameters[name]["pieces"][0]
        return self._record(first["file"], name)["optimizer"][key].dtype

    def _record(self, file: str, name: str) -> dict[str, Any]:
        try:
            return self._load(file)["parameters"][name]
        except KeyError:
            raise CheckpointError(
                f"{os.path.join(self.tag_dir, file)} holds no record for {name}, though the metadata says it does; "
                "the checkpoint is inconsistent."
            ) from None

    def _load(self, file: str) -> dict[str, Any]:
        if file not in self._open:
            self.verify([file])
            path = os.path.join(self.tag_dir, file)
            try:
                self._open[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except pickle.UnpicklingError as error:
                raise CheckpointError(
                    f"{path} cannot be read safely: {str(error).splitlines()[0]}. Its client_state holds objects other "
                    "than Python values and tensors; store plain values (numbers, strings, lists, dicts, tensors)."
                ) from None
        return self._open[file]
