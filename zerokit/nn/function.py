"""Autograd function of a WTA-CRS linear layer: exact forward and ∇H, sampled ∇W."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from zerokit.nn.sampler_graphs import SamplerGraphs, sample_eagerly
from zerokit.nn.sampling import row_budget

BackwardObserver = Callable[[Tensor], None]


class KeptRows(NamedTuple):
    """What a WTA-CRS layer saves of its input: distinct rows, their row indices and weights."""

    rows: Tensor  # (kept, in_features), the input's dtype
    indices: Tensor  # (kept,) int64
    weights: Tensor  # (kept,) float32


# Half-precision rows are widened to float32 for their norms and weighting. CUDA kernels widen
# in registers, in one pass; CPU kernels widen into a temporary copy, so there rows go a slice at
# a time: a full float32 copy of a layer input would cost twice the memory the sample saves.
_WIDEN_ELEMENTS = 1 << 22


def _rows_per_slice(rows: Tensor) -> int:
    if rows.device.type == "cuda" or torch.promote_types(rows.dtype, torch.float32) == rows.dtype:
        return max(rows.shape[0], 1)
    return max(1, _WIDEN_ELEMENTS // max(rows.shape[1], 1))


def row_norms(rows: Tensor) -> Tensor:
    """Per-row 2-norms in at least float32 (a half-precision norm would overflow or round)."""
    dtype = torch.promote_types(rows.dtype, torch.float32)
    step = _rows_per_slice(rows)
    if rows.shape[0] <= step:
        return torch.linalg.vector_norm(rows, dim=1, dtype=dtype)
    return torch.cat([torch.linalg.vector_norm(part, dim=1, dtype=dtype) for part in rows.split(step)])


def weighted_rows(rows: Tensor, weights: Tensor) -> Tensor:
    """rows · weights[:, None], multiplied in at least float32 and rounded once to the rows' dtype."""
    out = torch.empty_like(rows)
    step = _rows_per_slice(rows)
    if rows.shape[0] <= step:
        return torch.mul(rows, weights.unsqueeze(1), out=out)
    for part, source, weight in zip(out.split(step), rows.split(step), weights.split(step)):
        torch.mul(source, weight.unsqueeze(1), out=part)
    return out


@torch.no_grad()
def keep_rows(
    input: Tensor, keep_ratio: float, seed: int, grad_norms: Optional[Tensor], sampler: Optional[SamplerGraphs] = None
) -> KeptRows:
    """Sample the rows of ``input`` (leading dimensions flattened) by WTA-CRS with a seeded generator
    (through ``sampler``'s CUDA graphs when given: the same rows, fewer launches)."""
    rows = input.reshape(-1, input.shape[-1])
    if rows.shape[0] == 0:
        indices = torch.empty(0, dtype=torch.int64, device=input.device)
        return KeptRows(rows, indices, indices.to(torch.float32))
    budget = row_budget(keep_ratio, rows.shape[0])
    if budget == rows.shape[0]:  # every row kept: the exact gradient, no sampling
        indices = torch.arange(budget, device=input.device)
        return KeptRows(rows, indices, torch.ones(budget, dtype=torch.float32, device=input.device))
    # The meta device has no generator; a CPU one draws meta tensors (shapes only) just as well.
    generator = torch.Generator(device="cpu" if input.is_meta else input.device)
    generator.manual_seed(seed)
    sample = sampler.sample if sampler is not None else sample_eagerly
    indices, weights = sample(row_norms(rows), grad_norms, budget, generator)
    return KeptRows(rows.index_select(0, indices), indices, weights)


class WTACRSLinearFunction(torch.autograd.Function):
    """Z = H Wᵀ + b saving only ``kept`` rows of H for ∇W = Σ_i w_i ∇Z_iᵀ H_i.

    W is saved as given (the parameter itself outside autocast), never copied, so a parameter
    whose storage is freed after forward and gathered again before backward works.
    ``observe_backward`` receives the exact ∇Z rows in backward (for the gradient-norm cache).
    ``join``, when given, waits for ``kept`` being drawn on a side stream (see SamplingState.beside).
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        kept: KeptRows,
        observe_backward: Optional[BackwardObserver],
        join: Optional[Callable[[], None]],
    ) -> Tensor:
        ctx.input_shape = input.shape
        ctx.observe_backward = observe_backward
        output = F.linear(input, weight, bias)
        if join is not None:
            join()  # ``kept`` is being drawn on a side stream: wait for it before anything reads it
        ctx.save_for_backward(weight, *kept)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        weight, kept_rows, kept_indices, kept_weights = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (grad_rows @ weight).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            # The weights scale H's rows (not ∇Z's): in the fallback p ∝ ‖H_i‖ the scaled rows all
            # have about the same norm, so half precision cannot overflow there.
            grad_weight = grad_rows.index_select(0, kept_indices).t() @ weighted_rows(kept_rows, kept_weights)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        if ctx.observe_backward is not None:
            ctx.observe_backward(grad_rows)
        return grad_input, grad_weight, grad_bias, None, None, None
