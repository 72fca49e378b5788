"""Adam/AdamW step with torch ops, in the order torch.optim's single-tensor Adam uses."""
from __future__ import annotations

from typing import Optional

import torch


def adam_simd_level() -> str:
    return "torch"


def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    low_precision_out: Optional[torch.Tensor] = None,
    num_threads: int = 0,
    simd_level: str = "",
    grad_scale: float = 1.0,
) -> None:
    """Same contract as the native adam_step; num_threads is left to torch's intra-op pool."""
    if simd_level not in ("", "torch"):
        raise ValueError(f"SIMD level {simd_level!r} is not available without the C++ extension")
    if step < 1:
        raise ValueError(f"Adam step must be >= 1, got {step}")
    grad = grad.float()
    if grad_scale != 1.0:
        grad = grad * grad_scale  # a new tensor: the caller's gradient stays as it was
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    if low_precision_out is not None:
        low_precision_out.copy_(param.view_as(low_precision_out))
