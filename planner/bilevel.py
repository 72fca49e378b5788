"""MEMO's bi-level memory plan for one training iteration.

Level 1 places each block phase's transient tensors (one transformer block's forward, or its
backward) in a region of its own. Level 2 treats every phase as one tensor of its level-1 peak,
alive during the iteration step the phase runs in, and places those together with the tensors
that live across steps (embedding and head tensors, the skeletal activations saved for
backward). A phase's tensors then sit at its level-2 offset plus their level-1 offset.

[Note: composed timeline] To check the composed plan with the ordinary verifier, step s of the
iteration is stretched into ``step_width`` events: a phase-internal event e becomes
s * step_width + e, and a cross-step tensor alive over steps [a, b) is alive over
[a * step_width, b * step_width), i.e. during every event of those steps, as level 2 assumed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from planner.dsa import DsaConfig, solve_dsa
from planner.plan import OffsetPlan, make_plan, verify_plan
from planner.tensors import TensorLifetime, check_unique_names

_SEPARATOR = "/"


@dataclass(frozen=True)
class BlockPhase:
    """One block's forward or backward phase.

    name: unique among phases, e.g. "layer3.forward"; its tensors appear in the composed plan as
        "<name>/<tensor name>".
    step: the iteration step the phase runs in (one phase per step).
    tensors: the phase's transient tensors, with lifetimes in the phase's own event index
        (0 = its first op). Phases with equal tensors share one level-1 solve.
    """

    name: str
    step: int
    tensors: tuple[TensorLifetime, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"phase name must be a non-empty string, got {self.name!r}")
        if isinstance(self.step, bool) or not isinstance(self.step, int):
            raise TypeError(f"phase {self.name!r}: step must be an int, got {self.step!r}")
        check_unique_names(self.tensors)
        early = [t.name for t in self.tensors if t.start < 0]
        if early:
            raise ValueError(f"phase {self.name!r}: tensors {early[:5]} start before event 0 of the phase")


@dataclass(frozen=True)
class IterationPlan:
    """The composed plan of one iteration and the levels it came from.

    plan: every tensor of the iteration at its absolute offset in one arena of
        ``plan.peak_bytes`` bytes, on the composed timeline (see the module note).
    level1: the level-1 plan of each phase, by phase name.
    level2: the plan of phase blocks and cross-step tensors, by step.
    step_width: events per iteration step on the composed timeline.
    """

    plan: OffsetPlan
    level1: Mapping[str, OffsetPlan]
    level2: OffsetPlan
    step_width: int

    @property
    def arena_bytes(self) -> int:
        """Size of the one arena that holds every tensor of the iteration."""
        return self.plan.peak_bytes

    def offset(self, tensor: str, phase: str | None = None) -> int:
        """Absolute offset of a cross-step tensor, or of ``tensor`` inside ``phase``."""
        return self.plan.offsets[tensor if phase is None else f"{phase}{_SEPARATOR}{tensor}"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "level1": {name: plan.to_dict() for name, plan in self.level1.items()},
            "level2": self.level2.to_dict(),
            "step_width": self.step_width,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IterationPlan:
        try:
            return cls(
                plan=OffsetPlan.from_dict(data["plan"]),
                level1={str(name): OffsetPlan.from_dict(plan) for name, plan in data["level1"].items()},
                level2=OffsetPlan.from_dict(data["level2"]),
                step_width=int(data["step_width"]),
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed iteration plan: {type(error).__name__}: {error}") from error


def plan_iteration(
    phases: Sequence[BlockPhase],
    cross_step_tensors: Sequence[TensorLifetime] = (),
    config: DsaConfig = DsaConfig(),
    level1_config: DsaConfig | None = None,
) -> IterationPlan:
    """Bi-level plan: solve each distinct phase, then the iteration with phases as blocks.

    ``cross_step_tensors`` have lifetimes in iteration steps (alive over steps [start, end)).
    ``level1_config`` defaults to ``config``; both must use the same alignment. The composed
    plan is verified before it is returned.
    """
    started = time.perf_counter()
    level1_config = level1_config or config
    if level1_config.alignment != config.alignment:
        raise ValueError(
            f"level-1 alignment {level1_config.alignment} differs from level-2 alignment {config.alignment}; "
            "use one alignment so level-1 offsets stay aligned inside their block"
        )
    phases = list(phases)
    cross_step_tensors = list(cross_step_tensors)
    _check_names(phases, cross_step_tensors)

    solved: dict[tuple[TensorLifetime, ...], OffsetPlan] = {}
    level1 = {}
    for phase in phases:
        if phase.tensors not in solved:
            solved[phase.tensors] = solve_dsa(phase.tensors, level1_config)
        level1[phase.name] = solved[phase.tensors]

    blocks = [TensorLifetime(p.name, level1[p.name].peak_bytes, p.step, p.step + 1) for p in phases]
    level2 = solve_dsa(blocks + cross_step_tensors, config)

    step_width = max((t.end for p in phases for t in p.tensors), default=1)
    composed: list[TensorLifetime] = []
    offsets: dict[str, int] = {}
    for phase in phases:
        base = level2.offsets[phase.name]
        for tensor in phase.tensors:
            name = f"{phase.name}{_SEPARATOR}{tensor.name}"
            start = phase.step * step_width
            composed.append(TensorLifetime(name, tensor.size, start + tensor.start, start + tensor.end))
            offsets[name] = base + level1[phase.name].offsets[tensor.name]
    for tensor in cross_step_tensors:
        composed.append(TensorLifetime(tensor.name, tensor.size, tensor.start * step_width, tensor.end * step_width))
        offsets[tensor.name] = level2.offsets[tensor.name]

    plan = make_plan(
        composed,
        offsets,
        config.alignment,
        method="bilevel",
        solve_time_s=time.perf_counter() - started,
        arena_bytes=level2.peak_bytes,
        note=f"level 2: {level2.method} ({level2.note})",
    )
    verify_plan(plan)
    return IterationPlan(plan=plan, level1=level1, level2=level2, step_width=step_width)


def _check_names(phases: Sequence[BlockPhase], cross_step_tensors: Sequence[TensorLifetime]) -> None:
    for phase in phases:
        if not isinstance(phase, BlockPhase):
            raise TypeError(f"expected BlockPhase, got {type(phase).__name__}: {phase!r}")
    check_unique_names(cross_step_tensors)
    names = {t.name for t in cross_step_tensors}
    steps: dict[int, str] = {}
    for phase in phases:
        if phase.name in names:
            raise ValueError(f"phase name {phase.name!r} is used twice (by a phase or a cross-step tensor)")
        if phase.step in steps:
            raise ValueError(
                f"phases {steps[phase.step]!r} and {phase.name!r} both run in step {phase.step}; "
                "give each phase its own step"
            )
        names.add(phase.name)
        steps[phase.step] = phase.name
    inner = {f"{p.name}{_SEPARATOR}{t.name}" for p in phases for t in p.tensors}
    clashing = sorted(inner & {t.name for t in cross_step_tensors})
    if clashing:
        raise ValueError(f"cross-step tensor names {clashing[:5]} clash with phase tensor names; rename them")
