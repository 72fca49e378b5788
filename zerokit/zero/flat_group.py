"""One flat, sharded buffer of parameters: the storage mechanism behind every ZeRO stage.

[Note: flat layout]
The parameters of a group are laid out one after another (each offset aligned) in a flat
buffer padded to `num_shards * shard_numel` elements. Rank r owns elements
[r*shard_numel, (r+1)*shard_numel). The model's own Parameter objects keep their identity and
become views into the gathered buffer `full`; freeing that buffer's storage (stage 3) frees
all of them at once, and all-gathering into it makes them valid again. The views are created
with their own version counters, so writes into `full` never invalidate tensors that autograd
saved for backward.

The optimizer never sees the model's parameters: it steps one 1-D "piece" per parameter, the
part of that parameter inside this rank's fp32 master shard (possibly empty, then omitted).

[Note: offload placement]
Offload changes where a group keeps its states, not how it gathers, reduces or shards them
(under offload_optimizer.ratio < 1 only some trainable groups offload their optimizer; the
others keep the first column's placement):

| state                | no offload                    | optimizer offload         | parameter offload  |
|----------------------|-------------------------------|---------------------------|--------------------|
| fp32 master, moments | device: `master`, optimizer   | host/NVMe: host_optimizer | unchanged          |
| reduced gradients    | device: `grad_shard`          | pinned host: host_grads   | unchanged          |
| shard to gather from | `master` cast, `_frozen_shard` | device: `param_shard`    | host/NVMe: host_params |

(parameter offload and `param_shard` concern sharded groups, stage 3, only.)

Gathering a group with offloaded parameters uploads its shard into its slice of `full` and
all-gathers in place. Under optimizer offload the engine's OffloadedAdam writes the updated
shard through `open_update` / `finish_update` instead of `refresh`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from offload.copy_engine import CopyHandle
from zerokit.zero.collectives import Collectives
from zerokit.zero.host_optimizer import GroupUpdate, write_tiles
from zerokit.zero.param_sinks import DeviceUpload, HostShardWrite, Sink, StagedUpload
from zerokit.zero.streams import StreamSet

if TYPE_CHECKING:
    from zerokit.zero.offload_resources import OffloadResources

ALIGNMENT = 16  # elements: keeps every parameter view 32-byte aligned even in 16-bit dtypes


class GroupState(enum.Enum):
    SHARDED = "sharded"  # only this rank's shard exists
    GATHERING = "gathering"  # all-gather queued on the gather stream
    GATHERED = "gathered"  # full parameters usable on the compute stream


@dataclass(frozen=True)
class ShardingContext:
    device: torch.device
    compute_dtype: torch.dtype
    reduce_dtype: torch.dtype
    num_shards: int  # 1 when optimizer states are replicated (stage 0)
    shard_index: int
    comm: Collectives
    streams: StreamSet
    offload: Optional["OffloadResources"] = None


@dataclass(frozen=True)
class Slot:
    name: str
    param: nn.Parameter
    offset: int  # in the flat buffer
    numel: int


@dataclass(frozen=True)
class Piece:
    """The part of one parameter inside this rank's shard, in shard coordinates."""

    slot_index: int
    start: int
    stop: int


def layout(params: list[tuple[str, nn.Parameter]], num_shards: int) -> tuple[list[Slot], int]:
    """Slots of the parameters and the shard size in elements."""
    slots, offset = [], 0
    for name, param in params:
        slots.append(Slot(name, param, offset, param.numel()))
        offset += -(-param.numel() // ALIGNMENT) * ALIGNMENT
    shard_numel = -(-max(offset, 1) // (num_shards * ALIGNMENT)) * ALIGNMENT
    return slots, shard_numel


@dataclass
class PendingReduction:
    """A reduction in flight; its buffers stay referenced until the compute stream waited on it."""

    buffers: tuple[torch.Tensor, ...]
    done: Optional[torch.cuda.Event]
    numel: int


class FlatParamGroup:
    def __init__(
        self,
        slots: list[Slot],
        shard_numel: int,
        source: torch.Tensor,
        ctx: ShardingContext,
        *,
        trainable: bool,
        keep_gathered: bool,
        optimizer_offloaded: bool,
        key: str = "",
    ):
        """`source` is the fp32 flat buffer holding every parameter's initial value (identical on
        all ranks); the group keeps only what its policy needs and points the parameters at it.
        `optimizer_offloaded`: a trainable group's optimizer states live with `ctx.offload` (all
        groups under optimizer offload, some under ratio < 1: policy.py). `key` names the group's
        offloaded states (unique within the engine)."""
        self.slots = slots
        self.ctx = ctx
        self.trainable = trainable
        self.keep_gathered = keep_gathered
        self.shard_numel = shard_numel
        self.padded_numel = shard_numel * ctx.num_shards
        start = ctx.shard_index * shard_numel
        self._shard_range = (start, start + shard_numel)

        compute = ctx.compute_dtype
        offload = ctx.offload
        offload_optimizer = trainable and optimizer_offloaded
        offload_params = not keep_gathered and offload is not None and offload.policy.offloads_params
        # One fp32 buffer may serve as full params, master and gather source at once.
        self.full = source if compute == torch.float32 else source.to(compute)
        own = self.full[start : start + shard_numel]
        self.master: Optional[torch.Tensor] = None
        self._frozen_shard: Optional[torch.Tensor] = None
        self.param_shard: Optional[torch.Tensor] = None  # optimizer offload, sharded: the gather source
        self._source_ready: Optional[CopyHandle] = None  # param_shard's last upload
        self.host_grads = self.host_optimizer = self.host_params = None
        self.pieces = self._make_pieces() if trainable else []
        if offload_optimizer:
            master = source[start : start + shard_numel]
            ranges = [(piece.start, piece.stop) for piece in self.pieces]
            self.host_optimizer = offload.optimizer_state(f"{key}/optimizer", master, ranges)
            self.host_grads = offload.host_gradients(shard_numel)
            if not keep_gathered and not offload_params:
                self.param_shard = own.clone()
        elif trainable:
            aliased = compute == torch.float32 and keep_gathered
            self.master = own if aliased else source[start : start + shard_numel].clone()
        elif not keep_gathered and not offload_params:
            self._frozen_shard = own.clone()
        if offload_params:
            self.host_params = offload.param_shard(f"{key}/parameters", own)
        self.pending_update: Optional[GroupUpdate] = None  # an overlapped step's, until published
        delays = offload_optimizer and offload.policy.optimizer.delayed_parameter_update_after is not None
        self._staged = StagedUpload(shard_numel, compute, offload) if delays else None
        for slot in slots:
            alias = torch.empty(0, dtype=compute, device=ctx.device).set_(
                self.full.untyped_storage(), slot.offset, slot.param.shape
            )
            torch.utils.swap_tensors(slot.param, nn.Parameter(alias, requires_grad=slot.param.requires_grad))
        self.state = GroupState.GATHERED
        self._gathered_event = None
        self.grad_shard: Optional[torch.Tensor] = None  # fp32, allocated by the first reduction
        self.received_grad = [False] * len(slots)  # per slot, over the accumulation window
        self.optimizer_params = [self._optimizer_param(piece) for piece in self.pieces]
        # Alignment gaps and tail padding: zeroed in every reduction buffer, never written by a grad.
        ends = [slot.offset + slot.numel for slot in slots]
        starts = [slot.offset for slot in slots[1:]] + [self.padded_numel]
        self._gaps = [(end, start) for end, start in zip(ends, starts) if start > end]
        if not keep_gathered:
            self.reshard()

    # -- parameters ----------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return sum(slot.numel for slot in self.slots)

    def gather(self) -> None:
        """Queue the all-gather that makes the full parameters valid (no-op unless sharded)."""
        self.publish_update(on_use=True)
        if self.state is not GroupState.SHARDED:
            return
        streams = self.ctx.streams
        # Allocated on the compute stream, which alone frees it: see streams.py.
        self.full.untyped_storage().resize_(self.padded_numel * self.full.element_size())
        start, stop = self._shard_range
        if self.host_params is not None:  # upload the offloaded shard into its slice, gather in place
            ready = self.host_params.upload(self.full[start:stop])
        else:
            ready, self._source_ready = self._source_ready, None
        with streams.side(streams.gather):
            streams.wait(None if ready is None else ready.event)
            # The cast (if any) runs and is freed on the gather stream: see streams.py.
            source = self.full[start:stop] if self.host_params is not None else self._gather_source()
            self.ctx.comm.all_gather(self.full, source)
            self._gathered_event = streams.record(streams.gather)
        self.state = GroupState.GATHERING

    def read_ahead(self) -> None:
        """Start reading an NVMe-offloaded shard into host memory before it is gathered (never
        with an update pending: parameters on NVMe keep the step on the training thread)."""
        if self.host_params is not None and self.state is GroupState.SHARDED:
            self.host_params.read_ahead()

    def wait_gathered(self) -> None:
        self.publish_update(on_use=True)
        if self.state is GroupState.GATHERING:
            self.ctx.streams.wait(self._gathered_event)
            self._gathered_event = None
            self.state = GroupState.GATHERED

    def reshard(self) -> None:
        """Free the full parameters (stage 3); they must be gathered before their next use."""
        if self.keep_gathered or self.state is GroupState.SHARDED:
            return
        self.wait_gathered()
        self.full.untyped_storage().resize_(0)
        self.state = GroupState.SHARDED

    def _gather_source(self) -> torch.Tensor:
        if not self.trainable:
            return self._frozen_shard
        if self.param_shard is not None:
            return self.param_shard
        return self.master.to(self.ctx.compute_dtype)  # a no-op when the master is in compute dtype

    def refresh(self) -> None:
        """After an optimizer step on the device: make gathered parameters equal the updated
        master shards (offloaded optimizers publish theirs instead: open_update)."""
        if not self.trainable or self.host_optimizer is not None:
            return
        if self.host_params is not None:
            self._store_master_in_host_params()
            return
        if not self.keep_gathered:
            return  # sharded groups gather from the master at their next use
        streams = self.ctx.streams
        start, stop = self._shard_range
        own = self.full[start:stop]
        with streams.side(streams.gather):
            if own.data_ptr() != self.master.data_ptr():
                own.copy_(self.master)
            if self.ctx.num_shards > 1:
                self.ctx.comm.all_gather(self.full, own)
            self._gathered_event = streams.record(streams.gather)
        self.state = GroupState.GATHERING

    def _store_master_in_host_params(self) -> None:
        """Parameter offload without optimizer offload: the updated master, cast, goes back to
        the host shard (and, under nvme, to the swap file)."""
        streams = self.ctx.streams
        values = self.master.to(self.ctx.compute_dtype)
        target = self.host_params.writable()
        with streams.side(streams.to_host):
            target.copy_(values, non_blocking=True)
            fence = streams.fence(streams.to_host)
        streams.wait(fence.event if streams.enabled else None)  # `values` may be freed after this
        if not self.host_params.resident:
            fence.wait()
        self.host_params.commit()

    # -- optimizer offload: the updated shard ----------------------------------------------------

    def open_update(self, delayed: bool = False) -> Sink:
        """Where the offloaded optimizer writes this group's updated parameters, tile by tile;
        `delayed`: held on the host until published (delayed parameter update)."""
        if self.host_params is not None:
            return HostShardWrite(self.host_params)
        start, stop = self._shard_range
        target = self.param_shard if self.param_shard is not None else self.full[start:stop]
        return self._staged.open(target) if delayed else DeviceUpload(target, self.ctx.offload)

    def publish_update(self, on_use: bool = False) -> None:
        """Make the parameters of an optimizer step that ran on the stepping thread current:
        wait for the group's last tile, then upload (if delayed) and gather. `on_use`: called
        because the parameters are about to be used, which publishes all but delayed updates."""
        update = self.pending_update
        if update is None or (on_use and update.delayed):
            return
        self.pending_update = None
        update.publish()

    def finish_update(self, uploaded: Optional[CopyHandle]) -> None:
        """All tiles are written (and uploaded, the last upload completing with `uploaded`)."""
        if self.param_shard is not None:
            self._source_ready = uploaded  # the next gather waits for it
            return
        if not self.keep_gathered:
            return
        streams = self.ctx.streams
        start, stop = self._shard_range
        with streams.side(streams.gather):
            streams.wait(None if uploaded is None else uploaded.event)
            if self.ctx.num_shards > 1:
                self.ctx.comm.all_gather(self.full, self.full[start:stop])
            self._gathered_event = streams.record(streams.gather)
        self.state = GroupState.GATHERING

    # -- gradients -----------------------------------------------------------------------------

    def has_unreduced_grads(self) -> bool:
        return any(slot.param.grad is not None for slot in self.slots)

    def reduce_grads(self) -> PendingReduction:
        """Move the parameters' gradients into a flat buffer and reduce it into `grad_shard`."""
        ctx, streams = self.ctx, self.ctx.streams
        world = ctx.comm.world_size
        flat = torch.empty(self.padded_numel, dtype=ctx.reduce_dtype, device=ctx.device)
        for start, stop in self._gaps:
            flat[start:stop].zero_()
        for index, slot in enumerate(self.slots):
            grad = slot.param.grad
            view = flat[slot.offset : slot.offset + slot.numel]
            if grad is None:
                view.zero_()
            else:
                view.copy_(grad.reshape(-1))
                slot.param.grad = None
                self.received_grad[index] = True
        # fp16 sums can overflow: divide before reducing; other dtypes divide after, exactly once.
        predivide = ctx.reduce_dtype == torch.float16 and world > 1
        if predivide:
            flat.div_(world)
        with streams.side(streams.reduce):
            if ctx.num_shards > 1:
                reduced = torch.empty(self.shard_numel, dtype=ctx.reduce_dtype, device=ctx.device)
                ctx.comm.reduce_scatter(reduced, flat)
            else:
                ctx.comm.all_reduce(flat)
                reduced = flat
            scale = 1.0 if predivide else 1.0 / world
            if self.host_grads is not None:
                outgoing = self.host_grads.prepare(reduced, scale)
            elif self.grad_shard is None:
                self.grad_shard = reduced.float() if reduced.dtype != torch.float32 else reduced
                if scale != 1.0:
                    self.grad_shard.mul_(scale)
            else:
                self.grad_shard.add_(reduced, alpha=scale)
            done = streams.record(streams.reduce)
        if self.host_grads is None:
            return PendingReduction((flat, reduced), done, self.padded_numel)
        copied = self.host_grads.send(outgoing, 1.0 if self.host_grads.reductions == 1 else scale, done)
        # The device buffers are released once the compute stream waited on the copy.
        return PendingReduction((flat, reduced, outgoing), copied.event if streams.enabled else None, self.padded_numel)

    def reduced_grad(self) -> Optional[torch.Tensor]:
        """This accumulation window's reduced fp32 gradient shard, on the device or (optimizer
        offload) in host memory; None before the window's first reduction."""
        if self.host_grads is None:
            return self.grad_shard
        return self.host_grads.buffer if self.host_grads.reductions else None

    def attach_grads(self) -> None:
        """Point each optimizer piece's .grad at its part of the reduced shard; parameters that
        got no gradient in this accumulation window keep .grad None, as in plain PyTorch."""
        for piece, param in zip(self.pieces, self.optimizer_params):
            got = self.grad_shard is not None and self.received_grad[piece.slot_index]
            param.grad = self.grad_shard[piece.start : piece.stop] if got else None

    def release_grads(self) -> None:
        for param in self.optimizer_params:
            param.grad = None
        self.grad_shard = None
        if self.host_grads is not None:
            self.host_grads.clear()
        self.received_grad = [False] * len(self.slots)

    # -- optimizer view ------------------------------------------------------------------------

    def _make_pieces(self) -> list[Piece]:
        start, stop = self._shard_range
        pieces = []
        for index, slot in enumerate(self.slots):
            lo, hi = max(slot.offset, start), min(slot.offset + slot.numel, stop)
            if lo < hi:
                pieces.append(Piece(index, lo - start, hi - start))
        return pieces

    def _optimizer_param(self, piece: Piece) -> nn.Parameter:
        """The tensor an optimizer holds for a piece: a view of the master shard where that is in
        memory, else (master on NVMe) a meta tensor of its size that only names it."""
        master = self.master if self.host_optimizer is None else self.host_optimizer.master
        if master is None:
            return nn.Parameter(torch.empty(piece.stop - piece.start, device="meta"))
        return nn.Parameter(master[piece.start : piece.stop])

    def full_values(self) -> list[torch.Tensor]:
        """Every parameter's current value, gathered in full (fp32 masters for trainable groups)."""
        device = self.ctx.device
        if self.trainable:
            shard = self.master
            if self.host_optimizer is not None:
                shard = self.host_optimizer.read("master", 0, self.shard_numel).to(device)
            flat = torch.empty(self.padded_numel, dtype=torch.float32, device=device)
        elif self.keep_gathered:
            shard, flat = None, self.full
        else:
            shard = self._frozen_shard if self.host_params is None else self.host_params.read().to(device)
            flat = torch.empty(self.padded_numel, dtype=self.ctx.compute_dtype, device=device)
        if shard is not None:
            if self.ctx.num_shards > 1:
                self.ctx.comm.all_gather(flat, shard)
            else:
                flat.copy_(shard)
        return [flat[s.offset : s.offset + s.numel].view(s.param.shape).clone() for s in self.slots]

    # -- accounting ----------------------------------------------------------------------------

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now, by category (a buffer shared by two roles counts once)."""
        full = self.full.untyped_storage().nbytes()
        master = 0
        if self.master is not None and self.master.untyped_storage().data_ptr() != self.full.untyped_storage().data_ptr():
            master = self.master.numel() * self.master.element_size()
        shards = [t for t in (self._frozen_shard, self.param_shard) if t is not None]
        frozen = sum(t.numel() * t.element_size() for t in shards)
        grads = 0 if self.grad_shard is None else self.grad_shard.numel() * self.grad_shard.element_size()
        grads += sum(s.param.grad.numel() * s.param.grad.element_size() for s in self.slots if s.param.grad is not None)
        return {"parameters": full + frozen, "master_weights": master, "gradients": grads}

    # -- checkpoint support ---------------------------------------------------------------------

    def owned_range(self, slot_index: int) -> Optional[tuple[int, int]]:
        """Elements [start, stop) of the flattened parameter in slot `slot_index` that lie in this
        rank's shard, or None when none do."""
        slot = self.slots[slot_index]
        lo = max(slot.offset, self._shard_range[0])
        hi = min(slot.offset + slot.numel, self._shard_range[1])
        return (lo - slot.offset, hi - slot.offset) if lo < hi else None

    def shard_values(self, slot_index: int) -> Optional[torch.Tensor]:
        """This rank's values of `owned_range(slot_index)`, 1-D: the fp32 master for trainable
        groups, the compute-dtype shard for frozen ones. A view where the shard is in memory (on
        the device or the host), a copy where it is on NVMe; write with `set_shard_values`."""
        located = self._locate(slot_index)
        if located is None:
            return None
        lo, hi = located
        if self.host_optimizer is not None:
            return self.host_optimizer.read("master", lo, hi)
        if self.host_params is not None and not self.trainable:  # trainable ones: the fp32 master
            return self.host_params.read()[lo:hi]
        return self._resident_shard()[lo:hi]

    def set_shard_values(self, slot_index: int, values: torch.Tensor) -> None:
        """Write this rank's values of `owned_range(slot_index)`; call `rebuild_parameters` after."""
        lo, hi = self._locate(slot_index)
        if self.host_optimizer is not None:
            self.host_optimizer.write("master", lo, hi, values)
        elif self.host_params is not None and not self.trainable:
            self.host_params.write(lo, hi, values)
        else:
            self._resident_shard()[lo:hi].copy_(values)

    def _locate(self, slot_index: int) -> Optional[tuple[int, int]]:
        """Shard coordinates of `owned_range(slot_index)`."""
        owned = self.owned_range(slot_index)
        if owned is None:
            return None
        base = self.slots[slot_index].offset - self._shard_range[0]
        return base + owned[0], base + owned[1]

    def _resident_shard(self) -> torch.Tensor:
        if self.trainable:
            return self.master
        start, stop = self._shard_range
        return self._frozen_shard if self._frozen_shard is not None else self.full[start:stop]

    def rebuild_parameters(self) -> None:
        """After shard values were written: make the parameters equal them again. Gathered groups
        cast their shard into `full` and all-gather it (a collective); sharded groups are freed
        and gather the new values at their next use."""
        self.wait_gathered()
        if not self.keep_gathered:
            self.reshard()
        if self.host_optimizer is not None:
            update = GroupUpdate(self, {}, None)  # the masters, cast, to wherever the parameters live
            write_tiles([update], None)
            update.publish()
            return
        if self.host_params is not None:
            if self.trainable:
                self._store_master_in_host_params()
            return
        if not self.keep_gathered:
            return
        start, stop = self._shard_range
        own = self.full[start:stop]
        if self.trainable and own.data_ptr() != self.master.data_ptr():
            own.copy_(self.master)
        if self.ctx.num_shards > 1:
            self.ctx.comm.all_gather(self.full, own)
