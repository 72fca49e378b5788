"""Running a block's forward again, in backward, under the state its first run had."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class ForwardState:
    """What a forward depends on besides its inputs: random number generators (dropout) and
    autocast. Rerunning under it reproduces the first run; the global generators are left as
    they were."""

    device: torch.device
    cpu_rng: torch.Tensor
    device_rng: Optional[torch.Tensor]
    autocast: bool
    autocast_dtype: torch.dtype

    @classmethod
    def capture(cls, device: torch.device) -> "ForwardState":
        cuda = device.type == "cuda"
        return cls(
            device=device,
            cpu_rng=torch.get_rng_state(),
            device_rng=torch.cuda.get_rng_state(device) if cuda else None,
            autocast=torch.is_autocast_enabled(device.type),
            autocast_dtype=torch.get_autocast_dtype(device.type),
        )

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.device_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_rng)
            if self.device_rng is not None:
                torch.cuda.set_rng_state(self.device_rng, self.device)
            autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast)
            with torch.enable_grad(), autocast:
                yield


def _never_unpacked(_: Any) -> torch.Tensor:
    raise RuntimeError("the graph of a recomputed block forward is never run backward")


class EnoughSaved(Exception):
    """Raised by a `keep` callback that has every tensor it needs: the rest of the forward (a
    block's last projection and residual, whose outputs nothing saves) is skipped."""


def rerun(
    block: nn.Module,
    args: tuple,
    kwargs: dict,
    state: ForwardState,
    keep: Callable[[int, torch.Tensor], None],
    *modes: Any,
) -> Optional[int]:
    """Run `block(*args, **kwargs)` under `state`, handing the i-th tensor it saves for backward to
    `keep(i, tensor)` (detached); the run's own graph and output are dropped. Returns how many
    tensors it saved, or None when `keep` stopped the run early (EnoughSaved)."""
    count = 0

    def pack(tensor: torch.Tensor) -> None:
        nonlocal count
        count += 1
        keep(count - 1, tensor.detach())

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked)
    with state.replay(), hooks, contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        try:
            block(*args, **kwargs)
        except EnoughSaved:
            return None
    return count
