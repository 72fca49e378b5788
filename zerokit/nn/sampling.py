"""Winner-take-all column-row sampling (WTA-CRS): which rows of a layer input to keep.

For Z = H Wᵀ the weight gradient is a sum of per-row outer products, ∇W = Σ_i ∇Z_iᵀ H_i.
WTA-CRS keeps a budget of k rows: the |C| rows of largest probability ("winners") exactly, and
k − |C| rows drawn i.i.d. from the others, each reweighted so the estimate stays unbiased.

[Note: unbiasedness]
Let p_i > 0 for every row that can contribute (H_i ≠ 0), P_C the mass of the winners and
R the other rows with positive mass, P_R = Σ_R p_j. The estimate is
    Σ_{i∈C} g_i + (1/k_s) Σ_{t=1..k_s} g_{j_t} P_R / p_{j_t},   j_t ~ p_j / P_R i.i.d.,
with g_i = ∇Z_iᵀ H_i. Each draw has expectation Σ_{j∈R} (p_j/P_R) g_j P_R / p_j = Σ_R g_j, so
the estimate has expectation Σ_C g_i + Σ_R g_j = ∇W (rows outside C ∪ R have H_i = 0, g_i = 0).
This holds for any C chosen before the draws and any positive p, so it holds in every branch:
whatever the cached gradient norms are (stale, missing, zero), ties, k = 1, or all rows winners.
A row drawn twice is kept twice (the sum is the same as with merged weights, and a fixed count
of k rows needs no host synchronisation to size the saved tensor). p is a function of
the forward input and of norms cached in earlier steps, never of the draws or of this step's ∇Z,
so the choice of C does not depend on the randomness either. |C| = k (no draws) is only taken
when at most k rows have positive mass, and then the estimate is the exact sum.

Choice of |C| (as published): with q_c the cumulative mass of the c largest p (q_0 = 0), take
|C| = argmin_c (1 − q_c)/(k − c) over c = 0 … k−1; the rule "|C| = 0 when the minimum over
c ≥ 1 exceeds 1/k" is the same thing up to exact ties, since the c = 0 term is exactly 1/k.

Everything here runs on the device of its inputs without a host synchronisation, in float64 so
products of norms cannot underflow.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple, Optional

import torch
from torch import Tensor

# A row whose norm is inf/nan becomes a winner: it reaches ∇W exactly as in exact training, so
# an overflow is seen by loss scalers instead of being hidden (or crashing the sampler).
_NONFINITE_ROW_MASS = 1e300


class RowSample(NamedTuple):
    """k rows kept for the weight gradient and the weight of each (1 for winners, 0 for spare
    slots); a row drawn twice appears twice."""

    indices: Tensor  # int64, k of them
    weights: Tensor  # float32


def row_budget(keep_ratio: float, rows: int) -> int:
    """k = ceil(keep_ratio · rows), at least 1 and at most rows (exact for decimal ratios like 0.3)."""
    if rows == 0:
        return 0
    return min(rows, max(1, math.ceil(Fraction(repr(keep_ratio)) * rows)))


def sampling_mass(input_norms: Tensor, grad_norms: Optional[Tensor]) -> Tensor:
    """Unnormalised p_i ∝ ‖H_i‖·‖∇Z_i‖ in float64.

    ``grad_norms`` are cached per-row ‖∇Z_i‖; rows without a usable one (missing, zero or not
    finite) get the mean of the usable ones, and with none usable p_i ∝ ‖H_i‖. Any positive
    stand-in keeps the estimate unbiased; a typical value keeps its variance low.
    """
    mass = input_norms.to(torch.float64)
    if grad_norms is not None:
        # Unusable norms become 0, so "usable" is just "> 0" and they add nothing to the mean.
        grad = torch.nan_to_num(grad_norms.to(torch.float64), nan=0.0, posinf=0.0).clamp_(min=0.0)
        usable = grad > 0
        count = usable.sum()
        typical = torch.where(count > 0, grad.sum() / count.clamp(min=1), 1.0)
        mass = mass * torch.where(usable, grad, typical)
    return torch.nan_to_num(mass, nan=_NONFINITE_ROW_MASS, posinf=_NONFINITE_ROW_MASS, neginf=_NONFINITE_ROW_MASS)


def sample_rows(mass: Tensor, k: int, generator: Optional[torch.Generator] = None) -> RowSample:
    """Choose rows by WTA-CRS for unnormalised row masses ``mass`` (≥ 0) and budget ``k``.

    Exactly k (index, weight) slots are returned; see [Note: unbiasedness] for why Σ w_i g_i over
    them is an unbiased estimate of Σ_i g_i for every row term g_i that vanishes where mass is 0.
    """
    n = mass.numel()
    if mass.dim() != 1 or not 1 <= k <= max(n, 1):
        raise ValueError(f"sample_rows needs a 1-D mass and 1 <= k <= len(mass); got shape {tuple(mass.shape)}, k={k}")
    return choose_rows(mass, draw_uniforms(k, generator, mass.device))


def draw_uniforms(k: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """The k uniform numbers in [0, 1) that choose_rows turns into draws (float64)."""
    return torch.rand(k, dtype=torch.float64, device=device, generator=generator)


def choose_rows(mass: Tensor, uniforms: Tensor) -> RowSample:
    """sample_rows's choice for given uniforms: k = len(uniforms) slots, no host synchronisation."""
    n, k = mass.numel(), uniforms.numel()
    device = mass.device
    mass = mass.to(torch.float64)
    positive_rows = (mass > 0).sum()

    top_mass, top_rows = torch.topk(mass, k, sorted=True)
    mass_before = torch.cumsum(top_mass, 0).sub_(top_mass)  # q_c for c = 0 … k−1
    slots_left = torch.arange(k, 0, -1, device=device)  # k − c
    best_winners = torch.argmin((mass.sum() - mass_before) / slots_left)
    # At most k rows with positive mass: keep them all, nothing is left to sample (exact).
    winners = torch.where(positive_rows <= k, positive_rows, best_winners)

    is_winner_slot = torch.arange(k, device=device) < winners
    # The winners' mass zeroed in place of a full-length mask: the top rows are distinct.
    rest_mass = mass.scatter(0, top_rows, top_mass.masked_fill(is_winner_slot, 0.0))
    cdf = torch.cumsum(rest_mass, 0)
    rest_total = cdf[-1]

    # Inverse-CDF draws below P_R: a zero-mass row has an empty interval and is never drawn.
    targets = torch.minimum(uniforms * rest_total, torch.nextafter(rest_total, rest_total.new_zeros(())))
    drawn = torch.searchsorted(cdf, targets, right=True).clamp_(max=n - 1)  # n only when P_R = 0 (unused)

    # k slots, no data-dependent size (so no host synchronisation): slot c < |C| holds the c-th
    # winner, the others one draw each, weighted P_R / (k_s p_j); with nothing left to draw
    # (P_R = 0) the spare slots carry weight 0.
    draws_wanted = (k - winners).clamp_(min=1)
    draw_weight = rest_total / (draws_wanted * mass.index_select(0, drawn))
    draw_weight = torch.where(rest_total > 0, draw_weight, 0.0)
    indices = torch.where(is_winner_slot, top_rows, drawn)
    weights = draw_weight.masked_fill_(is_winner_slot, 1.0)
    return RowSample(indices, weights.to(torch.float32))
