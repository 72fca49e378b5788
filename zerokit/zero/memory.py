"""Bytes of model states per rank, known before anything is allocated.

One implementation of the arithmetic serves the engine's early checks (`check_fits`, the offload
checks) and `zerokit estimate`: both call `model_state_bytes` on the sharding units of the model
(real or on the meta device). It follows the flat layout of `flat_group.layout` (aligned
offsets, the buffer padded to a multiple of the number of shards) and what `FlatParamGroup`
keeps:

| held by a rank                   | kept gathered (stages 0-2, small units) | sharded (stage 3) |
|----------------------------------|-----------------------------------------|-------------------|
| parameters (compute dtype)       | padded buffer                           | frozen shard only |
| fp32 master weights (trainable)  | shard, or nothing if it aliases fp32 params | shard         |
| fp32 reduced gradients           | shard after the unit's backward         | shard             |
| optimizer states (Adam-like)     | two fp32 moments per owned element and one fp32 step per piece |  |

With optimizer offload (OffloadPolicy) the device keeps only parameters of the units whose
optimizer is offloaded (all of them, or the last ones under offload_optimizer.ratio < 1, which
keep the rows above for the others); see `_OffloadTally` for what goes to host memory and NVMe,
byte for byte as `zerokit.zero.offload_resources` allocates it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from offload.raw_memory import aligned_size
from zerokit.zero.flat_group import layout
from zerokit.zero.policy import OffloadPolicy, ShardingPolicy
from zerokit.zero.tiles import tile_ranges
from zerokit.zero.units import UnitSpec

GiB = 1024**3
FP32_BYTES = 4
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32 per owned element
STEP_BYTES = 4  # one fp32 step count per optimizer piece
HOST_CATEGORIES = ("parameters", "master_weights", "gradients", "optimizer_states", "staging")
NVME_CATEGORIES = ("parameters", "master_weights", "optimizer_states")
NVME_STAGING_BUFFERS = 2  # the NVMe swapper double-buffers optimizer tiles


@dataclass(frozen=True)
class UnitStateBytes:
    """What one sharding unit adds, per rank."""

    name: str
    full_bytes: int  # every parameter of the unit gathered, compute dtype, padded
    shard_bytes: int  # this rank's shard of the unit in compute dtype (the all-gather source)
    gradient_bytes: int  # fp32 reduced gradient shard on the device, from the unit's backward to the step
    # (none when the unit's optimizer is offloaded: its gradients land in host memory)
    reduce_buffer_bytes: int  # the flat buffer of one reduction of the unit, in reduce dtype
    keeps_gathered: bool
    is_root: bool


@dataclass(frozen=True)
class OffloadBytes:
    """Per-rank bytes offload keeps in host memory and on NVMe, and its staging buffer sizes."""

    host: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(HOST_CATEGORIES, 0))
    nvme: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(NVME_CATEGORIES, 0))
    pinned: int = 0  # of the host bytes, those pinned (CUDA with pin_memory)
    upload_buffer_bytes: int = 0  # each of offload_optimizer.buffer_count buffers of updated parameters
    nvme_staging_bytes: int = 0  # each of the two buffers optimizer tiles are swapped through
    gradient_pool_bytes: int = 0  # buffers of gradients accumulated on the host
    param_pool_bytes: int = 0  # buffers of parameter shards read from NVMe
    optimizer_nvme_bytes: int = 0  # the optimizer's swap file
    param_nvme_bytes: int = 0  # the parameters' swap file
    largest_nvme_shard: int = 0  # elements of the largest parameter shard on NVMe

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def nvme_total(self) -> int:
        return sum(self.nvme.values())


@dataclass(frozen=True)
class ModelStateBytes:
    """Per-rank bytes of model states on the device (the fields) and, with offload, in host
    memory and on NVMe (`offload`); `gathered` is stage 3's working set of gathered units (the
    root, which stays gathered from forward to backward, plus the largest unit in use and one
    prefetched). Activations are not included."""

    parameters: int
    master_weights: int
    gradients: int
    optimizer_states: int
    gathered: int
    units: tuple[UnitStateBytes, ...]
    offload: OffloadBytes = field(default_factory=OffloadBytes)

    def as_dict(self) -> dict[str, int]:
        return {
            "parameters": self.parameters,
            "master_weights": self.master_weights,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "gathered_units": self.gathered,
        }

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())


def model_state_bytes(
    specs: Sequence[UnitSpec],
    policy: ShardingPolicy,
    compute_dtype: torch.dtype,
    num_shards: int,
    shard_index: Optional[int] = None,
    reduce_dtype: torch.dtype = torch.float32,
    offload: OffloadPolicy = OffloadPolicy(),
    accumulation_steps: int = 1,
    pin: Optional[bool] = None,
) -> ModelStateBytes:
    """Model-state bytes of rank `shard_index`, or of the rank holding the most when None
    (ranks differ only by which parameters' alignment padding falls in their shard).
    pin: whether host buffers that copies touch are pinned (default: when CUDA is available)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    compute = _element_size(compute_dtype)
    reduce = _element_size(reduce_dtype)
    offloaded = _OffloadTally(offload, compute, reduce, torch.cuda.is_available() if pin is None else pin)
    parameters = master = gradients = 0
    owned = [0] * num_shards  # trainable elements each rank steps
    pieces = [0] * num_shards  # optimizer pieces (parameters with elements in the shard) per rank
    units = []
    optimizer_offloaded = offload.optimizer_offloaded([spec.trainable_numel for spec in specs])
    for spec, unit_offloads_optimizer in zip(specs, optimizer_offloaded):
        keep = policy.keeps_gathered(sum(p.numel() for _, p in spec.params))
        unit_full = unit_shard = unit_grads = unit_reduce = 0
        for trainable in (True, False):
            params = [(name, p) for name, p in spec.params if p.requires_grad == trainable]
            if not params:
                continue
            slots, shard_numel = layout(params, num_shards)
            padded = shard_numel * num_shards
            unit_full += padded * compute
            unit_shard += shard_numel * compute
            params_off = offloaded.params_offloaded(keep)
            optimizer_off = trainable and unit_offloads_optimizer
            if keep:
                parameters += padded * compute
            elif params_off:
                offloaded.add_param_shard(shard_numel)
            elif not trainable or optimizer_off:
                parameters += shard_numel * compute  # the shard the gathers start from
            if trainable:
                aliased = compute_dtype == torch.float32 and keep
                unit_reduce += padded * reduce
                if optimizer_off:
                    offloaded.add_optimizer_shard(shard_numel)
                else:
                    unit_grads += shard_numel * FP32_BYTES
                    master += 0 if aliased else shard_numel * FP32_BYTES
                    gradients += shard_numel * FP32_BYTES
                    _add_owned([(s.offset, s.numel) for s in slots], shard_numel, owned, pieces)
        units.append(UnitStateBytes(
            name=spec.name or "<root>",
            full_bytes=unit_full,
            shard_bytes=unit_shard,
            gradient_bytes=unit_grads,
            reduce_buffer_bytes=unit_reduce,
            keeps_gathered=keep,
            is_root=spec.name == "",
        ))  # fmt: skip
    per_rank = [ADAM_MOMENTS * FP32_BYTES * o + STEP_BYTES * p for o, p in zip(owned, pieces)]
    optimizer = per_rank[shard_index] if shard_index is not None else max(per_rank)
    accumulates_on_host = policy.reduce_every_backward and accumulation_steps > 1
    return ModelStateBytes(
        parameters, master, gradients, optimizer, _gathered(units), tuple(units),
        offloaded.result(accumulates_on_host),
    )  # fmt: skip


class _OffloadTally:
    """What offload adds up, group by group in the engine's order (units in order, each one's
    trainable group before its frozen one):

    - optimizer offload, per trainable group whose optimizer is offloaded (every one, or the last
      units under offload_optimizer.ratio < 1): an fp32 gradient shard in pinned host memory; the
      fp32 master and two Adam moments over the whole shard in host memory (cpu) or in the swap
      file, one extent per tile and state (nvme);
    - parameter offload, per sharded group: the shard in compute dtype in pinned host memory (cpu,
      or nvme within max_in_cpu elements, the first groups) or in the swap file;
    - staging: offload_optimizer.buffer_count pinned buffers of one tile of updated parameters;
      two NVMe buffers of one tile of master and moments; with gradient accumulation in every
      backward, a pool of buffer_count gradient shards (reduce dtype) being added on the host;
      for parameters on NVMe, a pool of offload_param.buffer_count + 1 shards (those read ahead
      and one being written back);
    - with the delayed parameter update, per offloaded group: a second gradient shard (one is
      stepped while the other receives) and the updated shard in compute dtype, pinned, until
      it is uploaded at the next step.
    Swap-file extents and pooled buffers are page aligned (offload.raw_memory.aligned_size).
    """

    def __init__(self, policy: OffloadPolicy, compute: int, reduce: int, pin: bool):
        self.policy = policy
        self.compute, self.reduce = compute, reduce
        self.pin_optimizer = pin and policy.optimizer.pin_memory
        self.pin_params = pin and policy.params.pin_memory
        self.host = dict.fromkeys(HOST_CATEGORIES, 0)
        self.nvme = dict.fromkeys(NVME_CATEGORIES, 0)
        self.pinned = 0
        self.in_host = 0  # parameter elements kept in host memory under nvme offload
        self.largest_trainable = 0
        self.largest_on_nvme = 0

    def params_offloaded(self, keeps_gathered: bool) -> bool:
        return self.policy.offloads_params and not keeps_gathered

    def param_resident(self, numel: int) -> bool:
        """Whether a sharded group's parameter shard stays in host memory; call once per group, in order."""
        if self.policy.params.device == "cpu":
            return True
        if self.in_host + numel <= self.policy.params.max_in_cpu:
            self.in_host += numel
            return True
        return False

    def add_param_shard(self, numel: int) -> None:
        if self.param_resident(numel):
            self._host("parameters", numel * self.compute, self.pin_params)
        else:
            self.nvme["parameters"] += aligned_size(numel * self.compute)
            self.largest_on_nvme = max(self.largest_on_nvme, numel)

    def add_optimizer_shard(self, numel: int) -> None:
        self.largest_trainable = max(self.largest_trainable, numel)
        self._host("gradients", numel * FP32_BYTES, self.pin_optimizer)
        if self.policy.optimizer.delayed_parameter_update_after is not None:
            self._host("gradients", numel * FP32_BYTES, self.pin_optimizer)
            self._host("staging", numel * self.compute, self.pin_optimizer)
        if self.policy.optimizer.device == "cpu":
            self._host("master_weights", numel * FP32_BYTES, False)
            self._host("optimizer_states", ADAM_MOMENTS * numel * FP32_BYTES, False)
        else:
            tiles = sum(aligned_size((stop - start) * FP32_BYTES)
                        for start, stop in tile_ranges(numel, self.policy.optimizer.tile_size))  # fmt: skip
            self.nvme["master_weights"] += tiles
            self.nvme["optimizer_states"] += ADAM_MOMENTS * tiles

    def result(self, accumulates_on_host: bool) -> OffloadBytes:
        sizes = {}
        if self.largest_trainable:
            tile = min(self.policy.optimizer.tile_size, self.largest_trainable)
            count = self.policy.optimizer.buffer_count
            sizes["upload_buffer_bytes"] = tile * self.compute
            self._host("staging", count * tile * self.compute, self.pin_optimizer)
            if self.policy.optimizer.device == "nvme":
                sizes["nvme_staging_bytes"] = (1 + ADAM_MOMENTS) * aligned_size(tile * FP32_BYTES)
                self._host("staging", NVME_STAGING_BUFFERS * sizes["nvme_staging_bytes"], False)
            if accumulates_on_host:
                sizes["gradient_pool_bytes"] = count * aligned_size(self.largest_trainable * self.reduce)
                self._host("staging", sizes["gradient_pool_bytes"], self.pin_optimizer)
        if self.largest_on_nvme:
            shard = aligned_size(self.largest_on_nvme * self.compute)
            sizes["param_pool_bytes"] = (self.policy.params.buffer_count + 1) * shard
            self._host("staging", sizes["param_pool_bytes"], self.pin_params)
        optimizer_nvme = self.nvme["master_weights"] + self.nvme["optimizer_states"]
        return OffloadBytes(
            dict(self.host), dict(self.nvme), self.pinned, **sizes,
            optimizer_nvme_bytes=optimizer_nvme, param_nvme_bytes=self.nvme["parameters"],
            largest_nvme_shard=self.largest_on_nvme,
        )  # fmt: skip

    def _host(self, category: str, nbytes: int, pinned: bool) -> None:
        self.host[category] += nbytes
        self.pinned += nbytes if pinned else 0


def _gathered(units: Sequence[UnitStateBytes]) -> int:
    sharded = [u for u in units if not u.keeps_gathered]
    root = sum(u.full_bytes for u in sharded if u.is_root)
    blocks = sorted((u.full_bytes for u in sharded if not u.is_root), reverse=True)
    return root + sum(blocks[:2])


def _add_owned(slots: list[tuple[int, int]], shard_numel: int, owned: list[int], pieces: list[int]) -> None:
    """Add, per rank, the elements of `slots` (offset, numel) inside its shard and the number of
    slots that reach into it: exactly the pieces `FlatParamGroup` hands the optimizer."""
    for offset, numel in slots:
        if numel == 0:
            continue
        end = offset + numel
        for rank in range(offset // shard_numel, (end - 1) // shard_numel + 1):
            start, stop = rank * shard_numel, (rank + 1) * shard_numel
            owned[rank] += min(end, stop) - max(offset, start)
            pieces[rank] += 1


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_fits(
    need: ModelStateBytes, device: torch.device, stage: int, offload: OffloadPolicy = OffloadPolicy()
) -> None:
    """Fail before allocating anything if the model states alone cannot fit on the GPU."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if need.total > free:
        detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in need.as_dict().items())
        advice = (
            f"raise zero_optimization.stage to {stage + 1}"
            if stage < 3
            else "use more GPUs (ZeRO-3 divides states by their number)"
        )
        if not offload.offloads_optimizer and stage >= 1:
            advice += ", offload the optimizer (zero_optimization.offload_optimizer.device cpu)"
        elif offload.offloads_optimizer and need.optimizer_states > 0:  # ratio < 1 left part of it on the device
            advice += ", offload more of the optimizer (raise zero_optimization.offload_optimizer.ratio toward 1.0)"
        if offload.offloads_optimizer and not offload.offloads_params and stage == 3:
            advice += ", offload the parameters (zero_optimization.offload_param.device cpu)"
        raise torch.OutOfMemoryError(
            f"model states need {need.total / GiB:.2f} GiB per rank ({detail} GiB) but {device} has "
            f"{free / GiB:.2f} GiB free, before any activation: {advice}, or use bf16."
        )


class HostMemoryError(MemoryError):
    """The offload plan does not fit the host memory budget or the memory available."""


def check_offload_fits(need: OffloadBytes, policy: OffloadPolicy, local_ranks: int = 1) -> None:
    """Fail before allocating anything if the offload plan cannot be held: host bytes against
    zero_optimization.host_memory_budget and the memory available on this node (shared by
    `local_ranks` ranks), swap-file bytes against each nvme_path (which must be a writable
    directory)."""
    import psutil

    from offload.nvme import NVMePathError, check_nvme_path

    if not policy.active:
        return
    if need.largest_nvme_shard > policy.params.buffer_size:
        raise ValueError(
            f"a sharding unit's parameter shard has {need.largest_nvme_shard} elements, more than one staging buffer "
            f"holds (zero_optimization.offload_param.buffer_size={policy.params.buffer_size}): raise buffer_size to "
            f"at least {need.largest_nvme_shard}, or use more ranks or smaller sharding units."
        )
    total = need.host_total
    detail = ", ".join(f"{k.replace('_', ' ')} {v / GiB:.2f}" for k, v in need.host.items() if v)
    advice = (
        "move states to NVMe (offload_optimizer / offload_param device nvme), use more ranks (stage >= 1 divides "
        "states by their number)"
    )
    budget = policy.host_memory_budget
    if budget is not None and total > budget:
        raise HostMemoryError(
            f"offload needs {total} bytes ({total / GiB:.2f} GiB: {detail} GiB) of host memory on this rank, but "
            f"zero_optimization.host_memory_budget is {budget} bytes: raise it to at least {total}, or {advice}."
        )
    available = psutil.virtual_memory().available
    if total * local_ranks > available:
        raise HostMemoryError(
            f"offload needs {total} bytes ({total / GiB:.2f} GiB: {detail} GiB) of host memory per rank, "
            f"{total * local_ranks} for the {local_ranks} rank(s) on this node, but only {available} bytes "
            f"({available / GiB:.2f} GiB) are available: {advice}, or free host memory."
        )
    paths: dict[str, list[tuple[str, str, int]]] = {}  # one free-space check per directory
    for section, config, nbytes in (
        ("offload_optimizer", policy.optimizer, need.optimizer_nvme_bytes),
        ("offload_param", policy.params, need.param_nvme_bytes),
    ):
        if config.device == "nvme":
            paths.setdefault(os.path.realpath(config.nvme_path), []).append((section, config.nvme_path, nbytes))
    for users in paths.values():
        try:
            check_nvme_path(users[0][1], sum(nbytes for _, _, nbytes in users))
        except NVMePathError as error:
            sections = " and ".join(f"zero_optimization.{section}.nvme_path" for section, _, _ in users)
            needs = ", ".join(f"{section} {nbytes} bytes" for section, _, nbytes in users)
            raise NVMePathError(f"{sections} ({needs}): {error}") from None
