"""One rank's profiling session: a sampling thread, the phases the engine reports, model-state
readings, and the files written when the process ends (or runs out of memory).

[Note: threads]
The sampler thread only reads allocator counters, NVML and RSS, and appends to its own lists.
Phases and model-state breakdowns are recorded on the thread that trains, when a phase starts or
ends, so `memory_breakdown()` never runs while the training thread mutates optimizer state.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import torch

from zerokit.profiler.probes import Probes, Reading, rank_device

ENV_DIR = "ZEROKIT_PROFILE_DIR"
ENV_INTERVAL_MS = "ZEROKIT_PROFILE_INTERVAL_MS"
ENV_SNAPSHOT = "ZEROKIT_PROFILE_SNAPSHOT"
ENV_OWNER_PID = "ZEROKIT_PROFILE_PID"  # the bootstrapped process; its children do not profile
STATUS_EVERY_S = 0.25
SNAPSHOT_MAX_ENTRIES = 200_000
PHASES = ("forward", "backward", "step", "communication", "offload")


@dataclass(frozen=True)
class SessionConfig:
    out_dir: Path
    interval_s: float
    snapshot: bool
    rank: int

    @classmethod
    def from_environment(cls) -> Optional["SessionConfig"]:
        directory = os.environ.get(ENV_DIR)
        if not directory or os.environ.get(ENV_OWNER_PID) != str(os.getpid()):
            return None
        interval_ms = float(os.environ.get(ENV_INTERVAL_MS, "50"))
        if not interval_ms > 0:
            raise ValueError(f"{ENV_INTERVAL_MS} must be a positive number of milliseconds, got {interval_ms}")
        return cls(
            out_dir=Path(directory),
            interval_s=interval_ms / 1000,
            snapshot=os.environ.get(ENV_SNAPSHOT, "1") != "0",
            rank=int(os.environ.get("RANK", "0")),
        )


@dataclass(frozen=True)
class PhaseSpan:
    name: str
    start: float
    end: float
    depth: int  # 0 for an outermost phase


class ProfileSession:
    def __init__(self, config: SessionConfig):
        self.config = config
        self.pid = os.getpid()
        self.device = rank_device()
        self.started = time.time()
        self._clock0 = time.perf_counter()
        self.probes = Probes(self.device)
        self._stack: list[tuple[str, float]] = []
        self.spans: list[PhaseSpan] = []
        self.samples: list[tuple[float, str, str, Reading]] = []  # (t, phase, outer phase, reading)
        self.model_states: list[tuple[float, dict[str, int]]] = []
        self._breakdown: Optional[Callable[[], Optional[Mapping[str, int]]]] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, name="zerokit-profiler", daemon=True)
        self.recording_snapshot = False
        self.finished = False

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.config.out_dir.mkdir(parents=True, exist_ok=True)
        (self.config.out_dir / "status").mkdir(exist_ok=True)
        if self.config.snapshot and self.device is not None:
            from zerokit.profiler.snapshot import start_recording

            torch.cuda.set_device(self.device)  # the context must not open on GPU 0 for every rank
            self.recording_snapshot = start_recording()
        self._sample()
        self._thread.start()

    def finish(self, outcome: str = "ok", error: Optional[BaseException] = None) -> list[Path]:
        """Stop sampling and write this rank's JSON, plot and (on CUDA) memory snapshot.
        `outcome` is "ok", "error" or "oom". Returns the files written."""
        if self.finished or os.getpid() != self.pid:
            return []
        self.finished = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        now = self._now()
        while self._stack:  # phases an exception left open
            name, start = self._stack.pop()
            self.spans.append(PhaseSpan(name, start, now, len(self._stack)))
        self._record_model_states()
        self._sample()
        from zerokit.profiler.outputs import write_rank_outputs

        files = write_rank_outputs(self, outcome, error)
        self._write_status(done=True)
        return files

    # -- the engine's side ---------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if os.getpid() != self.pid or self.finished:  # a forked child, or after the end
            yield
            return
        start = self._now()
        self._stack.append((name, start))
        self._record_model_states()
        # a named range, so the memory snapshot shows the phase of each allocation
        annotation = contextlib.nullcontext()
        if self.recording_snapshot:
            annotation = torch.profiler.record_function(f"zerokit.{name}")
        try:
            with annotation:
                yield
        finally:
            self._stack.pop()
            self.spans.append(PhaseSpan(name, start, self._now(), len(self._stack)))
            self._record_model_states()

    def track_model_states(self, breakdown: Callable[[], Mapping[str, int]]) -> None:
        """Read `breakdown()` (bytes of model states by category) at every phase change; a bound
        method is held weakly, so the session never keeps an engine alive."""
        self._breakdown = _weakly(breakdown)
        self._record_model_states()

    @property
    def current_phase(self) -> tuple[str, str]:
        """(innermost, outermost) phase, "idle" outside every phase."""
        stack = list(self._stack)
        return (stack[-1][0], stack[0][0]) if stack else ("idle", "idle")

    # -- internals -----------------------------------------------------------------------------

    def _now(self) -> float:
        return time.perf_counter() - self._clock0

    def _record_model_states(self) -> None:
        if self._breakdown is None:
            return
        values = self._breakdown()
        if values is not None:
            self.model_states.append((self._now(), {k: int(v) for k, v in values.items()}))

    def _sample(self) -> None:
        inner, outer = self.current_phase
        self.samples.append((self._now(), inner, outer, self.probes.read()))

    def _sample_loop(self) -> None:
        last_status = 0.0
        while not self._stop.wait(self.config.interval_s):
            self._sample()
            if self._now() - last_status >= STATUS_EVERY_S:
                last_status = self._now()
                self._write_status(done=False)

    def _write_status(self, done: bool) -> None:
        """A small file the launcher reads for its progress line (replaced atomically)."""
        t, phase, _, reading = self.samples[-1]
        status = {
            "rank": self.config.rank,
            "pid": self.pid,
            "t": round(t, 3),
            "phase": phase,
            "cuda_allocated": reading.cuda_allocated,
            "host_rss": reading.host_rss,
            "done": done,
        }
        path = self.config.out_dir / "status" / f"rank{self.config.rank}.json"
        temporary = path.with_suffix(f".{self.pid}.tmp")
        try:
            temporary.write_text(json.dumps(status))
            os.replace(temporary, path)
        except OSError:  # progress is a convenience; never fail training for it
            pass


def _weakly(fn: Callable[[], Mapping[str, int]]) -> Callable[[], Optional[Mapping[str, int]]]:
    """`fn`, holding its object weakly when it is a bound method (None once the object is gone)."""
    if not inspect.ismethod(fn):
        return fn
    reference = weakref.WeakMethod(fn)

    def call() -> Optional[Mapping[str, int]]:
        method = reference()
        return None if method is None else method()

    return call
