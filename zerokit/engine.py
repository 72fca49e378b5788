"""The training engine returned by `zerokit.initialize`."""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import weakref
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_map

from zerokit import checkpoint, profiler
from zerokit.activations import apply_activation_memory
from zerokit.config import Config
from zerokit.distributed import DistributedContext
from zerokit.loss_scaler import LossScaler
from zerokit.lr_schedules import build_scheduler
from zerokit.optim import build_optimizer, repoint_optimizer
from zerokit.zero.collectives import Collectives
from zerokit.zero.flat_group import FlatParamGroup, ShardingContext
from zerokit.zero.materialize import build_unit, check_initializers, move_buffers, shared_seed
from zerokit.zero.host_optimizer import OffloadedAdam
from zerokit.zero.memory import GiB, check_fits, check_offload_fits, model_state_bytes
from zerokit.zero.offload_resources import OffloadResources
from zerokit.zero.policy import OffloadPolicy, ShardingPolicy
from zerokit.zero.runtime import ShardingRuntime
from zerokit.zero.streams import StreamSet
from zerokit.zero.units import in_forward_order, plan_units

logger = logging.getLogger("zerokit")


class Engine:
    """Wraps a model for sharded training: `engine(batch)`, `engine.backward(loss)`, `engine.step()`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        config: Config,
        dist_ctx: DistributedContext,
    ):
        self.module = model
        self.config = config
        self.device = dist_ctx.device
        self.rank = dist_ctx.rank
        self.world_size = dist_ctx.world_size
        self.global_step = 0  # accumulation boundaries passed (skipped fp16 steps included)
        self.micro_steps = 0
        self.skipped_steps = 0
        self.grad_norm: Optional[torch.Tensor] = None  # global norm before clipping, when clipping

        zero = config.zero_optimization
        self._policy = ShardingPolicy.from_config(zero)
        offload = OffloadPolicy.from_config(zero)
        self._comm = Collectives(dist_ctx.group, self.rank, self.world_size)
        sharded = self._policy.shard_optimizer
        num_shards, shard_index = (self.world_size, self.rank) if sharded else (1, 0)
        streams = StreamSet(self.device, zero.overlap_comm, transfers=offload.active)
        specs = plan_units(model, zero.shard_unit_classes)
        check_initializers(model, specs)
        need = model_state_bytes(
            specs, self._policy, config.compute_dtype, num_shards, shard_index, config.reduce_dtype, offload,
            config.accumulation_steps, pin=self.device.type == "cuda",
        )  # fmt: skip
        check_fits(need, self.device, zero.stage, offload)
        check_offload_fits(need.offload, offload, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self._offload = OffloadResources(offload, need.offload, streams, self.rank) if offload.active else None
        self._ctx = ShardingContext(
            device=self.device,
            compute_dtype=config.compute_dtype,
            reduce_dtype=config.reduce_dtype,
            num_shards=num_shards,
            shard_index=shard_index,
            comm=self._comm,
            streams=streams,
            offload=self._offload,
        )
        any_meta = any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers())
        seed = shared_seed(self._ctx) if any_meta else 0
        optimizer_offloaded = offload.optimizer_offloaded([spec.trainable_numel for spec in specs])
        units = [
            build_unit(model, spec, self._ctx, self._policy, seed + i, i, optimizer_offloaded[i])
            for i, spec in enumerate(specs)
        ]
        move_buffers(model, self.device)
        read_ahead = offload.params.buffer_count if offload.params.device == "nvme" else 0
        self._runtime = ShardingRuntime(units, self._policy, self._ctx.streams, read_ahead)
        # After the sharding hooks, so a block's parameters are gathered before its activations are managed.
        memory = config.activation_memory
        self.activations = apply_activation_memory(model, memory, self.device) if memory is not None else None
        self._groups = [group for unit in units for group in unit.trainable_groups()]
        # Stepped on the device, as without offload, or by the CPU (in forward order: see below).
        self._device_groups = [group for group in self._groups if group.host_optimizer is None]
        self._offloaded_groups = [
            group for unit in in_forward_order(units) for group in unit.trainable_groups()
            if group.host_optimizer is not None
        ]

        pieces = {
            id(group.slots[piece.slot_index].param): param
            for group in self._groups
            for piece, param in zip(group.pieces, group.optimizer_params)
        }
        if optimizer is not None:
            self.optimizer = repoint_optimizer(optimizer, model.parameters(), pieces)
        else:
            # With every group offloaded the optimizer only holds hyper-parameters: build it for the CPU.
            where = torch.device("cpu") if self._offloaded_groups and not self._device_groups else self.device
            self.optimizer = build_optimizer(config.optimizer, [{"params": list(pieces.values())}], where)
        # `self.optimizer` keeps the param_groups (lr, schedulers, checkpoints) of every piece and
        # steps the device groups' ones; the CPU kernel steps the offloaded groups' ones, reading
        # the same param_groups: see zero/host_optimizer.py.
        self._host_adam = None
        if offload.offloads_optimizer:
            # Stepped in forward order: the root unit (embeddings, head) runs first. The NVMe
            # parameter swapper is the training thread's alone, so that case steps on it too.
            overlap = offload.optimizer.overlap_step and offload.params.device != "nvme"
            delay = offload.optimizer.delayed_parameter_update_after
            self._host_adam = OffloadedAdam(self.optimizer, self._offloaded_groups, overlap, delay)
        # The stepping thread finishes, then swap files go, when the engine does (or at exit).
        self._close_offload = None
        if self._offload is not None:
            self._close_offload = weakref.finalize(self, _stop_offload, self._host_adam, self._offload)
        self.lr_scheduler = build_scheduler(config.scheduler, self.optimizer) if config.scheduler else None
        self.loss_scaler = LossScaler(config.fp16) if config.fp16.enabled else None
        profiler.track_model_states(self._device_memory_breakdown)  # a no-op unless run under `zerokit profile`

    # -- the training loop ---------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward; floating-point inputs are cast to the compute dtype."""
        dtype = self._ctx.compute_dtype
        if dtype != torch.float32:
            cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            args, kwargs = tree_map(cast, (args, kwargs))
        with profiler.phase("forward"), self._explain_oom("forward"):
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of `loss` / gradient_accumulation_steps (times the fp16 loss scale), with
        gradients reduced into this rank's shards."""
        if loss.numel() != 1:
            raise ValueError(f"engine.backward expects a scalar loss, got shape {tuple(loss.shape)}; reduce it first.")
        scale = (self.loss_scaler.scale if self.loss_scaler else 1.0) / self.config.accumulation_steps
        reduce = self._policy.reduce_every_backward or self.is_gradient_accumulation_boundary()
        if self._host_adam is not None:
            self._host_adam.before_backward()
        self._runtime.begin_backward(reduce=reduce)
        with profiler.phase("backward"), self._explain_oom("backward"):
            loss.backward(torch.full_like(loss, scale)) if scale != 1.0 else loss.backward()
            with profiler.phase("communication"):
                self._runtime.finish_backward()

    def step(self) -> None:
        """Call after every micro-batch: steps the optimizer (and clears gradients) at
        accumulation boundaries only."""
        if self._runtime.backward_pending:
            raise RuntimeError(
                "a forward ran whose backward did not go through the engine: call engine.backward(loss), "
                "not loss.backward(), before engine.step()."
            )
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        with profiler.phase("step"), self._explain_oom("optimizer step"):
            self._optimizer_step()
        self.global_step += 1
        if self.config.steps_per_print and self.global_step % self.config.steps_per_print == 0 and self.rank == 0:
            lrs = [group["lr"] for group in self.optimizer.param_groups]
            logger.info("step %d: lr %s, grad norm %s, skipped %d", self.global_step, lrs,
                        None if self.grad_norm is None else f"{self.grad_norm.item():.4g}", self.skipped_steps)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.config.accumulation_steps == 0

    def _optimizer_step(self) -> None:
        """One step over both placements: the device groups' gradient shards (on the device) and
        the offloaded groups' (in host memory) share the overflow check and the clipping norm."""
        offloaded = self._host_adam is not None
        if offloaded:  # the gradient shards in host memory, once every copy to them has landed
            with profiler.phase("offload"):
                for group in self._offloaded_groups:
                    group.host_grads.settle()
        landed = [group for group in self._groups if group.reduced_grad() is not None]
        grads = [group.reduced_grad() for group in landed]
        if self.loss_scaler is not None and self.loss_scaler.unscale_and_check(grads, self._comm, self.device):
            self.skipped_steps += 1
            for group in self._groups:
                group.release_grads()
            return
        coefficient = None
        if self.config.gradient_clipping > 0:
            self.grad_norm, coefficient = self._clip_coefficient(landed, grads, self.config.gradient_clipping)
        # Read before the device's step is queued (.item() waits for the stream): the device's
        # kernels then run while the CPU steps the offloaded groups.
        host_coefficient = None if coefficient is None or not offloaded else coefficient.item()
        if self._device_groups:
            self._step_on_device([group.grad_shard for group in landed if group.host_grads is None], coefficient)
        if offloaded:
            with profiler.phase("offload"):
                self._host_adam.step(host_coefficient, self.global_step)
            for group in self._offloaded_groups:
                group.release_grads()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def _step_on_device(self, grads: list[torch.Tensor], coefficient: Optional[torch.Tensor]) -> None:
        """`self.optimizer` over the device groups' pieces, `grads` their reduced shards: only those
        get a .grad, so only those step (torch.optim skips pieces without one, the offloaded
        groups' among them)."""
        if coefficient is not None and grads:  # as clip_grads_with_norm_, on the shards themselves
            torch._foreach_mul_(grads, coefficient)
        for group in self._device_groups:
            group.attach_grads()
        self.optimizer.step()
        for group in self._device_groups:
            group.release_grads()
        self._runtime.refresh_parameters()

    def _clip_coefficient(
        self, landed: list[FlatParamGroup], grads: list[torch.Tensor], max_norm: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The global norm over `grads`, the gradient shards of the groups that `landed` (on the
        device or in host memory), and the coefficient torch.nn.utils.clip_grad_norm_ would scale
        them by."""
        # Norms taken on the device as host shards were reduced spare the host a pass over them
        # (only valid when each shard is one reduction, and not while fp16 grads were scaled). A
        # shard's norm is a scalar whose own norm is itself: it stands in for the shard.
        offloaded = [group.host_grads for group in landed if group.host_grads is not None]
        use_norms = self.loss_scaler is None and all(host.device_norm is not None for host in offloaded)
        shards = [
            group.host_grads.device_norm if use_norms and group.host_grads is not None else grad
            for group, grad in zip(landed, grads)
        ]
        total = torch.nn.utils.get_total_norm(shards) if shards else torch.zeros((), device=self.device)
        squares = total.square().to(self.device)
        if self._ctx.num_shards > 1:
            self._comm.all_reduce(squares)
        total = squares.sqrt()
        return total, torch.clamp(max_norm / (total + 1e-6), max=1.0)

    # -- conveniences --------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Engine":
        self.module.train(mode)
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler else 1.0

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds now for model states, by category: on the device (parameters,
        master_weights, gradients, optimizer_states) and, with offload, in host memory
        (host_<category>, staging buffers included) and in swap files (nvme_<category>)."""
        totals = self._device_memory_breakdown()
        if self._offload is not None:
            totals.update(self._offload.breakdown())
        return totals

    def swap_directories(self) -> list[str]:
        """The directories holding this rank's swap files (NVMe offload), removed by `close`."""
        return self._offload.swap_directories() if self._offload is not None else []

    def close(self) -> None:
        """Finish offload copies and I/O and remove this rank's swap files. The engine cannot
        train afterwards. Also happens when the engine is garbage collected, or at exit."""
        if self._close_offload is not None:
            self._close_offload()

    def _device_memory_breakdown(self) -> dict[str, int]:
        totals: collections.Counter[str] = collections.Counter()
        for unit in self._runtime.units:
            for group in unit.groups:
                totals.update(group.memory_bytes())
        totals["optimizer_states"] = sum(
            value.numel() * value.element_size()
            for state in self.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )
        return dict(totals)

    def full_state_dict(self, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The whole model's state_dict on CPU, on every rank: parameters from the fp32 masters
        (frozen ones in compute dtype) cast to `dtype` if given, buffers as they are. A collective:
        call it on all ranks."""
        self.finish_optimizer_step()
        values: dict[int, torch.Tensor] = {}
        for unit in self._runtime.units:
            for group in unit.groups:
                for slot, value in zip(group.slots, group.full_values()):
                    values[id(slot.param)] = value
        state = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            value = values.get(id(tensor), tensor.detach())
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            state[name] = value.cpu() if value.device.type != "cpu" else value.clone()
        return state

    def finish_optimizer_step(self) -> None:
        """Under optimizer offload the CPU steps in the background (and, with the delayed
        parameter update, publishes at the next step): wait for it and make the parameters
        current. Checkpoints and `full_state_dict` call it; so can code that reads states."""
        if self._host_adam is not None:
            self._host_adam.publish()

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(
        self, save_dir: str, tag: Optional[str] = None, client_state: Any = None, async_save: bool = False
    ) -> "checkpoint.SaveHandle":
        """Save to save_dir/<tag> (default global_step<N>): see zerokit.checkpoint.save_checkpoint."""
        return checkpoint.save_checkpoint(self, save_dir, tag, client_state, async_save)

    def load_checkpoint(
        self, load_dir: str, tag: Optional[str] = None, fallback_to_previous: bool = False,
        load_optimizer_states: bool = True,
    ) -> Any:
        """Restore from load_dir/<tag> (default: latest), resharding as needed; returns client_state."""
        return checkpoint.load_checkpoint(self, load_dir, tag, fallback_to_previous, load_optimizer_states)

    def wait_for_checkpoint(self) -> None:
        """Wait for the asynchronous save in flight, re-raising its error."""
        checkpoint.wait_for_checkpoint(self)

    @contextlib.contextmanager
    def _explain_oom(self, phase: str):
        try:
            yield
        except torch.OutOfMemoryError as error:
            held = self._device_memory_breakdown()
            detail = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in held.items())
            stage = self.config.zero_optimization.stage
            advice = [
                "lower train_micro_batch_size_per_gpu or the sequence length",
                "checkpoint activations (torch.utils.checkpoint on each block)",
            ]
            if stage < 3:
                advice.insert(0, f"raise zero_optimization.stage to {stage + 1}")
            if stage >= 1 and self._host_adam is None:
                advice.append("offload the optimizer (zero_optimization.offload_optimizer.device cpu)")
            elif self._host_adam is not None and self._device_groups:
                advice.append("offload more of the optimizer (raise zero_optimization.offload_optimizer.ratio)")
            if self._policy.shard_parameters:
                advice.append("lower stage3_prefetch_bucket_size")
            raise torch.OutOfMemoryError(
                f"{error}\nzerokit: out of memory during {phase} on rank {self.rank}; model states held: {detail}. "
                f"To fit: {'; '.join(advice)}."
            ) from error


def _stop_offload(host_adam: Optional[OffloadedAdam], offload: OffloadResources) -> None:
    """The stepping thread finishes first: it may still read swap files and upload buffers."""
    try:
        if host_adam is not None:
            host_adam.close()
    finally:
        offload.close()
