"""Dynamic storage allocation as a mixed integer program (MEMO's formulation), solved by HiGHS.

    minimise M  s.t.  A_i + S_i <= M
                      A_i + S_i <= A_j + z_ij * Mcap
                      A_j + S_j <= A_i + (1 - z_ij) * Mcap      for every overlapping pair (i, j)

z_ij = 0 puts i below j, z_ij = 1 puts j below i. Sizes are expressed in a common unit (a multiple
of the alignment) so the coefficients stay small; with integral sizes some optimal placement has
integral offsets, so a bound within one unit of the incumbent proves it optimal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pulp

from planner.highs import solve_with_highs


@dataclass(frozen=True)
class MipResult:
    """Offsets in units (None when HiGHS found no solution) and the proven lower bound in units."""

    offsets: list[int] | None
    bound: int | None
    status: str
    time_s: float


def solve_placement_mip(
    sizes: Sequence[int],
    pairs: Sequence[tuple[int, int]],
    start_offsets: Sequence[int],
    upper_bound: int,
    lower_bound: int,
    *,
    time_limit_s: float,
    log: bool = False,
) -> MipResult:
    """Solve the placement MIP for positive integer ``sizes`` (in units).

    ``start_offsets`` is a feasible placement with peak ``upper_bound``: it seeds HiGHS and makes
    ``upper_bound`` a valid Mcap. ``lower_bound`` (max-live) is added as a cut on M because the
    big-M relaxation alone only proves max(S_i).
    """
    problem = pulp.LpProblem("dynamic_storage_allocation", pulp.LpMinimize)
    peak = problem.add_variable("M", lowBound=lower_bound, upBound=upper_bound)
    offsets = [problem.add_variable(f"A_{i}", lowBound=0, upBound=upper_bound - size) for i, size in enumerate(sizes)]
    problem += peak
    for i, size in enumerate(sizes):
        problem += offsets[i] + size <= peak, f"peak_{i}"
    start = {"M": float(upper_bound)}
    start.update({f"A_{i}": float(offset) for i, offset in enumerate(start_offsets)})
    for i, j in pairs:
        below = problem.add_variable(f"z_{i}_{j}", cat="Binary")
        problem += offsets[i] + sizes[i] <= offsets[j] + upper_bound * below, f"i_below_{i}_{j}"
        problem += offsets[j] + sizes[j] <= offsets[i] + upper_bound * (1 - below), f"j_below_{i}_{j}"
        start[f"z_{i}_{j}"] = 0.0 if start_offsets[i] + sizes[i] <= start_offsets[j] else 1.0
    outcome = solve_with_highs(problem, mip=True, time_limit_s=time_limit_s, abs_gap=0.99, start=start, log=log)
    bound = math.ceil(outcome.best_bound - 1e-6) if outcome.best_bound is not None else None
    placed = None
    if outcome.has_solution:
        placed = compact([outcome.values[f"A_{i}"] for i in range(len(sizes))], sizes, pairs)
    return MipResult(offsets=placed, bound=bound, status=outcome.status, time_s=outcome.time_s)


def compact(raw_offsets: Sequence[float], sizes: Sequence[int], pairs: Sequence[tuple[int, int]]) -> list[int]:
    """Integral offsets that keep the solver's stacking order and never lie above its offsets.

    In a valid placement the tensor with the lower midpoint of an overlapping pair is the one
    below, so visiting tensors by midpoint and putting each right on top of its placed
    neighbours yields the tightest placement with that order, free of solver round-off.
    """
    adjacent: list[list[int]] = [[] for _ in sizes]
    for i, j in pairs:
        adjacent[i].append(j)
        adjacent[j].append(i)
    order = sorted(range(len(sizes)), key=lambda k: (raw_offsets[k] + sizes[k] / 2, k))
    placed: list[int | None] = [None] * len(sizes)
    for k in order:
        placed[k] = max((placed[j] + sizes[j] for j in adjacent[k] if placed[j] is not None), default=0)
    return [int(offset) for offset in placed]
