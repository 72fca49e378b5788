"""Offset plans (where each tensor lives in one arena) and their verifier."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from planner.tensors import TensorLifetime, align_up, check_alignment, max_live_bytes


class PlanError(ValueError):
    """An offset plan is invalid: the message names the tensors at fault."""


@dataclass(frozen=True)
class OffsetPlan:
    """Offsets of tensors in one arena of ``peak_bytes`` bytes, and how good the plan is.

    Each tensor reserves its size rounded up to ``alignment``. ``lower_bound_bytes`` is the
    max-live bound; ``bound_bytes`` the best proven bound (the solver's when it beat max-live);
    ``gap`` is (peak - bound) / peak. ``method`` says which algorithm produced the offsets and
    ``note`` why that one was kept.
    """

    tensors: tuple[TensorLifetime, ...]
    offsets: Mapping[str, int]
    alignment: int
    peak_bytes: int
    lower_bound_bytes: int
    bound_bytes: int
    method: str
    optimal: bool
    gap: float
    solve_time_s: float
    note: str = ""

    def reserved_bytes(self, tensor: TensorLifetime) -> int:
        """Bytes the plan reserves for ``tensor``: its size aligned up."""
        return align_up(tensor.size, self.alignment)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of plain values."""
        return {
            "tensors": [[t.name, t.size, t.start, t.end] for t in self.tensors],
            "offsets": dict(self.offsets),
            "alignment": self.alignment,
            "peak_bytes": self.peak_bytes,
            "lower_bound_bytes": self.lower_bound_bytes,
            "bound_bytes": self.bound_bytes,
            "method": self.method,
            "optimal": self.optimal,
            "gap": self.gap,
            "solve_time_s": self.solve_time_s,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OffsetPlan:
        """Inverse of :meth:`to_dict`; raises ValueError on a malformed dict."""
        try:
            tensors = tuple(TensorLifetime(name, size, start, end) for name, size, start, end in data["tensors"])
            plan = cls(
                tensors=tensors,
                offsets={str(name): _int(offset, "offset") for name, offset in data["offsets"].items()},
                alignment=_int(data["alignment"], "alignment"),
                peak_bytes=_int(data["peak_bytes"], "peak_bytes"),
                lower_bound_bytes=_int(data["lower_bound_bytes"], "lower_bound_bytes"),
                bound_bytes=_int(data["bound_bytes"], "bound_bytes"),
                method=str(data["method"]),
                optimal=_bool(data["optimal"], "optimal"),
                gap=float(data["gap"]),
                solve_time_s=float(data["solve_time_s"]),
                note=str(data.get("note", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"malformed offset plan: {type(error).__name__}: {error}") from error
        return plan


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {value!r}")
    return value


def make_plan(
    tensors: Sequence[TensorLifetime],
    offsets: Mapping[str, int],
    alignment: int,
    *,
    method: str,
    solve_time_s: float,
    solver_bound_bytes: int | None = None,
    arena_bytes: int | None = None,
    note: str = "",
) -> OffsetPlan:
    """Build an OffsetPlan, deriving peak, bounds, gap and optimality from the offsets.

    The peak is the top of the highest tensor, or ``arena_bytes`` when the arena is given.
    """
    sizes = [align_up(t.size, alignment) for t in tensors]
    peak = max((offsets[t.name] + size for t, size in zip(tensors, sizes)), default=0)
    if arena_bytes is not None:
        if arena_bytes < peak:
            raise PlanError(f"tensors reach byte {peak}, beyond the arena of {arena_bytes} bytes")
        peak = arena_bytes
    lower_bound = max_live_bytes(sizes, tensors)
    bound = max(lower_bound, solver_bound_bytes or 0)
    bound = min(bound, peak)  # a bound above a feasible peak can only be rounding noise
    return OffsetPlan(
        tensors=tuple(tensors),
        offsets=dict(offsets),
        alignment=alignment,
        peak_bytes=peak,
        lower_bound_bytes=lower_bound,
        bound_bytes=bound,
        method=method,
        optimal=peak <= bound,
        gap=(peak - bound) / peak if peak > 0 else 0.0,
        solve_time_s=solve_time_s,
        note=note,
    )


def verify_plan(plan: OffsetPlan) -> None:
    """Raise PlanError unless every tensor has a non-negative aligned offset inside the arena and
    no two tensors with overlapping lifetimes overlap in address space."""
    check_offsets(plan.tensors, plan.offsets, plan.alignment, arena_bytes=plan.peak_bytes)
    if plan.lower_bound_bytes > plan.peak_bytes:
        raise PlanError(
            f"peak {plan.peak_bytes} bytes is below the max-live lower bound {plan.lower_bound_bytes}: "
            "the plan's numbers are inconsistent"
        )


def check_offsets(
    tensors: Sequence[TensorLifetime],
    offsets: Mapping[str, int],
    alignment: int,
    *,
    arena_bytes: int | None = None,
) -> None:
    """Raise PlanError if the offsets do not form a valid placement of ``tensors``.

    Sweeps the events in time order keeping the live address ranges sorted: the live set is
    disjoint by induction, so each new range only needs checking against its two neighbours.
    """
    check_alignment(alignment)
    names = {t.name for t in tensors}
    extra = sorted(set(offsets) - names)
    if extra:
        raise PlanError(f"offsets given for unknown tensors: {extra[:5]}")
    events = []
    for tensor in tensors:
        if tensor.name not in offsets:
            raise PlanError(f"tensor {tensor.name!r} has no offset")
        offset = offsets[tensor.name]
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise PlanError(f"tensor {tensor.name!r}: offset must be an int, got {offset!r}")
        if offset < 0:
            raise PlanError(f"tensor {tensor.name!r}: offset {offset} is negative")
        if offset % alignment:
            raise PlanError(f"tensor {tensor.name!r}: offset {offset} is not a multiple of the alignment {alignment}")
        size = align_up(tensor.size, alignment)
        if arena_bytes is not None and offset + size > arena_bytes:
            raise PlanError(
                f"tensor {tensor.name!r} ends at byte {offset + size}, beyond the arena of {arena_bytes} bytes"
            )
        if size > 0:
            events.append((tensor.start, 1, offset, offset + size, tensor))
            events.append((tensor.end, 0, offset, offset + size, tensor))
    live: list[tuple[int, int, str]] = []
    owner: dict[str, TensorLifetime] = {}
    for _, is_alloc, low, high, tensor in sorted(events, key=lambda e: (e[0], e[1], e[4].name)):
        entry = (low, high, tensor.name)
        if not is_alloc:
            live.pop(bisect.bisect_left(live, entry))
            continue
        position = bisect.bisect_left(live, entry)
        for other in live[max(position - 1, 0) : position + 1]:
            if other[0] < high and low < other[1]:
                raise PlanError(
                    f"tensors {owner[other[2]]} and {tensor} overlap in time and in address space: "
                    f"bytes [{other[0]}, {other[1]}) and [{low}, {high})"
                )
        live.insert(position, entry)
        owner[tensor.name] = tensor
