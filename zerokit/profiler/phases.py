"""What training code (the engine) tells the profiler: phases and model-state readings.

Both are no-ops unless this process runs under `zerokit profile` (its bootstrap started a
session here), so the engine calls them unconditionally:

    with phase("forward"):
        ...
    track_model_states(engine.memory_breakdown)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Mapping, Optional

from zerokit.profiler.session import PHASES, ProfileSession, SessionConfig


@functools.cache
def active_session() -> Optional[ProfileSession]:
    """This process's session: created once, from the environment the bootstrap set up."""
    config = SessionConfig.from_environment()
    return None if config is None else ProfileSession(config)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Attribute the memory used inside the block to phase `name` (one of PHASES); phases nest."""
    if name not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {name!r}")
    session = active_session()
    if session is None:
        yield
        return
    with session.phase(name):
        yield


def track_model_states(breakdown: Callable[[], Mapping[str, int]]) -> None:
    """Have the profiler read `breakdown()` (bytes of model states by category, such as
    `Engine.memory_breakdown`) at every phase change."""
    session = active_session()
    if session is not None:
        session.track_model_states(breakdown)
