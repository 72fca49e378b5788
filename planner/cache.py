"""On-disk cache of plans, so a run with the same model, inputs and device skips re-planning.

Each plan is one JSON file named by its key. Files are written atomically (temporary file,
fsync, rename), so a crash leaves either the old file or the new one. A file that cannot be
read back as a valid plan is reported with a PlanCacheWarning and treated as a miss: the
caller re-plans and the next store replaces it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from planner.bilevel import IterationPlan
from planner.plan import OffsetPlan, verify_plan

SCHEMA_VERSION = 1

Plan = Union[OffsetPlan, IterationPlan]
_KINDS: dict[str, type] = {"offset_plan": OffsetPlan, "iteration_plan": IterationPlan}
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,200}")


class PlanCacheWarning(UserWarning):
    """A cached plan file was unreadable or invalid and was ignored."""


def device_name(device: torch.device | str) -> str:
    """A name for the kind of device a plan was made for: the GPU model on CUDA, else the type."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def plan_key(
    model: torch.nn.Module,
    input_shapes: Sequence[Sequence[int]],
    dtype: torch.dtype,
    device: str,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A stable hex key for a plan: model class, the classes of its submodules (an activation swap
    changes the plan but no parameter), parameter shapes, input shapes, dtype, device name (see
    :func:`device_name`), and any JSON-serialisable planner settings in ``extra``."""
    identity = {
        "schema_version": SCHEMA_VERSION,
        "model": _class_name(model),
        "modules": [[name, _class_name(module)] for name, module in model.named_modules()],
        "parameters": [[name, list(p.shape)] for name, p in model.named_parameters()],
        "inputs": [[int(size) for size in shape] for shape in input_shapes],
        "dtype": str(dtype),
        "device": str(device),
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    except TypeError as error:
        raise TypeError(f"plan_key: extra must hold JSON-serialisable values ({error})") from error
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _class_name(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def default_cache_dir() -> Path:
    """$ZEROKIT_PLAN_CACHE, else $XDG_CACHE_HOME/zerokit/plans, else ~/.cache/zerokit/plans."""
    explicit = os.environ.get("ZEROKIT_PLAN_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zerokit" / "plans"


class PlanCache:
    """Plans stored as ``<directory>/<key>.json``."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        """Where the plan for ``key`` is stored."""
        if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
            raise ValueError(f"cache key must be a non-empty string of letters, digits, '-' or '_', got {key!r}")
        return self.directory / f"{key}.json"

    def load(self, key: str) -> Plan | None:
        """The plan stored under ``key``, or None when absent or invalid (with a warning)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with open(path, encoding="utf-8") as file:
                document = json.load(file)
            plan = _decode(document, key)
            verify_plan(plan if isinstance(plan, OffsetPlan) else plan.plan)
        except (OSError, ValueError) as error:
            warnings.warn(f"ignoring plan cache file {path}: {error}; the plan will be made again", PlanCacheWarning)
            return None
        return plan

    def store(self, key: str, plan: Plan) -> Path:
        """Write ``plan`` under ``key`` atomically and return the file's path."""
        path = self.path(key)
        document = {"schema_version": SCHEMA_VERSION, "key": key, "kind": _kind_of(plan), "plan": plan.to_dict()}
        self.directory.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                json.dump(document, file, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        _fsync_directory(self.directory)
        return path

    def load_or_make(self, key: str, make: Callable[[], Plan]) -> Plan:
        """The cached plan, or ``make()``'s plan, stored for next time."""
        plan = self.load(key)
        if plan is None:
            plan = make()
            self.store(key, plan)
        return plan


def _kind_of(plan: Plan) -> str:
    for kind, cls in _KINDS.items():
        if isinstance(plan, cls):
            return kind
    raise TypeError(f"can only cache OffsetPlan or IterationPlan, got {type(plan).__name__}")


def _decode(document: Any, key: str) -> Plan:
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"schema version {version!r}, expected {SCHEMA_VERSION}")
    if document.get("key") != key:
        raise ValueError(f"file holds key {document.get('key')!r}, not {key!r}")
    kind = document.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown plan kind {kind!r}")
    return _KINDS[kind].from_dict(document.get("plan"))


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; some platforms cannot open directories, which is harmless."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
