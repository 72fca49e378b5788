"""Greedy placements: fast, always valid, and the MIP's upper bound and warm start."""
from __future__ import annotations

import time
from typing import Sequence

from planner.plan import OffsetPlan, make_plan
from planner.tensors import (
    TensorLifetime,
    align_up,
    check_alignment,
    check_unique_names,
    neighbours,
    overlapping_pairs,
)


def place_in_order(sizes: Sequence[int], adjacent: Sequence[Sequence[int]], order: Sequence[int]) -> list[int]:
    """Place tensors one by one in ``order``, each at the lowest offset where it does not collide
    with an already placed tensor whose lifetime overlaps its own."""
    offsets: list[int | None] = [None] * len(sizes)
    for k in order:
        taken = sorted((offsets[j], offsets[j] + sizes[j]) for j in adjacent[k] if offsets[j] is not None)
        candidate = 0
        for low, high in taken:
            if candidate + sizes[k] <= low:
                break
            candidate = max(candidate, high)
        offsets[k] = candidate
    return [offset if offset is not None else 0 for offset in offsets]


def best_fit(tensors: Sequence[TensorLifetime], alignment: int = 512) -> OffsetPlan:
    """Greedy by size: largest tensor first, each at the lowest free offset."""
    return _greedy(tensors, alignment, "best_fit", lambda t, size, k: (-size, t.start, k))


def first_fit(tensors: Sequence[TensorLifetime], alignment: int = 512) -> OffsetPlan:
    """Greedy by time: tensors in allocation order, each at the lowest free offset."""
    return _greedy(tensors, alignment, "first_fit", lambda t, size, k: (t.start, -size, k))


def best_heuristic(tensors: Sequence[TensorLifetime], alignment: int = 512) -> OffsetPlan:
    """The lower-peak plan of :func:`best_fit` and :func:`first_fit` (best_fit on ties)."""
    by_size = best_fit(tensors, alignment)
    by_time = first_fit(tensors, alignment)
    return by_time if by_time.peak_bytes < by_size.peak_bytes else by_size


def _greedy(tensors: Sequence[TensorLifetime], alignment: int, method: str, key) -> OffsetPlan:
    started = time.perf_counter()
    check_alignment(alignment)
    check_unique_names(tensors)
    sizes = [align_up(t.size, alignment) for t in tensors]
    order = sorted(range(len(tensors)), key=lambda k: key(tensors[k], sizes[k], k))
    placed = place_in_order(sizes, neighbours(len(tensors), overlapping_pairs(tensors)), order)
    offsets = {t.name: offset for t, offset in zip(tensors, placed)}
    return make_plan(tensors, offsets, alignment, method=method, solve_time_s=time.perf_counter() - started)
