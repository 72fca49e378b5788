"""The files one rank writes at the end: rankN.json (timeline and summary), rankN.png (plot) and,
on CUDA, rankN_snapshot.pickle (PyTorch's memory snapshot).

[Note: categories]
"memory" is what PyTorch's allocator holds (CUDA) or the process's RSS (CPU). Model states are
the engine's own count (`memory_breakdown`, read at phase changes). Activations are what memory
grew by, beyond model states, since the last moment outside forward and backward; "other" is
the rest (workspaces, caches, and on CPU the interpreter and libraries). On CUDA, memory the
driver reports for the process beyond what the allocator reserved (CUDA context, NCCL) is
"outside_allocator".
"""
from __future__ import annotations

import bisect
import json
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from zerokit.profiler.snapshot import DISABLED_NOTE, NO_CUDA_NOTE, dump

if TYPE_CHECKING:
    from zerokit.profiler.session import ProfileSession

SCHEMA = "zerokit.profile.rank/1"
SERIES = (
    "cuda_allocated", "cuda_reserved", "cuda_active", "nvml_used", "outside_allocator", "host_rss", "host_pinned",
    "memory", "model_states", "activations", "other",
)  # fmt: skip
STEP_PHASES = ("forward", "backward")


def rank_summary(session: "ProfileSession", outcome: str, error: Optional[BaseException]) -> dict:
    times = [round(t, 4) for t, _, _, _ in session.samples]
    readings = [r for _, _, _, r in session.samples]
    series: dict[str, list] = {
        "cuda_allocated": [r.cuda_allocated for r in readings],
        "cuda_reserved": [r.cuda_reserved for r in readings],
        "cuda_active": [r.cuda_active for r in readings],
        "nvml_used": [r.nvml_used for r in readings],
        "outside_allocator": [
            None if r.nvml_used is None or r.cuda_reserved is None else max(r.nvml_used - r.cuda_reserved, 0)
            for r in readings
        ],
        "host_rss": [r.host_rss for r in readings],
        "host_pinned": [r.host_pinned for r in readings],
    }
    on_cuda = any(v is not None for v in series["cuda_allocated"])
    memory = [(r.cuda_allocated or 0) if on_cuda else r.host_rss for r in readings]
    states = _model_states_at(session, times)
    activations, other = _attribute(memory, states, [outer for _, _, outer, _ in session.samples])
    series.update(memory=memory, model_states=states, activations=activations, other=other)
    phases = [s for _, s, _, _ in session.samples]
    peak_at = max(range(len(memory)), key=memory.__getitem__) if memory else None
    return {
        "schema": SCHEMA,
        "rank": session.config.rank,
        "pid": session.pid,
        "device": str(session.device) if session.device is not None else "cpu",
        "memory_source": "cuda_allocated" if on_cuda else "host_rss",
        "interval_ms": session.config.interval_s * 1000,
        "started_unix": session.started,
        "duration_s": times[-1] if times else 0.0,
        "outcome": outcome,
        "error": None if error is None else "".join(traceback.format_exception_only(type(error), error)).strip(),
        "nvml": session.probes.nvml.unavailable or "ok",
        "phases": [_span(s) for s in session.spans],
        "peaks": {name: max((v for v in values if v is not None), default=None) for name, values in series.items()},
        "peak": None if peak_at is None else {
            "t": times[peak_at], "phase": phases[peak_at], "memory": memory[peak_at],
            "model_states": states[peak_at], "activations": activations[peak_at], "other": other[peak_at],
        },
        "phase_peaks": _phase_peaks(phases, memory),
        "model_state_breakdown": session.model_states[-1][1] if session.model_states else None,
        "samples": {"t": times, "phase": phases, **series},
    }  # fmt: skip


def write_rank_outputs(session: "ProfileSession", outcome: str, error: Optional[BaseException]) -> list[Path]:
    out, rank = session.config.out_dir, session.config.rank
    summary = rank_summary(session, outcome, error)
    files = []
    if session.recording_snapshot:
        files.append(dump(out / f"rank{rank}_snapshot.pickle"))
        summary["snapshot"], summary["snapshot_note"] = files[-1].name, None
    else:
        summary["snapshot"] = None
        summary["snapshot_note"] = NO_CUDA_NOTE if session.device is None else DISABLED_NOTE
    try:
        from zerokit.profiler.plots import plot_rank

        files.append(plot_rank(summary, out / f"rank{rank}.png"))
        summary["plot"], summary["plot_note"] = files[-1].name, None
    except ImportError as missing:
        summary["plot"] = None
        summary["plot_note"] = f"no plot: {missing.name} is not installed (pip install matplotlib)"
    path = out / f"rank{rank}.json"
    path.write_text(json.dumps(summary))
    return [path, *files]


def _span(span) -> dict:
    return {"name": span.name, "start": round(span.start, 4), "end": round(span.end, 4), "depth": span.depth}


def _model_states_at(session: "ProfileSession", times: list[float]) -> list[int]:
    """Model-state bytes at each sample: the latest reading before it (0 before the first)."""
    stamps = [t for t, _ in session.model_states]
    totals = [sum(values.values()) for _, values in session.model_states]
    found = []
    for t in times:
        index = bisect.bisect_right(stamps, t) - 1
        found.append(totals[index] if index >= 0 else 0)
    return found


def _attribute(memory: list[int], states: list[int], outer: list[str]) -> tuple[list[int], list[int]]:
    """Split memory beyond model states into activations and other (see the module note)."""
    activations, other = [], []
    baseline = None
    for value, state, phase in zip(memory, states, outer):
        beyond = max(value - state, 0)
        if phase not in STEP_PHASES or baseline is None:
            baseline = beyond
        grown = max(beyond - baseline, 0) if phase in STEP_PHASES else 0
        activations.append(grown)
        other.append(beyond - grown)
    return activations, other


def _phase_peaks(phases: list[str], memory: list[int]) -> dict[str, int]:
    peaks: dict[str, int] = {}
    for phase, value in zip(phases, memory):
        peaks[phase] = max(peaks.get(phase, 0), value)
    return peaks
