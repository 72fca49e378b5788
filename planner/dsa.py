"""Offline dynamic storage allocation: the MIP where it helps, the greedy plan where it cannot."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

from planner.heuristics import best_heuristic
from planner.mip import solve_placement_mip
from planner.plan import OffsetPlan, PlanError, check_offsets, make_plan
from planner.tensors import TensorLifetime, align_up, check_alignment, overlapping_pairs, size_unit

logger = logging.getLogger("planner")


@dataclass(frozen=True)
class DsaConfig:
    """How to solve one allocation problem.

    alignment: every tensor's size is rounded up to, and every offset is a multiple of, this.
    time_limit_s: HiGHS time budget (building the model comes on top); when it runs out, the
        best plan found so far is kept.
    use_solver: False keeps the greedy plan (no MIP).
    max_solver_pairs: above this many overlapping pairs (binaries) the MIP is not attempted.
    solver_log: print HiGHS's log.
    """

    alignment: int = 512
    time_limit_s: float = 10.0
    use_solver: bool = True
    max_solver_pairs: int = 20_000
    solver_log: bool = False

    def __post_init__(self) -> None:
        check_alignment(self.alignment)
        if not self.time_limit_s >= 0:
            raise ValueError(f"time_limit_s must be >= 0 seconds, got {self.time_limit_s!r}")
        if self.max_solver_pairs < 0:
            raise ValueError(f"max_solver_pairs must be >= 0, got {self.max_solver_pairs!r}")


def solve_dsa(tensors: Sequence[TensorLifetime], config: DsaConfig = DsaConfig()) -> OffsetPlan:
    """Place ``tensors`` in one arena of least size, so no two with overlapping lifetimes share bytes.

    Runs best-fit and first-fit, then the MIP (warm-started with the better greedy plan, which
    also bounds it) unless the greedy plan already meets the max-live bound. The MIP result is
    kept only when it is lower; on timeout without one, or any solver failure, the greedy plan is
    returned and ``note`` says why. ``gap`` uses HiGHS's proven bound when it beats max-live.
    """
    started = time.perf_counter()
    tensors = tuple(tensors)
    heuristic = best_heuristic(tensors, config.alignment)

    def keep_heuristic(note: str, bound: int | None = None) -> OffsetPlan:
        return make_plan(
            tensors,
            heuristic.offsets,
            config.alignment,
            method=heuristic.method,
            solve_time_s=time.perf_counter() - started,
            solver_bound_bytes=bound,
            note=note,
        )

    if heuristic.optimal:
        return keep_heuristic("greedy plan meets the max-live lower bound")
    if not config.use_solver:
        return keep_heuristic("solver disabled")
    # zero-byte tensors need no memory: they stay at offset 0 and out of the MIP
    placed = [k for k, t in enumerate(tensors) if t.size > 0]
    sub_tensors = [tensors[k] for k in placed]
    pairs = overlapping_pairs(sub_tensors)
    if len(pairs) > config.max_solver_pairs:
        return keep_heuristic(
            f"{len(pairs)} overlapping pairs exceed max_solver_pairs={config.max_solver_pairs}; greedy plan kept"
        )
    sizes = [align_up(t.size, config.alignment) for t in sub_tensors]
    unit = size_unit(sizes, config.alignment)
    try:
        result = solve_placement_mip(
            [size // unit for size in sizes],
            pairs,
            [heuristic.offsets[t.name] // unit for t in sub_tensors],
            heuristic.peak_bytes // unit,
            heuristic.lower_bound_bytes // unit,
            time_limit_s=config.time_limit_s,
            log=config.solver_log,
        )
    except Exception as error:  # any solver failure falls back to the always-valid greedy plan
        logger.warning("planner: MIP solver failed (%s: %s); keeping the greedy plan", type(error).__name__, error)
        return keep_heuristic(f"solver failed ({type(error).__name__}: {error}); greedy plan kept")
    bound = result.bound * unit if result.bound is not None else None
    if result.offsets is None:
        return keep_heuristic(f"solver stopped ({result.status}) without a solution; greedy plan kept", bound)
    offsets = {t.name: 0 for t in tensors}
    offsets.update({t.name: offset * unit for t, offset in zip(sub_tensors, result.offsets)})
    try:
        check_offsets(tensors, offsets, config.alignment)
    except PlanError as error:
        return keep_heuristic(f"solver solution failed verification ({error}); greedy plan kept", bound)
    mip_plan = make_plan(
        tensors,
        offsets,
        config.alignment,
        method="mip",
        solve_time_s=time.perf_counter() - started,
        solver_bound_bytes=bound,
        note=f"solver status {result.status}",
    )
    if mip_plan.peak_bytes < heuristic.peak_bytes:
        return mip_plan
    return keep_heuristic(f"solver ({result.status}) found nothing below the greedy plan; greedy plan kept", bound)
