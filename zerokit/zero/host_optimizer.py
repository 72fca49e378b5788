"""ZeRO-Offload's optimizer: Adam/AdamW on the CPU over this rank's shards, tile by tile.

[Note: the offloaded step]
The fp32 master weights and both Adam moments of each offloaded trainable group (every one, or
under offload_optimizer.ratio < 1 those of the last units in forward order: see [Note: partial
optimizer offload] in policy.py) live in host memory (offload_optimizer.device cpu) or in the
swap file, one extent per tile and state (nvme). The gradient shards are already in pinned host
memory (host_gradients.py) when the step begins; the kernel multiplies them by clipping's
coefficient as it reads them (no pass of its own). For every tile, the native kernel
(offload.cpu_adam.adam_step_tile) updates master and moments in place and writes the new
parameters in compute dtype (low_precision_out) into one of offload_optimizer.buffer_count
pinned upload buffers, which is copied to the device on the to-device stream while the CPU goes
on with the next tiles (or, when the parameters themselves are offloaded, straight into their
host shard). Under nvme the swapper reads tile i+1 while tile i is stepped and writes tile i
back while tile i+1 is, across all groups in one stream. Once a group's last tile is written,
the training thread publishes it (see OffloadedAdam): all-gathered (gathered groups) or marked
as the source of its next gather (sharded ones). Collectives stay on the training thread, in the
order parameters are used, the same on every rank.

Hyper-parameters are read at every step from the user's optimizer (`engine.optimizer`), whose
param_groups are re-pointed at this rank's pieces as without offload: learning-rate schedulers,
per-group lr and weight decay and checkpoints of param_groups work unchanged. Its `state` holds
no offloaded piece: each one's step count and moments live here, with torch's semantics (a piece
that got no gradient in a window is not stepped, its count does not advance). Under partial
offload the same optimizer steps the device groups' pieces itself, the only ones given a .grad.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from offload.cpu_adam import AdamHyperParams, adam_step_tile
from offload.raw_memory import aligned_size
from zerokit.config import ConfigError, OptimizerConfig
from zerokit.zero.param_sinks import Sink
from zerokit.zero.tiles import Tile, plan_tiles

if TYPE_CHECKING:
    from zerokit.zero.flat_group import FlatParamGroup
    from zerokit.zero.offload_resources import OffloadResources

STATES = ("master", "exp_avg", "exp_avg_sq")


def check_offloadable(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer offload steps Adam or AdamW with its own kernel: refuse anything else."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        raise ConfigError(
            f"zero_optimization.offload_optimizer steps Adam/AdamW with zerokit's CPU kernel, but the optimizer is "
            f"{type(optimizer).__name__}: use torch.optim.AdamW or torch.optim.Adam, or turn optimizer offload off."
        )
    for index, group in enumerate(optimizer.param_groups):
        for option in ("amsgrad", "maximize", "differentiable"):
            if group.get(option, False):
                raise ConfigError(
                    f"optimizer param group {index} sets {option}=True, which the offloaded CPU Adam does not "
                    "implement: drop it, or turn optimizer offload off."
                )


def check_offloadable_config(config: OptimizerConfig) -> None:
    """The config's `optimizer` section, under optimizer offload: Adam or AdamW only."""
    if config.type.lower() not in ("adam", "adamw"):
        raise ConfigError(
            f"zero_optimization.offload_optimizer steps Adam/AdamW with zerokit's CPU kernel, but optimizer.type is "
            f"{config.type!r}: use Adam or AdamW, or turn optimizer offload off."
        )
    for option in ("amsgrad", "maximize"):
        if config.params.get(option, False):
            raise ConfigError(
                f"optimizer.params.{option} is true, which the offloaded CPU Adam does not implement: drop it, or "
                "turn optimizer offload off."
            )


def hyper_params(optimizer: torch.optim.Optimizer, group: dict) -> AdamHyperParams:
    beta1, beta2 = group["betas"]
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    return AdamHyperParams(
        float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]), decoupled
    )


class HostOptimizerState:
    """The fp32 master weights and Adam moments of one group's shard, and each piece's step."""

    def __init__(self, key: str, master: torch.Tensor, pieces: list[tuple[int, int]], resources: "OffloadResources"):
        """master: the shard's initial fp32 values (any device); pieces: [start, stop) in the shard."""
        self.key = key
        self.numel = master.numel()
        self.resources = resources
        self.tiles: list[Tile] = plan_tiles(self.numel, pieces, resources.policy.optimizer.tile_size)
        self.steps = [0] * len(pieces)
        self.swapper = resources.optimizer_swapper
        self._cache: dict[str, tuple[int, torch.Tensor]] = {}  # nvme: the last tile read per state
        if self.swapper is None:
            self.states = {
                name: resources.host_tensor(self.numel, torch.float32, category, False, f"{name} shard")
                for name, category in zip(STATES, ("master_weights", "optimizer_states", "optimizer_states"))
            }
            self.states["master"].copy_(master)
            self.states["exp_avg"].zero_()
            self.states["exp_avg_sq"].zero_()
            return
        self.states = None
        for index, tile in enumerate(self.tiles):
            buffers = self._tile_views(index, resources.nvme_staging[0])
            buffers[0].copy_(master[tile.start : tile.stop])
            buffers[1].zero_()
            buffers[2].zero_()
            for key, buffer in zip(self.tile_keys(index), buffers):
                self.swapper.swap_out(key, buffer).wait()
            extent = aligned_size(tile.numel * 4)
            resources.count_nvme("master_weights", extent)
            resources.count_nvme("optimizer_states", 2 * extent)

    @property
    def master(self) -> Optional[torch.Tensor]:
        """The whole master shard, when it is in host memory."""
        return None if self.states is None else self.states["master"]

    def tile_keys(self, index: int) -> list[str]:
        return [f"{self.key}/{index}/{name}" for name in STATES]

    def tile_states(self, index: int) -> list[torch.Tensor]:
        """Host memory only: the tile's master and moments."""
        tile = self.tiles[index]
        return [self.states[name][tile.start : tile.stop] for name in STATES]

    # -- element ranges, for checkpoints ---------------------------------------------------------

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of state `name` (a view in host memory, else a copy)."""
        if self.states is not None:
            return self.states[name][start:stop]
        out = torch.empty(stop - start, dtype=torch.float32)
        for index, tile in self._overlapping(start, stop):
            lo, hi = max(start, tile.start), min(stop, tile.stop)
            out[lo - start : hi - start].copy_(self._read_tile(name, index)[lo - tile.start : hi - tile.start])
        return out

    def write(self, name: str, start: int, stop: int, values: torch.Tensor) -> None:
        if self.states is not None:
            self.states[name][start:stop].copy_(values)
            return
        position = STATES.index(name)
        for index, tile in self._overlapping(start, stop):
            current = self._read_tile(name, index)
            lo, hi = max(start, tile.start), min(stop, tile.stop)
            current[lo - tile.start : hi - tile.start].copy_(values[lo - start : hi - start])
            self.swapper.swap_out(self.tile_keys(index)[position], current).wait()

    def piece_state(self, piece: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        """A piece's state as torch.optim.Adam keeps it ({} before its first step)."""
        if self.steps[piece] == 0:
            return {}
        state = {"step": torch.tensor(float(self.steps[piece]))}
        for name in STATES[1:]:
            state[name] = self.read(name, start, stop)
        return state

    def load_piece_state(self, piece: int, start: int, stop: int, state: dict) -> None:
        if not state:
            self.steps[piece] = 0
            for name in STATES[1:]:
                self.write(name, start, stop, torch.zeros(stop - start))
            return
        self.steps[piece] = int(float(state["step"]))
        for name in STATES[1:]:
            self.write(name, start, stop, state[name].reshape(-1).float())

    def forget_cached_tiles(self) -> None:
        """Before the tiles change on NVMe (an optimizer step)."""
        self._cache = {}

    def _overlapping(self, start: int, stop: int):
        return [(i, tile) for i, tile in enumerate(self.tiles) if tile.start < stop and start < tile.stop]

    def _read_tile(self, name: str, index: int) -> torch.Tensor:
        cached = self._cache.get(name)
        if cached is not None and cached[0] == index:
            return cached[1]
        key = self.tile_keys(index)[STATES.index(name)]
        buffer = _aligned_empty(self.tiles[index].numel)
        self.swapper.swap_in(key, buffer).wait()
        self._cache[name] = (index, buffer)
        return buffer

    def _tile_views(self, index: int, staging: torch.Tensor) -> list[torch.Tensor]:
        """The tile's three states laid out in a staging buffer as the swapper streams them."""
        numel, views, offset = self.tiles[index].numel, [], 0
        for _ in STATES:
            views.append(staging[offset : offset + numel * 4].view(torch.float32))
            offset += aligned_size(numel * 4)
        return views


def _aligned_empty(numel: int) -> torch.Tensor:
    from offload.host_memory import allocate_host_buffer

    return allocate_host_buffer(numel * 4, pin=False).tensor.view(torch.float32)


# -- the step ---------------------------------------------------------------------------------------

TileFn = Callable[[int, list[torch.Tensor]], None]


def for_each_tile(jobs: Sequence[tuple[HostOptimizerState, int]], fn: TileFn, write_back: bool) -> None:
    """fn(job index, [master, exp_avg, exp_avg_sq] of the job's tile) for each (state, tile index),
    in order; under nvme through the swapper's read-ahead / write-behind double buffering."""
    if not jobs:
        return
    swapper = jobs[0][0].swapper
    if swapper is None:
        for position, (state, index) in enumerate(jobs):
            fn(position, state.tile_states(index))
        return
    positions = iter(range(len(jobs)))
    keys = [state.tile_keys(index) for state, index in jobs]
    staging = jobs[0][0].resources.nvme_staging
    swapper.stream(keys, staging, lambda views: fn(next(positions), views), write_back=write_back)


@dataclasses.dataclass
class GroupUpdate:
    """One group's part of an optimizer step, made on the training thread, filled by the stepping
    one: the pieces to step (piece -> hyper-parameters; the others are only written), the
    gradient shard they read, and where the new parameters go."""

    group: "FlatParamGroup"
    pieces: dict[int, AdamHyperParams]
    grads: Optional[torch.Tensor]
    delayed: bool = False  # published at the next step rather than at the parameters' next use
    written: Future = dataclasses.field(default_factory=Future)  # resolves to the filled sink

    def publish(self) -> None:
        """On the training thread: once every tile is written, upload (if held) and gather."""
        self.group.finish_update(self.written.result().publish())


def write_tiles(updates: Sequence[GroupUpdate], coefficient: Optional[float], threads: Optional[int] = None) -> None:
    """Walk the groups' tiles in order: step the pieces of each update with gradients scaled by
    `coefficient`, and write every parameter's new value (the cast master where nothing stepped)
    into the group's sink; each update's `written` resolves after its last tile, or with the
    error that stopped the walk (the training thread waits on it)."""
    jobs = [(u.group.host_optimizer, i) for u in updates for i in range(len(u.group.host_optimizer.tiles))]
    owners = [u for u in updates for _ in u.group.host_optimizer.tiles]
    sinks: dict[int, Sink] = {}

    def step_tile(position: int, states: list[torch.Tensor]) -> None:
        (state, index), update = jobs[position], owners[position]
        if index == 0:
            sinks[id(update)] = update.group.open_update(update.delayed)
        sink, tile = sinks[id(update)], state.tiles[index]
        out = sink.buffer(tile)
        _step_tile(tile, states, update.grads, state.steps, update.pieces, coefficient, out, threads)
        sink.commit(tile, out)
        if index == len(state.tiles) - 1:
            sink.close()
            update.written.set_result(sink)

    try:
        for update in updates:
            update.group.host_optimizer.forget_cached_tiles()
        for_each_tile(jobs, step_tile, write_back=any(u.pieces for u in updates))
    except BaseException as error:
        for update in updates:
            if not update.written.done():
                update.written.set_exception(error)
        raise


class OffloadedAdam:
    """Steps the offloaded groups; with `overlap`, on a background thread.

    [Note: the overlapped step]
    `step` hands the step to one worker thread and returns; the groups go in forward order (the
    engine orders them), and each group's parameters are published (uploaded, gathered) when the
    training thread first needs them (FlatParamGroup.publish_update, from gather), so the next
    forward runs as the CPU goes. Masters, moments and gradient shards are the worker's until
    `wait`: gradients of the next backward land only after it (`before_backward`), checkpoints
    read states only after it. Collectives stay on the training thread.
    With the delayed parameter update, the next forward and backward do not wait: they run on the
    old parameters, gradients land in each group's second shard, and the updates are published
    at the next `step`, which then starts the next one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, groups: list["FlatParamGroup"], overlap: bool,
                 delay_after: Optional[int]):  # fmt: skip
        check_offloadable(optimizer)
        self.optimizer = optimizer
        self.groups = groups
        self.delay_after = delay_after
        index_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        # Per group, per piece: the optimizer param group stepping it, or None (not optimized).
        self._param_group = [[index_of.get(id(p)) for p in group.optimizer_params] for group in groups]
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="zerokit-cpu-optimizer") if overlap else None
        self._job: Optional[Future] = None
        self._delayed = False  # the step in flight is published at the next step

    def step(self, coefficient: Optional[float], global_step: int) -> None:
        """Start optimizer step `global_step` (the engine's count) over every group with gradients;
        `coefficient` scales gradients (clipping). Publishes the previous step's parameters first
        if they are still pending."""
        self.publish()
        hyper = [hyper_params(self.optimizer, g) for g in self.optimizer.param_groups]
        delayed = self.delay_after is not None and global_step >= self.delay_after
        updates = []
        for group, param_groups in zip(self.groups, self._param_group):
            received = group.host_grads.reductions > 0
            pieces = {
                i: hyper[param_groups[i]]
                for i, piece in enumerate(group.pieces)
                if received and group.received_grad[piece.slot_index] and param_groups[i] is not None
            }
            for i in pieces:
                group.host_optimizer.steps[i] += 1
            updates.append(GroupUpdate(group, pieces, group.host_grads.buffer, delayed))
            if delayed:
                group.host_grads.rotate()
        if self._worker is None:
            write_tiles(updates, coefficient)
            for update in updates:
                update.publish()
            return
        for update in updates:
            update.group.pending_update = update
        self._delayed = delayed
        self._job = self._worker.submit(_in_device_context(write_tiles), updates, coefficient, _worker_threads())

    def wait(self) -> None:
        """Block until the step in flight has written every state (re-raising its error)."""
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def publish(self) -> None:
        """Wait for the step in flight and publish every group's parameters not yet published."""
        self.wait()
        for group in self.groups:
            group.publish_update()

    def before_backward(self) -> None:
        """Gradients are about to land in the host shards: the step reading them must be over."""
        if not self._delayed:
            self.publish()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._worker is not None:
                self._worker.shutdown()


def _worker_threads() -> int:
    """CPU threads of the overlapped step: one core stays with the training thread, which
    launches the next forward's kernels meanwhile."""
    return max(1, torch.get_num_threads() - 1)


def _in_device_context(fn: Callable) -> Callable:
    """`fn` run on another thread with this thread's current CUDA device and stream, which are
    per thread (events and copies must land on the training thread's device and stream)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return fn
    device, stream = torch.cuda.current_device(), torch.cuda.current_stream()

    def run(*args):
        torch.cuda.set_device(device)
        with torch.cuda.stream(stream):
            return fn(*args)

    return run


def _step_tile(
    tile: Tile,
    states: list[torch.Tensor],
    grad: torch.Tensor,
    steps: list[int],
    stepping: dict[int, AdamHyperParams],
    coefficient: Optional[float],
    out: torch.Tensor,
    threads: Optional[int] = None,
) -> None:
    """Step the tile's pieces that have gradients and write every element's new value into `out`
    (compute dtype): the kernel's rounded output, or the master cast like a refresh without offload."""
    master, exp_avg, exp_avg_sq = states
    low_precision = out.dtype != torch.float32
    for segment in tile.segments:
        lo, hi = segment.start - tile.start, segment.stop - tile.start
        hyper = stepping.get(segment.piece) if segment.piece is not None else None
        if hyper is None:
            out[lo:hi].copy_(master[lo:hi])
            continue
        adam_step_tile(
            master[lo:hi], grad[tile.start + lo : tile.start + hi], exp_avg[lo:hi], exp_avg_sq[lo:hi],
            step=steps[segment.piece], hyper=hyper, low_precision_out=out[lo:hi] if low_precision else None,
            grad_scale=1.0 if coefficient is None else coefficient, num_threads=threads,
        )  # fmt: skip
        if not low_precision:
            out[lo:hi].copy_(master[lo:hi])
