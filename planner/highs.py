"""Solving a pulp model with HiGHS (through highspy) the same way on pulp 3 and pulp 4.

Both pulp versions keep the highspy model on ``problem.solverModel`` after a solve, so the status,
the incumbent and the proven bound are read from HiGHS itself rather than from pulp's return
value, whose type changed between versions. Variables are created with
``problem.add_variable``, the only constructor pulp 4 allows, which pulp 3.3 also has.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pulp

try:
    import highspy
except ImportError:  # pragma: no cover - highspy is a declared dependency
    highspy = None

# HiGHS primal_solution_status value meaning "a feasible solution is available".
_FEASIBLE_SOLUTION = 2


class SolverUnavailable(RuntimeError):
    """HiGHS cannot be used: highspy is missing or pulp does not find it."""


@dataclass(frozen=True)
class HighsOutcome:
    """What HiGHS returned: its status name, the incumbent (if any) and the proven bound."""

    status: str
    has_solution: bool
    objective: float | None
    best_bound: float | None
    values: Mapping[str, float]
    time_s: float

    @property
    def optimal(self) -> bool:
        return self.status == "Optimal"

    @property
    def infeasible(self) -> bool:
        """Proven infeasible (for a bounded model, "infeasible or unbounded" means infeasible)."""
        return self.status in ("Infeasible", "Primal infeasible or unbounded")


class _HighsWithStart(pulp.HiGHS):
    """pulp's HiGHS interface plus an initial feasible solution handed to HiGHS before the run.

    pulp 4 offers warmStart itself but pulp 3.3 does not; setting the start here works on both.
    """

    def __init__(self, start: Mapping[str, float] | None = None, **options):
        super().__init__(**options)
        self.start = dict(start or {})

    def buildSolverModel(self, lp):
        super().buildSolverModel(lp)
        if not self.start:
            return
        columns = lp.exported_variables() if hasattr(lp, "exported_variables") else lp.variables()
        indices = [j for j, var in enumerate(columns) if var.name in self.start]
        values = [float(self.start[columns[j].name]) for j in indices]
        lp.solverModel.setSolution(len(indices), np.array(indices, dtype=np.int32), np.array(values))


def highs_available() -> bool:
    """Whether pulp can drive HiGHS through highspy here."""
    return highspy is not None and pulp.HiGHS(msg=False).available()


def solve_with_highs(
    problem: pulp.LpProblem,
    *,
    mip: bool,
    time_limit_s: float | None = None,
    abs_gap: float | None = None,
    start: Mapping[str, float] | None = None,
    log: bool = False,
) -> HighsOutcome:
    """Solve ``problem`` with HiGHS and report its outcome; raises SolverUnavailable without HiGHS."""
    if not highs_available():
        raise SolverUnavailable("HiGHS is not available: install highspy (pip install highspy)")
    options = {"mip": mip, "msg": log}
    if time_limit_s is not None:
        options["timeLimit"] = float(time_limit_s)
    if mip:
        options["gapRel"] = 0.0
        if abs_gap is not None:
            options["gapAbs"] = float(abs_gap)
    started = time.perf_counter()
    problem.solve(_HighsWithStart(start=start, **options))
    elapsed = time.perf_counter() - started
    model = problem.solverModel
    status = model.modelStatusToString(model.getModelStatus())
    info = model.getInfo()
    has_solution = info.primal_solution_status == _FEASIBLE_SOLUTION
    objective = info.objective_function_value if has_solution else None
    bound = info.mip_dual_bound if mip else None
    return HighsOutcome(
        status=status,
        has_solution=has_solution,
        objective=objective,
        best_bound=bound if bound is not None and math.isfinite(bound) else None,
        values={var.name: var.varValue for var in problem.variables()} if has_solution else {},
        time_s=elapsed,
    )
