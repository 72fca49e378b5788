"""The `activation_memory` configuration section."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

POLICIES = ("memo", "recompute", "swap", "none")
BLOCK_POLICIES = ("keep", "recompute", "swap", "memo")


@dataclass(frozen=True)
class ActivationMemoryConfig:
    """How the activations that transformer blocks save for backward are stored.

    policy: "memo" (block input and attention output swapped to host memory, a fraction alpha of
        the other activations' tokens swapped and the rest recomputed token-wise), "recompute"
        (full activation checkpointing), "swap" (everything to host memory) or "none".
    alpha: fraction of tokens swapped under memo; None plans it from bandwidth and host memory.
    host_memory_budget: bytes of host memory this process may use for swapped activations;
        None takes half of the available memory, shared by the processes of this node.
    host_bandwidth: host link bandwidth in bytes/s for planning alpha; None measures it.
    plan_cache: directory for cached restore-buffer plans; None keeps them in memory only.
    blocks: class names of the blocks; empty finds the repeated blocks of a ModuleList.
    keep_last: the last blocks run their backward right after their forward, so swapping or
        recomputing them gains nothing: this many keep their activations (memo and swap).
    restore_buffers: device buffers that swapped blocks are restored into in backward (memo and
        swap), each the size of the largest block's activations: 2 restores a block while the
        next one runs its backward; 1 halves that memory for the longest sequences, and each
        block's copies back then wait for the backward of the block after it.
    block_policies: one of keep | recompute | swap | memo per block, overriding `policy`.
    sequence_dim: dimension of the tokens in a block's hidden-state input (1 for batch-first).
    """

    policy: str = "memo"
    alpha: Optional[float] = None
    host_memory_budget: Optional[int] = None
    host_bandwidth: Optional[float] = None
    plan_cache: Optional[str] = None
    blocks: tuple[str, ...] = ()
    keep_last: int = 2
    restore_buffers: int = 2
    block_policies: tuple[str, ...] = ()
    sequence_dim: int = 1

    def __post_init__(self) -> None:
        _check(self.policy in POLICIES, "policy", self.policy, "one of " + ", ".join(POLICIES))
        if self.alpha is not None:
            _check(_is_number(self.alpha) and 0.0 <= self.alpha <= 1.0, "alpha", self.alpha,
                   "a number in [0, 1], or null to plan it")
        if self.host_memory_budget is not None:
            _check(_is_int(self.host_memory_budget) and self.host_memory_budget >= 0, "host_memory_budget",
                   self.host_memory_budget, "a number of bytes >= 0, or null for half the available memory")
        if self.host_bandwidth is not None:
            _check(_is_number(self.host_bandwidth) and self.host_bandwidth > 0, "host_bandwidth",
                   self.host_bandwidth, "bytes per second > 0, or null to measure it")
        if self.plan_cache is not None:
            _check(isinstance(self.plan_cache, str) and self.plan_cache != "", "plan_cache", self.plan_cache,
                   "a directory path, or null")
        _check(_is_names(self.blocks), "blocks", self.blocks, "a list of module class names")
        _check(_is_int(self.keep_last) and self.keep_last >= 0, "keep_last", self.keep_last, "an integer >= 0")
        _check(self.restore_buffers in (1, 2) and _is_int(self.restore_buffers), "restore_buffers",
               self.restore_buffers, "1 or 2")
        _check(_is_names(self.block_policies) and all(p in BLOCK_POLICIES for p in self.block_policies),
               "block_policies", self.block_policies, "a list with one of " + ", ".join(BLOCK_POLICIES) + " per block")
        _check(_is_int(self.sequence_dim) and self.sequence_dim >= 0, "sequence_dim", self.sequence_dim,
               "an integer >= 0")

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> "ActivationMemoryConfig":
        """Build from a JSON-like mapping (lists become tuples); unknown keys are errors."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(
                f"unknown activation_memory key(s) {unknown}; valid keys: {', '.join(sorted(known))}."
            )
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
        return cls(**values)


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"activation_memory.{key}={value!r} is invalid: expected {expected}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_names(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)
