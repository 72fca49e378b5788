"""Run a training script with this process's profiling session around it:

    python -m zerokit.profiler.bootstrap script.py [args...]
    python -m zerokit.profiler.bootstrap --module package.train [args...]

`zerokit profile` starts every rank this way (through torchrun for several), with the output
directory in ZEROKIT_PROFILE_DIR. The session starts before the script's first line; when the
script ends, raises, runs out of memory or gets SIGTERM (torchrun stopping the other ranks after
one failed), the rank's files are written before the process exits, and the exit status is the
script's (non-zero on any error).
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from typing import Optional

import torch

from zerokit.profiler.phases import active_session
from zerokit.profiler.session import ENV_DIR, ENV_OWNER_PID, ProfileSession

USAGE = "usage: python -m zerokit.profiler.bootstrap [--module] TARGET [ARGS...]"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_module = bool(argv) and argv[0] == "--module"
    if as_module:
        argv = argv[1:]
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if not os.environ.get(ENV_DIR):
        print(f"zerokit profiler: {ENV_DIR} is not set; run the script with `zerokit profile`", file=sys.stderr)
        return 2
    os.environ[ENV_OWNER_PID] = str(os.getpid())
    session = active_session()
    session.start()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    target, sys.argv = argv[0], argv
    try:
        if as_module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python script.py` does
            runpy.run_path(target, run_name="__main__")
    except torch.OutOfMemoryError as error:
        _finish(session, "oom", error)
        raise
    except SystemExit as exit_:
        clean = exit_.code in (None, 0)
        _finish(session, "ok" if clean else "error", None if clean else exit_)
        raise
    except BaseException as error:
        _finish(session, "error", error)
        raise
    _finish(session, "ok", None)
    return 0


def _finish(session: ProfileSession, outcome: str, error: Optional[BaseException]) -> None:
    """Write the rank's files; a failure to write them must not hide the script's own error."""
    try:
        session.finish(outcome, error)
    except Exception as failure:
        print(f"zerokit profiler: could not write this rank's files: {failure!r}", file=sys.stderr)


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
