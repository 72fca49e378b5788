"""A MEMO plan for a model: the swap fraction alpha and the bi-level memory plan of one iteration.

One block is built for real on the device (the model itself stays on the meta device) and
profiled with the arguments the model calls it with (planner.profile_block): its forward and
backward times and every allocation. From these:

- alpha (planner.swap_fraction): the block input and attention outputs go to host memory whole;
  "other" saved tensors are swapped for a fraction alpha of the tokens, bounded by how much the
  host link (measured, or given) moves during one block's forward and by host memory.
- the memory plan (planner.plan_iteration) of the blocks' activations on the device over one
  iteration. Steps: block i's forward is step i, its backward step 2n-1-i. Level 1 places each
  phase's transient tensors; level 2 places the phases with the tensors that live across steps:
  each block's output (alive until the next block has used it), its saved tensors (the last two
  blocks keep them until their backward; the others hold them until their copy to host memory
  is done, during the next block's forward, and get them back one step before their backward),
  and in backward the gradient of each block's input (alive into the next step) and its
  parameter gradients (reduced within the step). Embedding, head, loss and model states are
  outside this plan.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import psutil
import torch
from torch import nn
from torch.utils._pytree import tree_map

from planner import (
    BlockPhase,
    BlockProfile,
    DsaConfig,
    IterationPlan,
    ProfileConfig,
    SwapFraction,
    SwapInputs,
    TensorLifetime,
    plan_iteration,
    profile_block,
    swap_fraction,
)
from zerokit.profiler.activations import KEEP_LAST
from zerokit.profiler.models import ModelSource, build_on_meta
from zerokit.profiler.trace import capture_block_call
from zerokit.zero.units import plan_units

SCHEMA = "zerokit.plan/1"
BANDWIDTH_PROBE_BYTES = 256 << 20


@dataclass(frozen=True)
class PlanRequest:
    micro_batch: int
    seq: int
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    alpha: Optional[float] = None  # given instead of planned
    bandwidth: Optional[float] = None  # host link, bytes/s; None measures it
    host_memory: Optional[int] = None  # bytes for swapped activations; None: available host memory
    time_limit_s: float = 10.0  # per DSA solve
    profile: ProfileConfig = ProfileConfig()

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.seq < 1:
            raise ValueError(f"micro_batch and seq must be positive, got {self.micro_batch} and {self.seq}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be positive bytes/s, got {self.bandwidth}")


@dataclass(frozen=True)
class BlockSizes:
    """Bytes of one block's activations saved for backward, as MEMO splits them."""

    saved: int
    inputs: int  # the hidden-state input, swapped whole
    attention: int  # attention kernel outputs saved, swapped whole
    other: int  # swapped for alpha of the tokens, the rest recomputed


@dataclass(frozen=True)
class MemoPlan:
    model: str
    request: PlanRequest
    blocks: int
    profile: BlockProfile
    sizes: BlockSizes
    bandwidth: float
    bandwidth_source: str
    host_memory: int
    alpha: SwapFraction
    alpha_given: bool
    iteration: IterationPlan
    solve_s: float

    def phase_peaks(self) -> dict[str, int]:
        """Level-1 peak of one block's forward and backward."""
        return {
            "forward": self.iteration.level1["block0.forward"].peak_bytes,
            "backward": self.iteration.level1["block0.backward"].peak_bytes,
        }

    def to_json(self) -> dict[str, Any]:
        level1 = self.iteration.level1
        return {
            "schema": SCHEMA,
            "model": self.model,
            "micro_batch": self.request.micro_batch,
            "seq": self.request.seq,
            "dtype": str(self.request.dtype).removeprefix("torch."),
            "device": self.profile.device,
            "blocks": self.blocks,
            "block": {
                "forward_s": self.profile.forward_s,
                "backward_s": self.profile.backward_s,
                "saved_bytes": self.sizes.saved,
                "input_bytes": self.sizes.inputs,
                "attention_bytes": self.sizes.attention,
                "other_bytes": self.sizes.other,
            },
            "alpha": {
                "value": self.alpha.alpha,
                "given": self.alpha_given,
                "limited_by": None if self.alpha_given else self.alpha.limited_by,
                "mandatory_fits": self.alpha.mandatory_fits,
                "bandwidth_bytes_per_s": self.bandwidth,
                "bandwidth_source": self.bandwidth_source,
                "host_memory_bytes": self.host_memory,
            },
            "plan": {
                "arena_bytes": self.iteration.arena_bytes,
                "phase_peak_bytes": self.phase_peaks(),
                "level1": {name: _plan_facts(level1[f"block0.{name}"]) for name in ("forward", "backward")},
                "level2": _plan_facts(self.iteration.level2),
                "solve_time_s": self.solve_s,
            },
            "iteration_plan": self.iteration.to_dict(),
        }


def _plan_facts(plan) -> dict[str, Any]:
    return {
        "peak_bytes": plan.peak_bytes,
        "lower_bound_bytes": plan.lower_bound_bytes,
        "method": plan.method,
        "optimal": plan.optimal,
        "gap": plan.gap,
        "solve_time_s": plan.solve_time_s,
        "note": plan.note,
    }


def memo_plan(source: ModelSource, request: PlanRequest) -> MemoPlan:
    device = torch.device(request.device)
    model = build_on_meta(source, request.dtype)
    blocks = [spec.module for spec in plan_units(model) if spec.name != ""]
    if not blocks:
        raise ValueError(f"{source.name} has no repeated blocks (a ModuleList of layers) to plan for")
    args, kwargs = capture_block_call(model, blocks[0], request.micro_batch, request.seq)
    block = _materialize(model, blocks[0], device)
    real_args, real_kwargs = tree_map(lambda v: _real(v, device), (args, kwargs))
    profile = profile_block(_Bound(block, real_kwargs), real_args, request.profile)
    inputs = sum(t.untyped_storage().nbytes() for t in real_args if isinstance(t, torch.Tensor) and t.requires_grad)
    sizes = _sizes(profile, inputs)

    bandwidth, bandwidth_source = (request.bandwidth, "given") if request.bandwidth else _measure_bandwidth(device)
    host_memory = request.host_memory if request.host_memory is not None else psutil.virtual_memory().available
    if request.alpha is not None:
        alpha = SwapFraction(request.alpha, "given", True)
    else:
        alpha = swap_fraction(SwapInputs(
            bandwidth_bytes_per_s=bandwidth,
            layer_forward_s=profile.forward_s,
            input_bytes=sizes.inputs,
            attention_bytes=sizes.attention,
            other_bytes=sizes.other,
            host_memory_bytes=host_memory,
            num_layers=len(blocks),
        ))  # fmt: skip
    started = time.perf_counter()
    iteration = _iteration_plan(profile, len(blocks), inputs, DsaConfig(time_limit_s=request.time_limit_s))
    return MemoPlan(
        model=source.name,
        request=request,
        blocks=len(blocks),
        profile=profile,
        sizes=sizes,
        bandwidth=bandwidth,
        bandwidth_source=bandwidth_source,
        host_memory=host_memory,
        alpha=alpha,
        alpha_given=request.alpha is not None,
        iteration=iteration,
        solve_s=time.perf_counter() - started,
    )


class _Bound(nn.Module):
    """The block with its keyword arguments bound: profile_block passes positional inputs only."""

    def __init__(self, block: nn.Module, kwargs: dict):
        super().__init__()
        self.block = block
        self.kwargs = kwargs

    def forward(self, *args: Any) -> Any:
        return self.block(*args, **self.kwargs)


def _materialize(model: nn.Module, block: nn.Module, device: torch.device) -> nn.Module:
    """Storage on `device` for one block, initialized the way zerokit initializes meta models."""
    block = block.to_empty(device=device)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02)
        for module in block.modules():
            if callable(getattr(model, "_init_weights", None)) and hasattr(model, "config"):
                model._init_weights(module)  # Hugging Face's per-module initializer
            elif callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    return block


def _real(value: Any, device: torch.device) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        real = torch.randn(value.shape, dtype=value.dtype, device=device)
        return real.requires_grad_(value.requires_grad)
    return torch.zeros(value.shape, dtype=value.dtype, device=device)


def _sizes(profile: BlockProfile, input_bytes: int) -> BlockSizes:
    saved = [e for e in profile.events if e.kind == "alloc" and e.tensor_id in profile.saved_ids]
    attention = sum(e.nbytes for e in saved if "scaled_dot_product" in profile.ops[e.op_index])
    total = sum(e.nbytes for e in saved)
    return BlockSizes(total, input_bytes, attention, total - attention)


def _measure_bandwidth(device: torch.device) -> tuple[float, str]:
    """Device-to-host copy into pinned memory on CUDA; on a CPU device, a host memory copy
    stands in for the link."""
    source = torch.empty(BANDWIDTH_PROBE_BYTES, dtype=torch.uint8, device=device)
    if device.type == "cuda":
        target = torch.empty(BANDWIDTH_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
        target.copy_(source, non_blocking=True)  # warm-up
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(source, non_blocking=True)
        torch.cuda.synchronize(device)
        return BANDWIDTH_PROBE_BYTES / (time.perf_counter() - start), "measured (device to pinned host copy)"
    target = torch.empty_like(source)
    target.copy_(source)
    start = time.perf_counter()
    target.copy_(source)
    return BANDWIDTH_PROBE_BYTES / (time.perf_counter() - start), "measured (host memory copy: no device link on CPU)"


def _iteration_plan(profile: BlockProfile, count: int, input_bytes: int, config: DsaConfig) -> IterationPlan:
    forward, backward = profile.phase_lifetimes("forward"), profile.phase_lifetimes("backward")
    saved = [t for t in forward.escaping if int(t.name[1:]) in profile.saved_ids]
    outputs = [t for t in forward.escaping if int(t.name[1:]) not in profile.saved_ids]
    matching = [t for t in backward.escaping if t.size == input_bytes]
    input_grad = max(matching, key=lambda t: t.start) if matching else None
    parameter_grads = [t for t in backward.escaping if t is not input_grad]

    def backward_step(i: int) -> int:
        return 2 * count - 1 - i

    phases, cross = [], []
    for i in range(count):
        phases.append(BlockPhase(f"block{i}.forward", i, forward.transient))
        phases.append(BlockPhase(f"block{i}.backward", backward_step(i), backward.transient))
        for t in outputs:
            cross.append(TensorLifetime(f"block{i}.output.{t.name}", t.size, i, min(i + 2, backward_step(i) + 1)))
        for t in saved:
            if i >= count - KEEP_LAST:
                cross.append(TensorLifetime(f"block{i}.saved.{t.name}", t.size, i, backward_step(i) + 1))
            else:
                back = backward_step(i)
                cross.append(TensorLifetime(f"block{i}.offloading.{t.name}", t.size, i, i + 2))
                cross.append(TensorLifetime(f"block{i}.restored.{t.name}", t.size, back - 1, back + 1))
        step = backward_step(i)
        if input_grad is not None:
            cross.append(TensorLifetime(f"block{i}.grad_input", input_grad.size, step, min(step + 2, 2 * count)))
        for t in parameter_grads:
            cross.append(TensorLifetime(f"block{i}.grad.{t.name}", t.size, step, step + 1))
    return plan_iteration(phases, cross, config)
