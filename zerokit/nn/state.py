"""State the WTA-CRS layers of one model share: the norm cache, the current batch, the seeds.

[Note: where samples must agree]
- A forward and its checkpointed recomputation must draw the same rows and consume the global
  RNG identically (or dropout after the layer would differ between the two). Each training
  forward therefore draws exactly one seed from the global CPU generator (checkpointing saves
  and restores its state), whether or not gradients are enabled, and samples with a private
  generator seeded from it; the cached norms it reads are frozen for the whole batch.
- Data-parallel ranks need not agree and should not: each rank estimates the gradient of its own
  micro-batch, and independent draws make the averaged estimate's variance fall with the number
  of ranks. Ranks seeded alike (the usual torch.manual_seed(seed) everywhere) are decorrelated
  by mixing the rank into the seed, unless ``same_samples_across_ranks`` is set.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from zerokit.nn.function import KeptRows, row_norms
from zerokit.nn.norm_cache import GradNormCache
from zerokit.nn.sampler_graphs import SamplerGraphs

logger = logging.getLogger("zerokit")

_SEED_BOUND = 2**62
_RANK_SEED_STRIDE = 0x9E3779B97F4A7C15  # odd: distinct ranks differ in the low 32 bits a CPU generator uses


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class SamplingState:
    """Shared by the WTA-CRS layers of one model (convert_to_wtacrs makes one per call)."""

    def __init__(self, cache: Optional[GradNormCache] = None, same_samples_across_ranks: bool = False) -> None:
        self.cache = cache if cache is not None else GradNormCache()
        self.same_samples_across_ranks = same_samples_across_ranks
        self._batch: Optional[Tensor] = None
        self._lookups: dict[tuple[int, int, torch.device], Optional[Tensor]] = {}
        self._warned_slots: set[int] = set()
        # Samples of live input tensors, so layers reading one input in one forward save one
        # sample of it; emptied by every backward, so no sample serves two gradient estimates.
        self._shared: dict[tuple[int, float, torch.dtype], tuple[weakref.ref, int, KeptRows]] = {}
        self.sampler = SamplerGraphs()
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # per-batch entries (weak references included), graphs and streams are not kept
        state["_lookups"], state["_shared"], state["sampler"], state["_side_streams"] = {}, {}, SamplerGraphs(), {}
        return state

    @contextlib.contextmanager
    def beside(self, device: torch.device) -> Iterator[Optional[Callable[[], None]]]:
        """Run the block's work on a side stream (CUDA), after what the current stream has queued.

        Yields join, which makes the current stream wait for that work (None off CUDA: the work
        ran in line). A layer samples beside its own matmul and joins before it saves the sample,
        so everything later in the current stream (a copy of saved tensors to the host included)
        sees it complete, and the memory it read is not reused before it is done.
        """
        if device.type != "cuda":
            yield None
            return
        stream = self._side_streams.get(device)
        if stream is None:
            stream = self._side_streams[device] = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            yield functools.partial(current.wait_stream, stream)

    @property
    def batch_indices(self) -> Optional[Tensor]:
        """Sample indices of the current batch (int64, on the CPU), or None."""
        return self._batch

    def set_batch(self, indices: Optional[Tensor]) -> None:
        """Start a new batch: apply the norms staged by the previous backward, then switch indices."""
        self.cache.commit()
        if indices is not None:
            self.cache.check_indices(indices)
        self._batch = indices
        self._lookups.clear()
        self._shared.clear()

    def draw_seed(self) -> int:
        """One draw from the global CPU generator, decorrelated across ranks (see the note above)."""
        seed = int(torch.randint(_SEED_BOUND, (), dtype=torch.int64))
        if not self.same_samples_across_ranks:
            seed = (seed + _RANK_SEED_STRIDE * _global_rank()) % 2**63
        return seed

    def batch_for(self, slot: int, input: Tensor) -> Optional[Tensor]:
        """The batch's sample indices when ``input`` is batch-first for them, else None (fallback)."""
        batch = self._batch
        if batch is None:
            return None
        if input.dim() >= 2 and input.shape[0] == len(batch):
            return batch
        if slot not in self._warned_slots:
            self._warned_slots.add(slot)
            logger.warning(
                "a WTA-CRS layer got an input of shape %s whose first dimension is not the batch of %d sample "
                "indices; it samples without the gradient-norm cache (p ∝ ‖H_i‖). Inputs must be batch-first "
                "for the cache to apply.", tuple(input.shape), len(batch),
            )
        return None

    def cached_grad_norms(self, slot: int, indices: Tensor, tokens: int, device: torch.device) -> Optional[Tensor]:
        """Per-row cached ‖∇Z‖ (flattened, bfloat16, on ``device``; 0 = unknown), or None if none cached.

        Looked up once per batch, so a checkpointed recomputation sees what its forward saw.
        """
        key = (slot, tokens, device)
        if key not in self._lookups:
            norms = self.cache.lookup(slot, indices, tokens, pinned=device.type == "cuda")
            self._lookups[key] = None if norms is None else norms.reshape(-1).to(device, non_blocking=True)
        return self._lookups[key]

    def observe_backward(self, slot: int, indices: Optional[Tensor], grad_rows: Tensor) -> None:
        """Called with a layer's exact ∇Z rows in backward: caches their norms for the samples ``indices``."""
        self._shared.clear()
        if indices is not None:
            self.cache.record(slot, indices, row_norms(grad_rows).reshape(len(indices), -1))

    def shared_rows(self, input: Tensor, keep_ratio: float, dtype: torch.dtype) -> Optional[KeptRows]:
        """The sample another layer already kept of this very ``input`` (unchanged since), if any."""
        entry = self._shared.get((id(input), keep_ratio, dtype))
        if entry is None:
            return None
        reference, version, kept = entry
        return kept if reference() is input and input._version == version else None

    def share_rows(self, input: Tensor, keep_ratio: float, dtype: torch.dtype, kept: KeptRows) -> None:
        """Offer ``kept`` to later layers reading ``input``; forgotten when ``input`` is freed."""
        key = (id(input), keep_ratio, dtype)
        shared = self._shared
        shared[key] = (weakref.ref(input, lambda _: shared.pop(key, None)), input._version, kept)
