"""Typed, frozen configuration with DeepSpeed-compatible key names.

A DeepSpeed user can bring their JSON: every key zerokit implements keeps DeepSpeed's name and
meaning, DeepSpeed tuning knobs that have no meaning in zerokit's design are accepted and listed
once in the log, and anything else is an error that names the nearest valid key.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import json
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from zerokit.activations.config import ActivationMemoryConfig
from zerokit.nn.config import WTACRSConfig

logger = logging.getLogger("zerokit")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says how to fix it."""


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class Fp16Config:
    enabled: bool = False
    loss_scale: float = 0.0  # 0 selects dynamic loss scaling, as in DeepSpeed
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0

    def __post_init__(self):
        _check(self.loss_scale >= 0, "fp16.loss_scale", self.loss_scale, "0 (dynamic) or a positive scale")
        _check(self.loss_scale_window >= 1, "fp16.loss_scale_window", self.loss_scale_window, "an integer >= 1")
        _check(self.hysteresis >= 1, "fp16.hysteresis", self.hysteresis, "an integer >= 1")
        _check(self.min_loss_scale > 0, "fp16.min_loss_scale", self.min_loss_scale, "a positive number")


@dataclass(frozen=True)
class Bf16Config:
    enabled: bool = False


@dataclass(frozen=True)
class OptimizerConfig:
    type: str = "AdamW"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "params", _frozen_mapping(self.params))


@dataclass(frozen=True)
class SchedulerConfig:
    type: str = "WarmupLR"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "params", _frozen_mapping(self.params))


OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass(frozen=True)
class OffloadOptimizerConfig:
    """ZeRO-Offload: this rank's fp32 master weights and Adam moments live in host memory (cpu)
    or in swap files under nvme_path (nvme), and the CPU steps them; the device keeps only the
    parameters in compute dtype."""

    device: str = "none"
    nvme_path: Optional[str] = None
    # Pin the host buffers that DMA copies touch (gradient shards, parameter uploads).
    pin_memory: bool = True
    # Pinned buffers that carry updated parameters to the device (and gradients being
    # accumulated) while the CPU works on the next tile.
    buffer_count: int = 4
    # The fraction of the model's trainable optimizer elements offloaded, by whole sharding units
    # (ZeRO-Offload++'s Twin-Flow): the units a forward uses last go to the CPU, the first keep
    # their optimizer on the device. Less CPU work per step for more device memory.
    ratio: float = 1.0
    # zerokit: elements of one optimizer tile, the unit of CPU work, NVMe swapping and upload.
    tile_size: int = 1 << 23
    # zerokit: step on a background thread, units in forward order, so the next forward starts
    # at once and each unit waits only for the parameters it gathers (its own, and under stage 3
    # those it prefetches). Results are identical.
    overlap_step: bool = True
    # zerokit: ZeRO-Offload's one-step delayed parameter update from this optimizer step on
    # (null: never). Forward and backward then run on the parameters of the step before while
    # the CPU steps, hiding the CPU step; updates arrive one step late (not exact).
    delayed_parameter_update_after: Optional[int] = None

    def __post_init__(self):
        _check_offload_device("offload_optimizer", self.device, self.nvme_path)
        _check(self.buffer_count >= 2, "zero_optimization.offload_optimizer.buffer_count", self.buffer_count,
               "an integer >= 2 (one buffer is filled while another is copied)")
        _check(0.0 < self.ratio <= 1.0, "zero_optimization.offload_optimizer.ratio", self.ratio,
               "a fraction in (0, 1]: 1.0 offloads the whole optimizer")
        if self.ratio < 1.0 and self.device == "none":
            raise ConfigError(
                f"zero_optimization.offload_optimizer.ratio={self.ratio!r} but offload_optimizer.device is none; "
                "ratio applies to optimizer offload: set offload_optimizer.device cpu or nvme, or remove ratio."
            )
        _check(self.tile_size >= 16, "zero_optimization.offload_optimizer.tile_size", self.tile_size,
               "an integer >= 16 (elements)")
        after = self.delayed_parameter_update_after
        _check(after is None or after >= 0, "zero_optimization.offload_optimizer.delayed_parameter_update_after",
               after, "an optimizer step >= 0, or null for exact updates")
        if after is not None and self.device == "none":
            raise ConfigError(
                "zero_optimization.offload_optimizer.delayed_parameter_update_after delays the CPU's optimizer "
                "step, but offload_optimizer.device is none: set device cpu or nvme, or remove "
                "delayed_parameter_update_after."
            )
        if after is not None and self.ratio < 1.0:
            raise ConfigError(
                f"zero_optimization.offload_optimizer.delayed_parameter_update_after delays the offloaded units' "
                f"updates by a step, but ratio={self.ratio!r} steps the other units on the device at once, which would "
                "mix delayed and current parameters in one model: set ratio 1.0 or remove "
                "delayed_parameter_update_after."
            )


@dataclass(frozen=True)
class OffloadParamConfig:
    """ZeRO-Infinity (stage 3): this rank's parameter shards live in host memory (cpu) or in
    swap files under nvme_path (nvme) and are copied to the device to be gathered."""

    device: str = "none"
    nvme_path: Optional[str] = None
    pin_memory: bool = True
    # nvme: shards read ahead of their use, each into its own pinned buffer.
    buffer_count: int = 5
    # nvme: the most elements one staging buffer may hold; every sharding unit's shard must
    # fit. Buffers are allocated at the size of the largest shard, not at this size.
    buffer_size: int = 100_000_000
    # nvme: elements of parameter shards kept in host memory instead (the first units).
    max_in_cpu: int = 1_000_000_000

    def __post_init__(self):
        _check_offload_device("offload_param", self.device, self.nvme_path)
        _check(self.buffer_count >= 1, "zero_optimization.offload_param.buffer_count", self.buffer_count,
               "an integer >= 1")
        _check(self.buffer_size >= 1, "zero_optimization.offload_param.buffer_size", self.buffer_size,
               "a positive integer (elements)")
        _check(self.max_in_cpu >= 0, "zero_optimization.offload_param.max_in_cpu", self.max_in_cpu,
               "an integer >= 0 (elements)")


def _check_offload_device(section: str, device: str, nvme_path: Optional[str]) -> None:
    _check(device in OFFLOAD_DEVICES, f"zero_optimization.{section}.device", device, "none, cpu or nvme")
    if device == "nvme" and not nvme_path:
        raise ConfigError(
            f"zero_optimization.{section}.device is nvme but no nvme_path is set: give the directory on a local "
            "NVMe drive that should hold the swap files."
        )


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = 0
    # Communication on its own CUDA streams, overlapped with compute; False serialises it
    # on the compute stream (useful when debugging).
    overlap_comm: bool = True
    # Elements of gradient reduction allowed in flight before backward waits for the oldest:
    # bounds the memory of pending reduce-scatter buffers.
    reduce_bucket_size: int = 500_000_000
    # Stage 3: elements of parameters gathered ahead of the module that needs them.
    stage3_prefetch_bucket_size: int = 50_000_000
    # Stage 3: sharding units with fewer elements than this stay gathered (no per-use
    # all-gather), while their gradients and optimizer states stay sharded.
    stage3_param_persistence_threshold: int = 100_000
    # Stage 3: prefetching stops while this many parameter elements are gathered.
    stage3_max_live_parameters: int = 1_000_000_000
    # zerokit: with gradient accumulation, reduce only at the accumulation boundary (as FSDP's
    # no_sync): less communication, but unsharded gradients live between micro-steps.
    # Stage 1 always behaves this way.
    reduce_at_boundary_only: bool = False
    # zerokit: class names of the modules that become sharding units. Empty: the repeated
    # blocks of every ModuleList (transformer layers), else each direct child with parameters.
    shard_unit_classes: tuple[str, ...] = ()
    offload_optimizer: OffloadOptimizerConfig = field(default_factory=OffloadOptimizerConfig)
    offload_param: OffloadParamConfig = field(default_factory=OffloadParamConfig)
    # zerokit: bytes of host memory this rank's offload may hold (masters, moments, gradient and
    # parameter shards, staging buffers); checked before anything is allocated. None: no limit.
    host_memory_budget: Optional[int] = None

    def __post_init__(self):
        _check(self.stage in (0, 1, 2, 3), "zero_optimization.stage", self.stage, "0, 1, 2 or 3")
        if self.offload_param.device != "none" and self.stage != 3:
            raise ConfigError(
                f"zero_optimization.offload_param.device={self.offload_param.device!r} needs stage 3 (only stage 3 "
                f"shards parameters), but zero_optimization.stage is {self.stage}: set the stage to 3 or remove "
                "offload_param."
            )
        if self.offload_optimizer.delayed_parameter_update_after is not None and self.offload_param.device != "none":
            raise ConfigError(
                "zero_optimization.offload_optimizer.delayed_parameter_update_after needs the parameters on the "
                f"device, but offload_param.device is {self.offload_param.device!r}: remove one of the two."
            )
        if self.offload_optimizer.delayed_parameter_update_after is not None and not self.offload_optimizer.overlap_step:
            raise ConfigError(
                "zero_optimization.offload_optimizer.delayed_parameter_update_after steps behind the next forward "
                "and backward: set offload_optimizer.overlap_step true or remove delayed_parameter_update_after."
            )
        if self.offload_optimizer.device != "none" and self.stage == 0:
            raise ConfigError(
                f"zero_optimization.offload_optimizer.device={self.offload_optimizer.device!r} needs sharded "
                "optimizer states: set zero_optimization.stage to 1, 2 or 3."
            )
        _check(self.host_memory_budget is None or self.host_memory_budget >= 1, "zero_optimization.host_memory_budget",
               self.host_memory_budget, "a positive number of bytes, or null for no limit")
        for name in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters"):
            _check(getattr(self, name) >= 1, f"zero_optimization.{name}", getattr(self, name), "a positive integer")
        _check(
            self.stage3_param_persistence_threshold >= 0,
            "zero_optimization.stage3_param_persistence_threshold",
            self.stage3_param_persistence_threshold,
            "an integer >= 0",
        )


_DTYPES = types.MappingProxyType({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16})


@dataclass(frozen=True)
class Config:
    train_batch_size: Optional[int] = None
    train_micro_batch_size_per_gpu: Optional[int] = None
    gradient_accumulation_steps: Optional[int] = None
    gradient_clipping: float = 0.0
    # dtype of gradient reduction; fp32 keeps reductions exact-ish whatever the compute dtype
    communication_data_type: str = "fp32"
    steps_per_print: int = 0  # 0: the engine logs nothing by itself
    fp16: Fp16Config = field(default_factory=Fp16Config)
    bf16: Bf16Config = field(default_factory=Bf16Config)
    optimizer: Optional[OptimizerConfig] = None
    scheduler: Optional[SchedulerConfig] = None
    zero_optimization: ZeroConfig = field(default_factory=ZeroConfig)
    # zerokit: WTA-CRS linear layers (sampled activations for the weight gradient)
    wtacrs: Optional[WTACRSConfig] = None
    # zerokit: how transformer blocks keep activations for backward (MEMO swapping/recomputation)
    activation_memory: Optional[ActivationMemoryConfig] = None

    def __post_init__(self):
        if self.fp16.enabled and self.bf16.enabled:
            raise ConfigError("fp16.enabled and bf16.enabled are both true: enable at most one of them.")
        _check(self.gradient_clipping >= 0, "gradient_clipping", self.gradient_clipping, "0 (off) or a positive max norm")
        _check(self.communication_data_type in _DTYPES, "communication_data_type", self.communication_data_type,
               "one of " + ", ".join(_DTYPES))
        _check(self.steps_per_print >= 0, "steps_per_print", self.steps_per_print, "an integer >= 0")
        for name in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "a positive integer")

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.bf16.enabled:
            return torch.bfloat16
        if self.fp16.enabled:
            return torch.float16
        return torch.float32

    @property
    def reduce_dtype(self) -> torch.dtype:
        return _DTYPES[self.communication_data_type]

    @property
    def accumulation_steps(self) -> int:
        return self.gradient_accumulation_steps or 1

    def resolve_batch(self, world_size: int) -> "Config":
        """Fill the batch triple as DeepSpeed does: any two of (total, micro, accumulation) fix the third."""
        total, micro, accum = (
            self.train_batch_size,
            self.train_micro_batch_size_per_gpu,
            self.gradient_accumulation_steps,
        )
        if total is not None and micro is not None and accum is not None:
            if total != micro * accum * world_size:
                raise ConfigError(
                    f"train_batch_size={total} but train_micro_batch_size_per_gpu={micro} x "
                    f"gradient_accumulation_steps={accum} x world size {world_size} = {micro * accum * world_size}; "
                    "make them agree or drop train_batch_size."
                )
        elif total is not None and micro is not None:
            accum, remainder = divmod(total, micro * world_size)
            if remainder or accum == 0:
                raise ConfigError(
                    f"train_batch_size={total} is not a multiple of train_micro_batch_size_per_gpu={micro} x "
                    f"world size {world_size}; change one of them."
                )
        elif total is not None:
            accum = accum or 1
            micro, remainder = divmod(total, accum * world_size)
            if remainder or micro == 0:
                raise ConfigError(
                    f"train_batch_size={total} is not a multiple of gradient_accumulation_steps={accum} x "
                    f"world size {world_size}; change one of them."
                )
        elif micro is not None:
            accum = accum or 1
            total = micro * accum * world_size
        return dataclasses.replace(
            self, train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum or 1
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def load(cls, config: "Config | Mapping[str, Any] | str | os.PathLike | None") -> "Config":
        """Build a Config from a Config, a dict, a JSON file path, or None (all defaults)."""
        if config is None:
            return cls()
        if isinstance(config, Config):
            return config
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path!r} does not exist; pass a JSON file path, a dict or a zerokit.Config.")
            with open(path, encoding="utf-8") as handle:
                try:
                    config = json.load(handle)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"config file {path!r} is not valid JSON: {error}") from None
        if not isinstance(config, Mapping):
            raise ConfigError(f"config must be a zerokit.Config, a dict or a JSON path, not {type(config).__name__}.")
        return _build(cls, config, prefix="")


# DeepSpeed keys that tune mechanisms zerokit does not have: accepted so a DeepSpeed JSON loads,
# and reported once so nobody believes they act.
_IGNORED_DEEPSPEED_KEYS = types.MappingProxyType({
    "zero_optimization.allgather_partitions": "updated shards are always all-gathered",
    "zero_optimization.allgather_bucket_size": "each sharding unit is gathered in one collective",
    "zero_optimization.reduce_scatter": "gradients are always reduce-scattered",
    "zero_optimization.contiguous_gradients": "gradients are always reduced from contiguous flat buffers",
    "zero_optimization.round_robin_gradients": "shards are contiguous ranges of each unit",
    "zero_optimization.sub_group_size": "the optimizer steps over this rank's shard pieces at once",
    "zero_optimization.stage3_max_reuse_distance": "a gathered unit is freed when its last use ends",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "use engine checkpoints and export",
    "zero_optimization.ignore_unused_parameters": "unused parameters are always handled",
    "zero_optimization.offload_optimizer.fast_init": "swap files are written once, at start-up",
    "zero_optimization.offload_optimizer.pipeline": "NVMe reads and writes always overlap the CPU step",
    "zero_optimization.offload_optimizer.pipeline_read": "NVMe reads always run ahead of the CPU step",
    "zero_optimization.offload_optimizer.pipeline_write": "NVMe writes always run behind the CPU step",
    "zero_allow_untested_optimizer": "any element-wise torch optimizer is accepted",
    "wall_clock_breakdown": "use `zerokit profile` for timelines",
    "memory_breakdown": "use `zerokit profile` for memory timelines",
    "optimizer.params.torch_adam": "zerokit always uses torch's fused/foreach optimizers",
    "fp16.auto_cast": "forward inputs are always cast to the compute dtype",
})

# DeepSpeed features zerokit does not offer: say so instead of "unknown key".
_UNSUPPORTED_DEEPSPEED_KEYS = types.MappingProxyType({
    "zero_optimization.cpu_offload": "it is DeepSpeed's old name: use offload_optimizer: {\"device\": \"cpu\"}",
    "zero_optimization.cpu_offload_params": "it is DeepSpeed's old name: use offload_param: {\"device\": \"cpu\"}",
    "zero_optimization.cpu_offload_use_pin_memory": "it is DeepSpeed's old name: use offload_optimizer.pin_memory",
    "pipeline": "pipeline parallelism is not part of zerokit",
    "activation_checkpointing": "use the activation_memory section (policy recompute, swap or memo)",
    "amp": "use bf16 or fp16 sections instead of apex amp",
    "gradient_predivide_factor": "reductions are averaged in communication_data_type",
    "prescale_gradients": "reductions are averaged in communication_data_type",
    "sparse_gradients": "sparse gradients are not supported",
})


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}.")


def _all_keys(cls, prefix: str) -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        nested = _dataclass_of(typing.get_type_hints(cls)[f.name])
        if nested is not None:
            keys.extend(_all_keys(nested, key + "."))
    return keys


def _dataclass_of(hint) -> Optional[type]:
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _unknown_key_error(key: str, valid_here: list[str]) -> ConfigError:
    if key in _UNSUPPORTED_DEEPSPEED_KEYS:
        return ConfigError(f"config key {key!r} is not supported: {_UNSUPPORTED_DEEPSPEED_KEYS[key]}. Remove it.")
    everywhere = _all_keys(Config, "")
    nearest = difflib.get_close_matches(key, valid_here + everywhere, n=1, cutoff=0.5)
    hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
    section = key.rsplit(".", 1)[0] if "." in key else "the top level"
    return ConfigError(
        f"unknown config key {key!r}.{hint} Valid keys in {section}: {', '.join(sorted(valid_here))}."
    )


def _build(cls, data: Mapping[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for raw_key, value in data.items():
        key = prefix + raw_key
        if raw_key not in names:
            if key in _IGNORED_DEEPSPEED_KEYS:
                logger.info("config key %r has no effect in zerokit: %s.", key, _IGNORED_DEEPSPEED_KEYS[key])
                continue
            raise _unknown_key_error(key, [prefix + n for n in sorted(names)])
        kwargs[raw_key] = _convert(hints[raw_key], value, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:  # a section's own validation
        section = prefix.rstrip(".") or "config"
        message = str(error) if str(error).startswith(section) else f"{section}: {error}"
        raise ConfigError(message) from None


def _convert(hint, value: Any, key: str):
    if isinstance(value, str) and value == "auto":
        raise ConfigError(
            f"{key}='auto' is filled in by the Hugging Face Trainer integration of DeepSpeed; give zerokit a value."
        )
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a section (a JSON object), not {value!r}.")
        return _build(hint, value, key + ".")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid: expected true or false.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer.")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is invalid: expected a number.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} is invalid: expected a string.")
        return value
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}={value!r} is invalid: expected a list of strings.")
        return tuple(value)
    if typing.get_origin(hint) in (collections.abc.Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} is invalid: expected a JSON object.")
        for sub_key in value:
            if f"{key}.{sub_key}" in _IGNORED_DEEPSPEED_KEYS:
                logger.info("config key %r has no effect in zerokit: %s.", f"{key}.{sub_key}",
                            _IGNORED_DEEPSPEED_KEYS[f"{key}.{sub_key}"])
        return {k: v for k, v in value.items() if f"{key}.{k}" not in _IGNORED_DEEPSPEED_KEYS}
    raise TypeError(f"unsupported config field type {hint!r} for {key}")  # a bug in this file, not user input


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value
