"""Adam/AdamW on the CPU with the fused native kernel, matching torch.optim to fp32 rounding.

`adam_step_tile` updates one tile (contiguous slices of a parameter and its states); the
offload engine calls it tile by tile while the next tile streams in. `CPUAdam` is a
torch.optim.Optimizer over CPU parameters built on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch

from offload.extension import native_ops

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class AdamHyperParams:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    adamw_mode: bool = True  # decoupled weight decay (AdamW); False adds weight_decay * param to the grad (Adam)

    def __post_init__(self):
        if not 0.0 <= self.lr:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not 0.0 <= self.eps:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if not 0.0 <= self.weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


def adam_step_tile(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    hyper: AdamHyperParams,
    low_precision_out: Optional[torch.Tensor] = None,
    num_threads: Optional[int] = None,
    grad_scale: float = 1.0,
) -> None:
    """One Adam step, in place, over contiguous CPU tensors with the same number of elements.

    param, exp_avg, exp_avg_sq: float32. grad: float32, bfloat16 or float16. step: the step
    number after this update (1 for the first). low_precision_out: a bfloat16/float16 tensor that
    receives the updated param, rounded, in the same pass. num_threads: CPU threads (default:
    torch.get_num_threads()). grad_scale: the gradient is multiplied by it in fp32 before the
    step (gradient clipping), in the same pass; `grad` itself is not changed.
    """
    _check_tensor(param, "param", (torch.float32,))
    numel = param.numel()
    _check_tensor(grad, "grad", _GRAD_DTYPES, numel)
    _check_tensor(exp_avg, "exp_avg", (torch.float32,), numel)
    _check_tensor(exp_avg_sq, "exp_avg_sq", (torch.float32,), numel)
    if low_precision_out is not None:
        _check_tensor(low_precision_out, "low_precision_out", _LOW_PRECISION_DTYPES, numel)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the step number after this update), got {step!r}")
    threads = torch.get_num_threads() if num_threads is None else num_threads
    native_ops().adam_step(
        param, grad, exp_avg, exp_avg_sq, step,
        hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay, hyper.adamw_mode,
        low_precision_out, threads, "", grad_scale,
    )  # fmt: skip


def _check_tensor(t: torch.Tensor, name: str, dtypes: tuple, numel: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if t.layout != torch.strided or not t.is_contiguous():
        raise ValueError(f"{name} must be a dense contiguous tensor; call .contiguous() first")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements but param has {numel}")


class CPUAdam(torch.optim.Optimizer):
    """AdamW (adamw_mode=True) or Adam with L2 weight decay over CPU fp32 parameters.

    State per parameter matches torch.optim.AdamW's ("step" as a float32 tensor, "exp_avg",
    "exp_avg_sq"), so state dicts move between the two.
    """

    def __init__(
        self,
        params: Iterable[Union[torch.Tensor, dict]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        adamw_mode: bool = True,
        num_threads: Optional[int] = None,
    ):
        AdamHyperParams(lr, betas[0], betas[1], eps, weight_decay, adamw_mode)  # validates
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adamw_mode=adamw_mode)
        super().__init__(params, defaults)
        self.num_threads = num_threads
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type != "cpu" or p.dtype != torch.float32:
                    raise ValueError(
                        f"CPUAdam updates float32 CPU parameters, got {p.dtype} on {p.device}; "
                        "keep fp32 master weights on the CPU"
                    )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups loaded from a torch.optim.Adam/AdamW state dict
            group.setdefault("adamw_mode", group.get("decoupled_weight_decay", True))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = AdamHyperParams(
                float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                float(group["weight_decay"]), bool(group["adamw_mode"]),
            )  # fmt: skip
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("CPUAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
                param = p if p.is_contiguous() else p.contiguous()
                adam_step_tile(
                    param,
                    p.grad.contiguous(),
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    step=int(state["step"].item()),
                    hyper=hyper,
                    num_threads=self.num_threads,
                )
                if param is not p:
                    p.copy_(param)
        return loss
