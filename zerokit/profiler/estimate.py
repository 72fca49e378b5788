"""Per-rank memory of every ZeRO stage x offload x activation policy, before any GPU is rented.

The model is built on the meta device and one training step is traced there (trace.py): that
gives activations, their gradients and the transient parameter gradients event by event. With
WTA-CRS (Workload.wtacrs_keep_ratio) the traced model is first converted by
zerokit.nn.convert_to_wtacrs, as the engine converts it, so the trace sees the sampled rows,
indices and weights those layers save instead of their whole inputs. With a chunked loss
(Workload.chunked_loss) the traced model is wrapped in zerokit.nn.ChunkedLossCausalLM, as a
training script wraps it, so the trace sees one chunk's logits (recomputed in backward, with
their gradient) instead of the whole sequence's. The memo and swap rows follow the runtime's
activation_memory keys keep_last, restore_buffers and alpha (Workload.keep_last,
Workload.restore_buffers, Workload.alpha) where given, and
the offload rows offload_optimizer.ratio (Workload.offload_ratio).
Model states come from the arithmetic the engine itself checks with (zero/memory.py). For each
configuration the GPU peak is the largest sum, over the step's events, of

    states kept on the GPU + gradient shards reduced so far + activations of the policy
    + parameter gradients not yet reduced + communication buffers

plus a fraction for the caching allocator and a fixed amount outside it. Assumptions, all
visible in `--json` under "assumptions":

- gradient_accumulation_steps 1, fp32 gradient reduction, AdamW (two fp32 moments; a fused
  step on the GPU: a foreach step holds one more fp32 temporary as large as what it steps), the engine's
  default bucket sizes; two reductions in flight (the one waited for and the next); under stage 3
  the root unit stays gathered through forward and backward, with the unit in use and one
  prefetched, and the all-gather source (a shard in compute dtype);
- allocator overhead: ALLOCATOR_OVERHEAD of the allocated peak (block rounding and
  fragmentation: the gap between max_memory_reserved and max_memory_allocated);
- outside PyTorch's allocator: GPU_RUNTIME_BYTES per GPU (CUDA context, NCCL, library handles),
  HOST_RUNTIME_BYTES of host memory per rank (Python, torch and CUDA libraries);
- offload (ZeRO-Offload / ZeRO-Infinity placement, with the engine's default offload settings):
  "cpu_optimizer" keeps fp32 masters, moments and reduced gradients in host memory (stage >= 1);
  "cpu_optimizer_params" also the parameter shards (stage 3); "nvme_optimizer" puts masters and
  moments in swap files on NVMe with the reduced gradients in host memory (stage >= 1);
  "nvme_optimizer_cpu_params" also the parameter shards, in host memory (stage 3);
  "nvme" puts masters, moments and parameter shards on NVMe with the gradients in host memory
  (stage 3, max_in_cpu 0). With an offload ratio below 1 every offload row keeps the optimizer
  of the units a forward uses first on the GPU, as the engine places them. Host, NVMe and staging
  bytes are the engine's own plan (zero/memory.py), byte for byte;
- swap and memo: the steady state, with the two restore buffers reserved for the blocks'
  backward (memo's first step only plans, restores from its second on; activations.py).

The fastest configuration that fits is the one with the least relative cost, the product of
per-choice step-time factors (COSTS) from measured step times of ZeRO/FSDP systems on H100s:
ZeRO-3 vs ZeRO-1/2 1.3x, full activation recomputation 1.25-1.33x, save_on_cpu-style swapping
5x, CPU offload of the optimizer 1.7x and of parameters too 5.8x. MEMO (1.1x), the optimizer on
NVMe (10x, 11x with the parameters in host memory) and everything on NVMe (12x) are assumptions: NVMe steps are bound by the disk, which
reads and writes the fp32 masters and moments every step; parameters on NVMe add reads in forward
and backward, so that placement ranks after the optimizer alone. Ties go to the smaller GPU peak.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from itertools import accumulate
from numbers import Real
from typing import Callable, Mapping, Optional

import torch

from zerokit.config import OffloadOptimizerConfig, OffloadParamConfig, ZeroConfig
from zerokit.nn import ChunkedLossCausalLM, convert_to_wtacrs
from zerokit.profiler.activations import (
    KEEP_LAST,
    POLICIES,
    RESTORE_BUFFERS,
    BlockActivations,
    block_activations,
    gpu_timeline,
    host_bytes,
)
from zerokit.profiler.attention import TARGETS, Target
from zerokit.profiler.models import ModelSource, build_on_meta, resolve_model
from zerokit.profiler.trace import OUTSIDE, StepTrace, trace_step
from zerokit.zero.memory import ModelStateBytes, model_state_bytes
from zerokit.zero.policy import OffloadPolicy, ShardingPolicy
from zerokit.zero.units import plan_units

SCHEMA = "zerokit.estimate/3"
STAGES = (0, 1, 2, 3)
OFFLOADS = ("none", "cpu_optimizer", "cpu_optimizer_params", "nvme_optimizer", "nvme_optimizer_cpu_params", "nvme")
GPU_CATEGORIES = (
    "parameters", "master_weights", "gradients", "optimizer_states", "activations", "communication",
    "allocator_overhead", "runtime",
)  # fmt: skip
HOST_CATEGORIES = (
    "parameters", "master_weights", "gradients", "optimizer_states", "activations", "staging", "runtime",
)  # fmt: skip
NVME_CATEGORIES = ("parameters", "master_weights", "optimizer_states")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

ALLOCATOR_OVERHEAD = 0.10
GPU_RUNTIME_BYTES = 1 << 30
HOST_RUNTIME_BYTES = 2 << 30
REDUCTIONS_IN_FLIGHT = 2
_NVME = "nvme_path"  # a placeholder: the arithmetic does not look at the directory
OFFLOAD_POLICIES = {  # every offload of OFFLOADS but "none", which places nothing off the GPU
    "cpu_optimizer": OffloadPolicy(OffloadOptimizerConfig(device="cpu")),
    "cpu_optimizer_params": OffloadPolicy(OffloadOptimizerConfig(device="cpu"), OffloadParamConfig(device="cpu")),
    "nvme_optimizer": OffloadPolicy(OffloadOptimizerConfig(device="nvme", nvme_path=_NVME)),
    "nvme_optimizer_cpu_params": OffloadPolicy(OffloadOptimizerConfig(device="nvme", nvme_path=_NVME),
                                               OffloadParamConfig(device="cpu")),
    "nvme": OffloadPolicy(OffloadOptimizerConfig(device="nvme", nvme_path=_NVME),
                          OffloadParamConfig(device="nvme", nvme_path=_NVME, max_in_cpu=0)),
}  # fmt: skip
COSTS = {
    "stage": {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.3},
    "offload": {"none": 1.0, "cpu_optimizer": 1.7, "cpu_optimizer_params": 5.8, "nvme_optimizer": 10.0,
                "nvme_optimizer_cpu_params": 11.0, "nvme": 12.0},
    "activations": {"none": 1.0, "memo": 1.1, "recompute": 1.33, "swap": 5.0},
}


@dataclass(frozen=True)
class Hardware:
    """GPUs per node and nodes; GPU memory per GPU; host memory and NVMe space per node (bytes)."""

    gpus_per_node: int = 1
    nodes: int = 1
    gpu_memory: int = 80 * 10**9
    host_memory: int = 512 * 10**9
    nvme: int = 0

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "nodes", "gpu_memory", "host_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.nvme < 0:
            raise ValueError(f"nvme must be >= 0 bytes, got {self.nvme}")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Workload:
    micro_batch: int
    seq: int
    dtype: torch.dtype = torch.bfloat16
    attention: Target = "cuda"  # whose fused attention kernels the trace mirrors
    # WTA-CRS: the block linear layers keep this fraction of their input rows (None: exact layers)
    wtacrs_keep_ratio: Optional[float] = None
    # tokens per chunk of a ChunkedLossCausalLM loss (None: the model computes its own loss)
    chunked_loss: Optional[int] = None
    # activation_memory's keep_last, restore_buffers and alpha for the swap and memo rows (None: the
    # runtime's defaults, KEEP_LAST blocks kept, RESTORE_BUFFERS buffers and alpha planned)
    keep_last: Optional[int] = None
    restore_buffers: Optional[int] = None
    alpha: Optional[float] = None
    # offload_optimizer.ratio of the offload rows: the fraction of the optimizer they offload
    offload_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.seq < 1:
            raise ValueError(f"micro_batch and seq must be positive, got {self.micro_batch} and {self.seq}")
        if self.dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(map(str, DTYPES.values()))}, got {self.dtype}")
        if self.attention not in TARGETS:
            raise ValueError(f"attention must be one of {', '.join(TARGETS)}, got {self.attention!r}")

        def check(name: str, kind: type, in_range: Callable[[Real], bool], message: str, optional: bool = True) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, kind) or not in_range(value):
                raise ValueError(f"{message}; got {value!r}")

        check(
            "wtacrs_keep_ratio", Real, lambda keep: 0 < keep <= 1,
            "wtacrs_keep_ratio (--wtacrs) must be a number in (0, 1], the fraction of input rows the WTA-CRS layers "
            "keep (e.g. 0.3), or None (no --wtacrs) for exact linear layers",
        )  # fmt: skip
        check(
            "chunked_loss", int, lambda chunk: chunk >= 1,
            "chunked_loss (--chunked-loss) must be a whole number of tokens per chunk >= 1 (e.g. 8192), or None "
            "(no --chunked-loss) for the model's own loss",
        )  # fmt: skip
        check(
            "keep_last", int, lambda keep_last: keep_last >= 0,
            "keep_last (--keep-last) must be a whole number of blocks >= 0 that keep their activations under swap "
            f"and memo, or None (no --keep-last) for the default {KEEP_LAST}",
        )  # fmt: skip
        check(
            "restore_buffers", int, lambda buffers: buffers in (1, 2),
            "restore_buffers (--restore-buffers) must be 1 or 2, the device buffers swapped blocks are restored "
            f"into, or None (no --restore-buffers) for the default {RESTORE_BUFFERS}",
        )  # fmt: skip
        check(
            "alpha", Real, lambda alpha: 0 <= alpha <= 1,
            "alpha (--alpha) must be a number in [0, 1], memo's swapped fraction of tokens, or None (no --alpha) to "
            "plan it",
        )  # fmt: skip
        check(
            "offload_ratio", Real, lambda ratio: 0 < ratio <= 1,
            "offload_ratio (--offload-ratio) must be a number in (0, 1], the fraction of the optimizer the offload "
            "rows offload (offload_optimizer.ratio)",
            optional=False,
        )  # fmt: skip
        for name in ("wtacrs_keep_ratio", "alpha", "offload_ratio"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def blocks_kept(self) -> int:
        """Blocks that keep their activations under swap and memo."""
        return KEEP_LAST if self.keep_last is None else self.keep_last

    @property
    def buffers_restored_into(self) -> int:
        """Restore buffers of swap and memo."""
        return RESTORE_BUFFERS if self.restore_buffers is None else self.restore_buffers


@dataclass(frozen=True)
class Configuration:
    """Per-rank bytes by category on each device (every category present, zeros included)."""

    stage: int
    offload: str
    activations: str
    supported: bool
    note: str
    gpu: Mapping[str, int]
    host: Mapping[str, int]
    nvme: Mapping[str, int]
    peak_allocated: int  # what torch.cuda.max_memory_allocated() would show
    fits_gpu: bool
    fits_host: bool
    fits_nvme: bool
    relative_cost: float
    memo_alpha: Optional[float] = None

    @property
    def fits(self) -> bool:
        return self.supported and self.fits_gpu and self.fits_host and self.fits_nvme

    @property
    def label(self) -> str:
        return f"stage {self.stage}, offload {self.offload}, activations {self.activations}"

    def to_json(self) -> dict:
        return {
            "stage": self.stage,
            "offload": self.offload,
            "activations": self.activations,
            "supported": self.supported,
            "note": self.note,
            "gpu": {**self.gpu, "total": sum(self.gpu.values())},
            "host": {**self.host, "total": sum(self.host.values())},
            "nvme": {**self.nvme, "total": sum(self.nvme.values())},
            "peak_allocated_bytes": self.peak_allocated,
            "fits": {"gpu": self.fits_gpu, "host": self.fits_host, "nvme": self.fits_nvme, "all": self.fits},
            "relative_cost": self.relative_cost,
            "memo_alpha": self.memo_alpha,
        }


@dataclass(frozen=True)
class Estimate:
    model: str
    parameters: int
    trainable_parameters: int
    units: int
    hardware: Hardware
    workload: Workload
    blocks: tuple[BlockActivations, ...]
    outside_blocks_saved: int  # bytes saved for backward outside blocks (embedding, head, loss)
    configurations: tuple[Configuration, ...] = field(repr=False)

    @property
    def recommended(self) -> Optional[Configuration]:
        fitting = [c for c in self.configurations if c.fits]
        return min(fitting, key=lambda c: (c.relative_cost, sum(c.gpu.values()))) if fitting else None

    def find(self, stage: int, offload: str, activations: str) -> Configuration:
        for config in self.configurations:
            if (config.stage, config.offload, config.activations) == (stage, offload, activations):
                return config
        raise KeyError(f"no configuration stage {stage}, offload {offload!r}, activations {activations!r}")

    def to_json(self) -> dict:
        largest = max(self.blocks, key=lambda b: b.saved) if self.blocks else None
        recommended = self.recommended
        dtype_name = next(name for name, dtype in DTYPES.items() if dtype == self.workload.dtype)
        return {
            "schema": SCHEMA,
            "model": {
                "name": self.model,
                "parameters": self.parameters,
                "trainable_parameters": self.trainable_parameters,
                "blocks": len(self.blocks),
                "sharding_units": self.units,
            },
            "workload": {
                "micro_batch": self.workload.micro_batch,
                "seq": self.workload.seq,
                "dtype": dtype_name,
                "attention_kernels": self.workload.attention,
                "wtacrs_keep_ratio": self.workload.wtacrs_keep_ratio,
                "chunked_loss_tokens": self.workload.chunked_loss,
                "keep_last": self.workload.keep_last,
                "restore_buffers": self.workload.restore_buffers,
                "alpha": self.workload.alpha,
                "offload_ratio": self.workload.offload_ratio,
            },
            "hardware": {
                "nodes": self.hardware.nodes,
                "gpus_per_node": self.hardware.gpus_per_node,
                "world_size": self.hardware.world_size,
                "gpu_memory_bytes": self.hardware.gpu_memory,
                "host_memory_bytes": self.hardware.host_memory,
                "nvme_bytes": self.hardware.nvme,
            },
            "assumptions": {
                "gradient_accumulation_steps": 1,
                "reduce_dtype": "fp32",
                "optimizer": "AdamW (fused on the GPU)",
                "allocator_overhead_fraction": ALLOCATOR_OVERHEAD,
                "gpu_runtime_bytes": GPU_RUNTIME_BYTES,
                "host_runtime_bytes_per_rank": HOST_RUNTIME_BYTES,
                "reductions_in_flight": REDUCTIONS_IN_FLIGHT,
                "offload_buffers": {
                    "optimizer_buffer_count": OffloadOptimizerConfig().buffer_count,
                    "optimizer_tile_size": OffloadOptimizerConfig().tile_size,
                    "param_buffer_count": OffloadParamConfig().buffer_count,
                },
                "costs": {kind: {str(k): v for k, v in table.items()} for kind, table in COSTS.items()},
            },
            "activations": {
                "largest_block": None if largest is None else {
                    "saved_bytes": largest.saved,
                    "private_bytes": largest.private,
                    "swappable_bytes": largest.swappable,
                    "attention_bytes": largest.attention,
                    "input_bytes": largest.inputs,
                    "recompute_transient_bytes": largest.recompute_transient,
                },
                "outside_blocks_saved_bytes": self.outside_blocks_saved,
            },
            "configurations": [c.to_json() for c in self.configurations],
            "recommended": None if recommended is None else {
                "stage": recommended.stage, "offload": recommended.offload, "activations": recommended.activations
            },
        }  # fmt: skip


def estimate(model: ModelSource | str, hardware: Hardware, workload: Workload) -> Estimate:
    """Build `model` (a source or a `zerokit estimate --model` string) on the meta device and
    estimate every configuration."""
    source = resolve_model(model) if isinstance(model, str) else model
    return estimate_module(build_on_meta(source, workload.dtype), source.name, hardware, workload)


def estimate_module(model: torch.nn.Module, name: str, hardware: Hardware, workload: Workload) -> Estimate:
    """Estimate every configuration of a model already on the meta device (parameters in the
    workload's dtype, training mode). Runs one step of it on meta; with
    `workload.wtacrs_keep_ratio`, one step of a WTA-CRS copy of it (`model` is left as it is);
    with `workload.chunked_loss`, of it wrapped in a ChunkedLossCausalLM."""
    if workload.wtacrs_keep_ratio is not None:
        model = copy.deepcopy(model)
        convert_to_wtacrs(model, keep_ratio=workload.wtacrs_keep_ratio)
    if workload.chunked_loss is not None:
        model = _with_chunked_loss(model, name, workload.chunked_loss)
    specs = plan_units(model)
    with torch.random.fork_rng(devices=[]):  # WTA-CRS layers draw their seeds from the global generator
        trace = trace_step(model, specs, workload.micro_batch, workload.seq, workload.attention)
    blocks = block_activations(trace)
    options = (workload.blocks_kept, workload.buffers_restored_into, workload.alpha)
    timelines = {policy: gpu_timeline(trace, blocks, policy, *options) for policy in POLICIES}
    step = _Step(trace, blocks, timelines, workload)
    configurations = []
    for stage in STAGES:
        policy = ShardingPolicy.from_config(ZeroConfig(stage=stage))
        shards = hardware.world_size if stage >= 1 else 1
        states = model_state_bytes(specs, policy, workload.dtype, shards)
        for offload in OFFLOADS:
            reason = _unsupported_reason(stage, offload)
            if reason:
                configurations += (_unsupported(stage, offload, activations, reason) for activations in POLICIES)
                continue
            placed = states
            if offload != "none":
                placement = _with_ratio(OFFLOAD_POLICIES[offload], workload.offload_ratio)
                placed = model_state_bytes(specs, policy, workload.dtype, shards, offload=placement, pin=True)
            gradients, reductions = _gradient_timelines(trace, placed, reduce_scatter=shards > 1)
            for activations in POLICIES:
                configurations.append(
                    _configuration(stage, offload, activations, placed, step, gradients, reductions, hardware)
                )
    params = {id(p): p for p in model.parameters()}.values()
    return Estimate(
        model=name,
        parameters=sum(p.numel() for p in params),
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        units=len(specs),
        hardware=hardware,
        workload=workload,
        blocks=tuple(blocks),
        outside_blocks_saved=sum(s.nbytes for s in trace.saved if s.saved_by == frozenset({OUTSIDE})),
        configurations=tuple(configurations),
    )


def _with_ratio(policy: OffloadPolicy, ratio: float) -> OffloadPolicy:
    return replace(policy, optimizer=replace(policy.optimizer, ratio=ratio))


def _with_chunked_loss(model: torch.nn.Module, name: str, chunk_tokens: int) -> ChunkedLossCausalLM:
    """`model` wrapped as a training script wraps it for a chunked loss."""
    if isinstance(model, ChunkedLossCausalLM):
        raise ValueError(f"{name} already computes a chunked loss (a ChunkedLossCausalLM): leave out --chunked-loss")
    decoder = getattr(model, "get_decoder", None)
    head = getattr(model, "get_output_embeddings", None)
    if not callable(decoder) or not callable(head) or head() is None:
        raise ValueError(
            f"chunked_loss (--chunked-loss) wraps a Hugging Face causal LM (one with get_decoder() and an output "
            f"head, get_output_embeddings()) in zerokit.nn.ChunkedLossCausalLM; {name} "
            f"({type(model).__name__}) is not one: leave out --chunked-loss, or compute the chunked loss in the "
            "model's own forward(tokens, targets)"
        )
    return ChunkedLossCausalLM(model, chunk_tokens)


def _unsupported_reason(stage: int, offload: str) -> str:
    """Why ZeroConfig rejects `offload` under `stage` (its checks, in its order), or "" where it accepts it."""
    policy = OFFLOAD_POLICIES.get(offload)
    if policy is None:
        return ""
    if policy.offloads_params and stage < 3:
        return f"{offload} offloads parameter shards, which exist only under stage 3"
    if policy.offloads_optimizer and stage == 0:
        return "offloading the optimizer needs sharded optimizer states: stage 1 or higher"
    return ""


@dataclass(frozen=True)
class _Step:
    """The traced step and what every configuration reads from it."""

    trace: StepTrace
    blocks: list[BlockActivations]
    activations: dict[str, tuple[int, ...]]  # GPU timeline per activation policy
    workload: Workload  # its blocks_kept and alpha, for swap's and memo's host memory


@dataclass(frozen=True)
class _Placement:
    """Where each model state lives for one stage and offload choice (per rank)."""

    gpu: dict[str, int]
    host: dict[str, int]
    nvme: dict[str, int]
    communication: int  # stage 3's gathered units, for the whole step


def _placement(stage: int, offload: str, states: ModelStateBytes) -> _Placement:
    """`states` computed with the offload policy: what stays on the device is in its fields, the
    rest in `states.offload`."""
    largest = max(states.units, key=lambda u: u.full_bytes)
    sharded = [u for u in states.units if not u.keeps_gathered]
    # Without offload a sharded unit's all-gather source is its master cast to compute dtype;
    # offloaded, it is a kept shard (counted in parameters) or the gathered buffer itself.
    source = largest.shard_bytes if sharded and offload == "none" else 0
    communication = states.gathered + source if stage == 3 else 0
    gpu = {"parameters": states.parameters, "master_weights": states.master_weights,
           "optimizer_states": states.optimizer_states}  # fmt: skip
    host = dict(states.offload.host)
    nvme = {name: states.offload.nvme[name] for name in NVME_CATEGORIES}
    return _Placement(gpu, host, nvme, communication)


def _cost(stage: int, offload: str, activations: str) -> float:
    return COSTS["stage"][stage] * COSTS["offload"][offload] * COSTS["activations"][activations]


def _unsupported(stage: int, offload: str, activations: str, reason: str) -> Configuration:
    zeros = ({k: 0 for k in GPU_CATEGORIES}, {k: 0 for k in HOST_CATEGORIES}, {k: 0 for k in NVME_CATEGORIES})
    cost = _cost(stage, offload, activations)
    return Configuration(stage, offload, activations, False, reason, *zeros, 0, False, False, False, cost)


def _configuration(
    stage: int,
    offload: str,
    activations: str,
    states: ModelStateBytes,
    step: _Step,
    gradients: list[int],
    reductions: list[int],
    hardware: Hardware,
) -> Configuration:
    """A configuration ZeroConfig accepts (see _unsupported for the others)."""
    place = _placement(stage, offload, states)
    host_without_activations = sum(place.host.values()) + HOST_RUNTIME_BYTES
    room = hardware.host_memory / hardware.gpus_per_node - host_without_activations
    host_activations, alpha = host_bytes(step.blocks, activations, room, step.workload.blocks_kept, step.workload.alpha)
    trace, on_gpu = step.trace, step.activations[activations]
    totals = [a + p + g + r for a, p, g, r in zip(on_gpu, trace.param_grads, gradients, reductions)]
    peak_at = max(range(trace.events), key=totals.__getitem__)
    gpu = {
        "parameters": place.gpu["parameters"],
        "master_weights": place.gpu["master_weights"],
        "gradients": trace.param_grads[peak_at] + gradients[peak_at],
        "optimizer_states": place.gpu["optimizer_states"],
        "activations": on_gpu[peak_at],
        "communication": place.communication + reductions[peak_at],
    }
    allocated = sum(gpu.values())
    gpu["allocator_overhead"] = int(ALLOCATOR_OVERHEAD * allocated)
    gpu["runtime"] = GPU_RUNTIME_BYTES
    host = {
        "parameters": place.host["parameters"],
        "master_weights": place.host["master_weights"],
        "gradients": place.host["gradients"],
        "optimizer_states": place.host["optimizer_states"],
        "activations": host_activations,
        "staging": place.host["staging"],
        "runtime": HOST_RUNTIME_BYTES,
    }
    ranks = hardware.gpus_per_node
    return Configuration(
        stage=stage,
        offload=offload,
        activations=activations,
        supported=True,
        note="",
        gpu=gpu,
        host=host,
        nvme=dict(place.nvme),
        peak_allocated=allocated,
        fits_gpu=sum(gpu.values()) <= hardware.gpu_memory,
        fits_host=sum(host.values()) * ranks <= hardware.host_memory,
        fits_nvme=sum(place.nvme.values()) * ranks <= hardware.nvme,
        relative_cost=round(_cost(stage, offload, activations), 4),
        memo_alpha=alpha if activations == "memo" else None,
    )


def _gradient_timelines(trace: StepTrace, states: ModelStateBytes, reduce_scatter: bool) -> tuple[list[int], list[int]]:
    """After each event: the fp32 gradient shards reduced so far, and the flat buffers of the
    last REDUCTIONS_IN_FLIGHT reduce-scatters (an all-reduce, stage 0, reduces in place: its flat
    buffer is the gradient). Units the trace never saw finish are reduced at the end of
    backward, as the engine does."""
    finished = dict(trace.unit_reduced)
    order = sorted(range(len(states.units)), key=lambda u: finished.get(u, trace.events - 1))
    gradient_steps = [0] * (trace.events + 1)
    reduction_steps = [0] * (trace.events + 1)
    for position, unit in enumerate(order):
        event = finished.get(unit, trace.events - 1)
        gradient_steps[event] += states.units[unit].gradient_bytes
        if reduce_scatter:
            reduction_steps[event] += states.units[unit].reduce_buffer_bytes
            if position + REDUCTIONS_IN_FLIGHT < len(order):  # done once a later reduction is queued
                later = finished.get(order[position + REDUCTIONS_IN_FLIGHT], trace.events - 1)
                reduction_steps[later] -= states.units[unit].reduce_buffer_bytes
    return list(accumulate(gradient_steps[:-1])), list(accumulate(reduction_steps[:-1]))

