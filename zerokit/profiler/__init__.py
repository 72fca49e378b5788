"""Memory estimation and profiling.

Training code reports to the profiler through two calls, no-ops unless the process runs under
`zerokit profile`:

    phase(name)                  context manager: forward | backward | step | communication | offload
    track_model_states(fn)       fn() -> bytes of model states by category (Engine.memory_breakdown)

The rest backs the command line: `estimate` (meta-device estimates of every configuration),
`memo_plan` (`zerokit plan`), `launch`/`bootstrap`/`session` (`zerokit profile`).
"""
from zerokit.profiler.phases import phase, track_model_states
from zerokit.profiler.session import PHASES

__all__ = ["PHASES", "phase", "track_model_states"]
