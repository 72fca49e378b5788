"""Tensors with lifetimes: the input of dynamic storage allocation, and facts derived from it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class TensorLifetime:
    """A tensor of ``size`` bytes that is alive over the half-open event interval [start, end).

    Two tensors overlap in time when each starts before the other ends, so a tensor freed at
    event t may share memory with one allocated at event t.
    """

    name: str
    size: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tensor name must be a non-empty string, got {self.name!r}")
        for field_name in ("size", "start", "end"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"tensor {self.name!r}: {field_name} must be an int, got {type(value).__name__} {value!r}"
                )
        if self.size < 0:
            raise ValueError(f"tensor {self.name!r}: size must be >= 0 bytes, got {self.size}")
        if self.end <= self.start:
            raise ValueError(
                f"tensor {self.name!r}: lifetime [{self.start}, {self.end}) is empty; "
                "end must be greater than start (a tensor lives at least over the event that allocates it)"
            )

    def overlaps(self, other: TensorLifetime) -> bool:
        """Whether the two lifetimes share at least one event."""
        return self.start < other.end and other.start < self.end


def align_up(nbytes: int, alignment: int) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment``."""
    return -(-nbytes // alignment) * alignment


def check_alignment(alignment: int) -> None:
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1:
        raise ValueError(f"alignment must be a positive int number of bytes (e.g. 512), got {alignment!r}")


def check_unique_names(tensors: Sequence[TensorLifetime]) -> None:
    seen: set[str] = set()
    for tensor in tensors:
        if not isinstance(tensor, TensorLifetime):
            raise TypeError(f"expected TensorLifetime, got {type(tensor).__name__}: {tensor!r}")
        if tensor.name in seen:
            raise ValueError(f"tensor name {tensor.name!r} appears twice; every tensor needs a unique name")
        seen.add(tensor.name)


def overlapping_pairs(tensors: Sequence[TensorLifetime]) -> list[tuple[int, int]]:
    """Index pairs (i, j), i < j, of tensors whose lifetimes overlap (the edge set E)."""
    order = sorted(range(len(tensors)), key=lambda k: (tensors[k].start, k))
    active: list[int] = []
    pairs: list[tuple[int, int]] = []
    for k in order:
        start = tensors[k].start
        active = [a for a in active if tensors[a].end > start]
        pairs.extend((min(a, k), max(a, k)) for a in active)
        active.append(k)
    pairs.sort()
    return pairs


def neighbours(count: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Adjacency lists of the overlap graph."""
    adjacent: list[list[int]] = [[] for _ in range(count)]
    for i, j in pairs:
        adjacent[i].append(j)
        adjacent[j].append(i)
    return adjacent


def max_live_bytes(sizes: Sequence[int], tensors: Sequence[TensorLifetime]) -> int:
    """The largest total size alive at one event: no placement can use less memory."""
    events = []
    for size, tensor in zip(sizes, tensors):
        events.append((tensor.start, 1, size))
        events.append((tensor.end, 0, -size))  # at equal times frees (0) sort before allocations (1)
    live = peak = 0
    for _, _, delta in sorted(events):
        live += delta
        peak = max(peak, live)
    return peak


def size_unit(sizes: Sequence[int], alignment: int) -> int:
    """The largest common divisor of all sizes that is a multiple of ``alignment``."""
    unit = 0
    for size in sizes:
        unit = math.gcd(unit, size)
    return unit if unit > 0 else alignment
