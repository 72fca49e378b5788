"""Typed configuration of WTA-CRS conversion (the fields are convert_to_wtacrs's arguments)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

from zerokit.nn.linear import check_keep_ratio

Patterns = Optional[Union[str, Iterable[str]]]


def _patterns(field_name: str, value: Patterns) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"wtacrs.{field_name} must be a list of module-name patterns (fnmatch), got {value!r}")
    return patterns


@dataclass(frozen=True)
class WTACRSConfig:
    """Which linear layers become WTA-CRS layers, and how they sample.

    keep_ratio: fraction of input rows kept for the weight gradient, in (0, 1].
    include / exclude: fnmatch patterns of fully-qualified module names; a pattern also matches
        every layer below a module it names. include replaces the default selection (the linear
        layers inside the repeated blocks of a ModuleList, never the output head); exclude is
        removed from whichever selection applies.
    dataset_size: number of samples, to preallocate the gradient-norm cache; None grows it.
    same_samples_across_ranks: draw the same rows on every data-parallel rank (off: independent).
    """

    keep_ratio: float = 0.3
    include: Optional[tuple[str, ...]] = None
    exclude: Optional[tuple[str, ...]] = None
    dataset_size: Optional[int] = None
    same_samples_across_ranks: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_ratio", check_keep_ratio(self.keep_ratio))
        object.__setattr__(self, "include", _patterns("include", self.include))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))
        if self.dataset_size is not None and (
            isinstance(self.dataset_size, bool) or not isinstance(self.dataset_size, int) or self.dataset_size < 1
        ):
            raise ValueError(
                f"wtacrs.dataset_size must be a positive int (the data set's length) or None, got {self.dataset_size!r}"
            )
        if not isinstance(self.same_samples_across_ranks, bool):
            raise ValueError(
                f"wtacrs.same_samples_across_ranks must be true or false, got {self.same_samples_across_ranks!r}"
            )
