"""Dynamic loss scaling for fp16, with DeepSpeed's knobs and semantics."""
from __future__ import annotations

import collections
import logging

import torch
import torch.distributed as dist

from zerokit.config import Fp16Config
from zerokit.zero.collectives import Collectives

logger = logging.getLogger("zerokit")


class LossScaler:
    def __init__(self, config: Fp16Config):
        self.dynamic = config.loss_scale == 0
        self.scale = float(2**config.initial_scale_power) if self.dynamic else config.loss_scale
        self._config = config
        self._good_steps = 0
        self._hysteresis_left = config.hysteresis

    def unscale_and_check(self, grads: list[torch.Tensor], comm: Collectives, device: torch.device) -> bool:
        """Divide gradients by the scale; True if any rank saw inf/nan (then the step is skipped)."""
        found = _any_nonfinite(grads, device)
        comm.all_reduce(found, op=dist.ReduceOp.MAX)
        overflow = bool(found.item())
        if not overflow:
            for grad in grads:
                grad.mul_(1.0 / self.scale)
        self._update(overflow)
        return overflow

    def _update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        config = self._config
        if overflow:
            self._good_steps = 0
            if self._hysteresis_left > 1:
                self._hysteresis_left -= 1
            else:
                self.scale = max(self.scale / 2, config.min_loss_scale)
            logger.info("fp16 overflow: step skipped, loss scale now %g", self.scale)
            return
        self._good_steps += 1
        if self._good_steps % config.loss_scale_window == 0:
            self.scale *= 2
            self._hysteresis_left = config.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self._good_steps, "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]
        self._good_steps = state["good_steps"]
        self._hysteresis_left = state["hysteresis_left"]


def _any_nonfinite(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1.0 if any gradient holds inf or nan, else 0.0, shape (1,), on `device` for the all-reduce,
    wherever the gradients are (host memory under offload, both under partial offload): one
    check per device they live on."""
    flags: dict[torch.device, list[torch.Tensor]] = collections.defaultdict(list)
    for grad in grads:
        flags[grad.device].append((~torch.isfinite(grad)).any())
    found = [torch.stack(on_device).any().to(device) for on_device in flags.values()]
    return torch.stack(found).any().float().reshape(1) if found else torch.zeros(1, device=device)
