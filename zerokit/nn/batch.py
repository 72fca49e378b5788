"""Telling a model's WTA-CRS layers which samples the current batch holds."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from zerokit.nn.linear import WTACRSLinear
from zerokit.nn.state import SamplingState

Indices = Optional[Union[Tensor, Sequence[int]]]


def sampling_states(model: nn.Module) -> list[SamplingState]:
    """The distinct SamplingState objects of the WTA-CRS layers in ``model``."""
    states = {id(m.sampling_state): m.sampling_state for m in model.modules() if isinstance(m, WTACRSLinear)}
    return list(states.values())


def set_sample_indices(model: nn.Module, indices: Indices) -> None:
    """Declare the data-set indices of the batch about to run forward and backward (None: unknown).

    One index per sample, in batch order (inputs must be batch-first). They stay in effect until
    the next call, so put the call before the forward; a checkpointed recomputation during the
    backward then sees them too. Each call first stores the norms recorded by the last backward.
    """
    states = sampling_states(model)
    if not states:
        raise ValueError("the model has no WTA-CRS layers: call zerokit.nn.convert_to_wtacrs(model) first")
    batch = _as_indices(indices)
    for state in states:
        state.set_batch(batch)


@contextlib.contextmanager
def sample_indices(model: nn.Module, indices: Indices) -> Iterator[None]:
    """Context form of set_sample_indices; run the forward *and* the backward inside it.

    A checkpointed layer recomputes its forward during backward; if that happens after the block
    exits it samples without the cache (still unbiased, but a different sample and no update).
    """
    previous = [state.batch_indices for state in sampling_states(model)]
    set_sample_indices(model, indices)
    try:
        yield
    finally:
        for state, batch in zip(sampling_states(model), previous):
            state.set_batch(batch)


def _as_indices(indices: Indices) -> Optional[Tensor]:
    if indices is None:
        return None
    batch = torch.as_tensor(indices)
    if batch.dim() != 1 or batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool:
        raise ValueError(
            "sample indices must be a 1-D sequence of integer data-set indices, one per sample of the batch; "
            f"got a {batch.dtype} tensor of shape {tuple(batch.shape)}"
        )
    batch = batch.to("cpu", torch.int64)
    if batch.numel() and int(batch.min()) < 0:
        raise ValueError(f"sample indices must be >= 0, got {int(batch.min())}")
    return batch
