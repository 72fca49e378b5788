"""MEMO's token swap fraction alpha: how much of a layer's other skeletal activations go to host memory.

Every swapped layer sends its input (S_in) and attention output (S_attn) to the host in full,
and a fraction alpha of the tokens of its other skeletal activations (S_oth); the rest is
recomputed before backward. The copy must hide behind the layer's forward (bandwidth B, time
T_layer) and all n - k swapped layers must fit in host memory M_cpu (the last k layers are never
swapped; k = 2 in the paper):

    maximise alpha  s.t.  S_in + S_attn + alpha * S_oth <= B * T_layer
                          (n - k) * (S_in + S_attn + alpha * S_oth) <= M_cpu
                          0 <= alpha <= 1

whose solution is alpha = clip(min((B T - S_in - S_attn) / S_oth, (M_cpu / (n-k) - S_in - S_attn) / S_oth), 0, 1).
When the mandatory swaps alone break a constraint there is no feasible alpha; both forms then
return alpha = 0 with ``mandatory_fits`` False, so the caller knows the transfer will stall
(bandwidth) or cannot be held (host memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pulp

from planner.highs import solve_with_highs

BANDWIDTH = "bandwidth"
HOST_MEMORY = "host_memory"
NOTHING = "none"  # alpha = 1: every token fits
NO_SWAPPABLE_LAYERS = "no_swappable_layers"

_NUMBERS = (
    "bandwidth_bytes_per_s",
    "layer_forward_s",
    "input_bytes",
    "attention_bytes",
    "other_bytes",
    "host_memory_bytes",
)
_GIB = float(1 << 30)  # LP rows are scaled to GiB so HiGHS sees moderate coefficients


@dataclass(frozen=True)
class SwapInputs:
    """Per-layer sizes in bytes, host link bandwidth in bytes/s, one layer's forward time in s,
    host memory for this rank in bytes, the number of layers and how many of the last ones keep
    their activations (never swapped)."""

    bandwidth_bytes_per_s: float
    layer_forward_s: float
    input_bytes: float
    attention_bytes: float
    other_bytes: float
    host_memory_bytes: float
    num_layers: int
    kept_layers: int = 2

    def __post_init__(self) -> None:
        for name in _NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {self.num_layers!r}")
        if isinstance(self.kept_layers, bool) or not isinstance(self.kept_layers, int) or self.kept_layers < 0:
            raise ValueError(f"kept_layers must be an int >= 0, got {self.kept_layers!r}")

    @property
    def swapped_layers(self) -> int:
        """Layers that swap (all but the last kept_layers)."""
        return max(self.num_layers - self.kept_layers, 0)

    @property
    def bandwidth_room(self) -> float:
        """Bytes the link moves during one layer's forward, beyond the mandatory swaps."""
        return self.bandwidth_bytes_per_s * self.layer_forward_s - self.input_bytes - self.attention_bytes

    @property
    def host_memory_room(self) -> float:
        """Host bytes per swapped layer, beyond the mandatory swaps."""
        return self.host_memory_bytes / self.swapped_layers - self.input_bytes - self.attention_bytes


@dataclass(frozen=True)
class SwapFraction:
    """alpha in [0, 1]; ``limited_by`` names the binding constraint ("bandwidth", "host_memory"),
    "none" when alpha = 1 with room to spare, or "no_swappable_layers" when n <= k."""

    alpha: float
    limited_by: str
    mandatory_fits: bool


def swap_fraction(inputs: SwapInputs) -> SwapFraction:
    """alpha from the closed form."""
    special = _degenerate(inputs)
    if special is not None:
        return special
    by_bandwidth = inputs.bandwidth_room / inputs.other_bytes
    by_memory = inputs.host_memory_room / inputs.other_bytes
    limited_by = BANDWIDTH if by_bandwidth <= by_memory else HOST_MEMORY
    best = min(by_bandwidth, by_memory)
    if best >= 1.0:
        return SwapFraction(1.0, NOTHING if best > 1.0 else limited_by, True)
    return SwapFraction(max(best, 0.0), limited_by, best >= 0.0)


def swap_fraction_lp(inputs: SwapInputs, time_limit_s: float = 10.0) -> SwapFraction:
    """alpha from the linear program, solved with HiGHS."""
    special = _degenerate(inputs)
    if special is not None:
        return special
    problem = pulp.LpProblem("swap_fraction", pulp.LpMaximize)
    alpha = problem.add_variable("alpha", lowBound=0, upBound=1)
    problem += alpha
    mandatory = inputs.input_bytes + inputs.attention_bytes
    other = inputs.other_bytes / _GIB
    bandwidth_rhs = (inputs.bandwidth_bytes_per_s * inputs.layer_forward_s) / _GIB
    memory_rhs = inputs.host_memory_bytes / _GIB
    problem += mandatory / _GIB + other * alpha <= bandwidth_rhs, BANDWIDTH
    problem += inputs.swapped_layers * (mandatory / _GIB + other * alpha) <= memory_rhs, HOST_MEMORY
    outcome = solve_with_highs(problem, mip=False, time_limit_s=time_limit_s)
    if outcome.infeasible:
        # even alpha = 0 breaks a row: name the row that fails worst, per byte of S_oth
        bandwidth_excess = mandatory / _GIB - bandwidth_rhs
        memory_excess = mandatory / _GIB - memory_rhs / inputs.swapped_layers
        return SwapFraction(0.0, BANDWIDTH if bandwidth_excess >= memory_excess else HOST_MEMORY, False)
    if not outcome.has_solution:
        raise RuntimeError(f"HiGHS could not solve the swap-fraction LP (status {outcome.status})")
    value = min(max(outcome.values["alpha"], 0.0), 1.0)
    # the binding row is the one with the least slack, per unit of alpha
    bandwidth_slack = (bandwidth_rhs - mandatory / _GIB) / other - value
    memory_slack = (memory_rhs / inputs.swapped_layers - mandatory / _GIB) / other - value
    tight = BANDWIDTH if bandwidth_slack <= memory_slack else HOST_MEMORY
    if value >= 1.0 - 1e-9 and min(bandwidth_slack, memory_slack) > 1e-9:
        value = 1.0
        tight = NOTHING
    return SwapFraction(value, tight, True)


def _degenerate(inputs: SwapInputs) -> SwapFraction | None:
    """Cases with no fraction to choose: no swappable layer, or no other activations."""
    if inputs.swapped_layers == 0:
        return SwapFraction(0.0, NO_SWAPPABLE_LAYERS, True)
    if inputs.other_bytes == 0:
        # alpha scales nothing: all (of nothing) is swapped if the mandatory swaps fit
        rooms = {BANDWIDTH: inputs.bandwidth_room, HOST_MEMORY: inputs.host_memory_room}
        limited_by = min(rooms, key=rooms.get)
        fits = rooms[limited_by] >= 0
        return SwapFraction(1.0 if fits else 0.0, NOTHING if fits else limited_by, fits)
    return None
