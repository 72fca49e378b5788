"""`zerokit profile`: run a training script with per-rank memory timelines, phases and snapshots."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from zerokit.profiler.launch import LaunchError, is_launcher, plan_script, plan_wrapped, run_profiled, write_run_summary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="run a training script and record each rank's memory by phase and category",
        description="zerokit profile [--nproc N] script.py [args...]\n"
        "zerokit profile -- torchrun ... script.py ...\n\n"
        "Each rank samples PyTorch's allocator, NVML and host memory, records the engine's phases,\n"
        "and writes rankN.json, rankN.png and (on CUDA) rankN_snapshot.pickle into --out, also when\n"
        "it runs out of memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes to start on this node (default 1)")
    parser.add_argument(
        "--out", type=Path, default=Path("zerokit-profile"), help="output directory (default zerokit-profile)"
    )
    parser.add_argument("--interval-ms", type=float, default=50.0, help="sampling interval (default 50 ms)")
    parser.add_argument("--no-snapshot", action="store_true", help="do not record PyTorch's CUDA memory snapshot")
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="script.py [args...], or -- followed by a torchrun or python command"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    try:
        if not args.interval_ms > 0:
            raise LaunchError(f"--interval-ms must be positive, got {args.interval_ms}")
        if command[:1] == ["--"]:  # argparse keeps the "--" on some Python versions, drops it on others
            plan = plan_wrapped(command[1:])
        elif command and is_launcher(command[0]):
            plan = plan_wrapped(command)
        else:
            plan = plan_script(command, args.nproc)
    except LaunchError as error:
        print(f"zerokit profile: {error}", file=sys.stderr)
        return 2
    started = time.monotonic()
    code = run_profiled(plan, args.out, args.interval_ms, snapshot=not args.no_snapshot)
    _, text = write_run_summary(args.out, plan, code, time.monotonic() - started)
    print(text, file=sys.stderr)
    return code
