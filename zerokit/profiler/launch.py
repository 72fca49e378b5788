"""Start a training run with every rank under the profiler bootstrap, and show its progress.

`plan_script` runs `script.py args` in N local processes (torchrun's launcher for N > 1);
`plan_wrapped` takes a whole `torchrun ...` or `python ...` command and puts the bootstrap in
front of its script, keeping every launcher option as written.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

import psutil

from zerokit.profiler.session import ENV_DIR, ENV_INTERVAL_MS, ENV_SNAPSHOT

BOOTSTRAP = "zerokit.profiler.bootstrap"
PROGRESS_EVERY_S = 0.5
PLAIN_PROGRESS_EVERY_S = 10.0  # when stderr is not a terminal: one line now and then
GiB = 2**30
OUR_FILES = re.compile(r"^(rank\d+(\.json|\.png|_snapshot\.pickle|\.\d+\.tmp)|summary\.json)$")
RUN_SCHEMA = "zerokit.profile/1"


class LaunchError(ValueError):
    """The command cannot be profiled as given; the message says what to write instead."""


@dataclass(frozen=True)
class LaunchPlan:
    command: tuple[str, ...]
    local_ranks: Optional[int]  # processes on this node, when known


def plan_script(script_and_args: list[str], nproc: int) -> LaunchPlan:
    if not script_and_args:
        raise LaunchError("give the training script to run: zerokit profile [--nproc N] script.py [args...]")
    if not os.path.isfile(script_and_args[0]):
        raise LaunchError(f"training script {script_and_args[0]!r} not found")
    if nproc < 1:
        raise LaunchError(f"--nproc must be at least 1, got {nproc}")
    bootstrap = ["-m", BOOTSTRAP, *script_and_args]
    if nproc == 1:
        return LaunchPlan((sys.executable, *bootstrap), 1)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return LaunchPlan((*launcher, *bootstrap), nproc)


def is_launcher(program: str) -> bool:
    """Whether a command starts with a launcher (torchrun, python) rather than a script."""
    name = os.path.basename(program)
    return name == "torchrun" or (name.startswith("python") and not name.endswith(".py"))


def plan_wrapped(command: list[str]) -> LaunchPlan:
    """`torchrun [options] script.py args`, `python -m torch.distributed.run ...`, `python script.py
    args` or `python -m module args`, with the bootstrap put in front of the script."""
    if not command:
        raise LaunchError("nothing to run after --")
    program = os.path.basename(command[0])
    if program == "torchrun":
        return _wrap_torchrun(command[1:])
    if is_launcher(program):
        rest = command[1:]
        if rest[:2] == ["-m", "torch.distributed.run"]:
            return _wrap_torchrun(rest[2:])
        if rest[:1] == ["-m"] and len(rest) >= 2:
            return LaunchPlan((sys.executable, "-m", BOOTSTRAP, "--module", *rest[1:]), 1)
        if rest and not rest[0].startswith("-"):
            return LaunchPlan((sys.executable, "-m", BOOTSTRAP, *rest), 1)
    raise LaunchError(
        f"cannot profile {' '.join(command)!r}: wrap a `torchrun ... script.py`, `python script.py` or "
        "`python -m module` command, or pass the script itself: zerokit profile --nproc N script.py"
    )


def _wrap_torchrun(arguments: list[str]) -> LaunchPlan:
    from torch.distributed.run import get_args_parser

    try:
        parsed = get_args_parser().parse_args(arguments)
    except SystemExit:
        raise LaunchError(f"torchrun does not accept these arguments: {' '.join(arguments)}") from None
    if parsed.no_python:
        raise LaunchError("torchrun --no-python runs a program, not a Python script: the profiler cannot wrap it")
    script_at = len(arguments) - len(parsed.training_script_args) - 1
    options = [a for a in arguments[:script_at] if a not in ("-m", "--module")]
    target = ["--module"] if parsed.module else []
    command = (sys.executable, "-m", "torch.distributed.run", *options, "-m", BOOTSTRAP, *target,
               *arguments[script_at:])  # fmt: skip
    nproc = str(parsed.nproc_per_node)
    return LaunchPlan(command, int(nproc) if nproc.isdigit() else None)


def run_profiled(
    plan: LaunchPlan, out_dir: Path, interval_ms: float, snapshot: bool, stream: TextIO = sys.stderr
) -> int:
    """Run the plan with the profiler's environment, print progress to `stream`, return its exit code."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for directory in (out_dir, out_dir / "status"):
        for stale in directory.glob("*") if directory.is_dir() else ():
            if stale.is_file() and OUR_FILES.match(stale.name):
                stale.unlink()  # an earlier run's files in the same directory would mix with this one's
    environment = {
        **os.environ,
        ENV_DIR: str(out_dir.resolve()),
        ENV_INTERVAL_MS: str(interval_ms),
        ENV_SNAPSHOT: "1" if snapshot else "0",
    }
    started = time.monotonic()
    progress = Progress(out_dir / "status", plan.local_ranks, stream)
    process = subprocess.Popen(plan.command, env=environment)
    try:
        while process.poll() is None:
            progress.show(time.monotonic() - started)
            time.sleep(PROGRESS_EVERY_S / 5)
    except KeyboardInterrupt:
        process.wait()  # the children got the same interrupt and write their files
    progress.finish(time.monotonic() - started, process.returncode)
    return process.returncode


class Progress:
    """The live line: elapsed time, ranks alive, and what rank 0 is doing."""

    def __init__(self, status_dir: Path, ranks: Optional[int], stream: TextIO):
        self.status_dir = status_dir
        self.ranks = ranks
        self.stream = stream
        self.live = stream.isatty()
        self._last_shown = -float("inf")

    def line(self, elapsed: float) -> str:
        statuses = [self._read(path) for path in sorted(self.status_dir.glob("rank*.json"))]
        statuses = [s for s in statuses if s is not None]
        alive = sum(1 for s in statuses if not s["done"] and psutil.pid_exists(s["pid"]))
        total = self.ranks if self.ranks is not None else "?"
        text = f"zerokit profile: {elapsed:6.1f}s, {alive}/{total} ranks alive"
        first = next((s for s in statuses if s["rank"] == 0), None)
        if first is not None:
            if first["cuda_allocated"] is not None:
                memory = f"{first['cuda_allocated'] / GiB:.2f} GiB allocated"
            else:
                memory = f"{first['host_rss'] / GiB:.2f} GiB RSS"
            text += f", rank 0: {first['phase']}, {memory}"
        return text

    def show(self, elapsed: float) -> None:
        every = PROGRESS_EVERY_S if self.live else PLAIN_PROGRESS_EVERY_S
        if elapsed - self._last_shown < every:
            return
        self._last_shown = elapsed
        if self.live:
            self.stream.write("\r" + self.line(elapsed) + "\033[K")
        else:
            self.stream.write(self.line(elapsed) + "\n")
        self.stream.flush()

    def finish(self, elapsed: float, code: int) -> None:
        end = "\r\033[K" if self.live else ""
        self.stream.write(f"{end}zerokit profile: the run ended after {elapsed:.1f}s with exit code {code}\n")
        self.stream.flush()

    @staticmethod
    def _read(path: Path) -> Optional[dict]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # being replaced right now
            return None


def write_run_summary(out_dir: Path, plan: LaunchPlan, code: int, elapsed: float) -> tuple[Path, str]:
    """summary.json over every rank's file, and a few lines saying what happened where."""
    ranks = []
    for path in sorted(out_dir.glob("rank*.json"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)):
        data = json.loads(path.read_text())
        ranks.append({
            "rank": data["rank"],
            "outcome": data["outcome"],
            "error": data["error"],
            "memory_source": data["memory_source"],
            "peak": data["peak"],
            "peaks": data["peaks"],
            "phase_peaks": data["phase_peaks"],
            "files": [name for name in (path.name, data["plot"], data["snapshot"]) if name],
            "notes": [note for note in (data["plot_note"], data["snapshot_note"]) if note],
        })  # fmt: skip
    summary = {"schema": RUN_SCHEMA, "command": list(plan.command), "exit_code": code,
               "duration_s": round(elapsed, 3), "ranks": ranks}  # fmt: skip
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    lines = [f"profile of {len(ranks)} rank(s) in {out_dir}:"]
    for rank in ranks:
        peak = rank["peak"]
        what = "allocated" if rank["memory_source"] == "cuda_allocated" else "RSS"
        text = f"  rank {rank['rank']} ({rank['outcome']})"
        if peak is not None:
            text += (f": peak {peak['memory'] / GiB:.2f} GiB {what} in {peak['phase']} (model states "
                     f"{peak['model_states'] / GiB:.2f}, activations {peak['activations'] / GiB:.2f}, "
                     f"other {peak['other'] / GiB:.2f})")  # fmt: skip
        lines.append(text + "; " + ", ".join(rank["files"]))
        lines += [f"    {note}" for note in rank["notes"]]
    if not ranks:
        lines.append("  no rank wrote its files: did the script start? (see its output above)")
    lines.append(f"  summary: {path}")
    return path, "\n".join(lines)
