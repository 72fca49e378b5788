"""The one error type of checkpointing."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved, loaded, imported or exported; the message says why and what to do."""
