"""Fused attention on the meta device, as the target device would run it.

On meta tensors `F.scaled_dot_product_attention` falls back to the math formula, which keeps the
whole attention matrix for backward; CUDA (flash or memory-efficient kernels) and CPU (the CPU
flash kernel) keep only the output and one fp32 log-sum-exp per query. `FusedAttention` is a
TorchFunctionMode that sends the call to the fused op the target device would choose, so the
tensors autograd saves on meta have the shapes and dtypes they have on that device.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Target = Literal["cuda", "cpu"]
TARGETS = ("cuda", "cpu")


class FusedAttention(TorchFunctionMode):
    def __init__(self, target: Target):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"attention target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].is_meta:
            return self._fused(*args, **kwargs)
        return func(*args, **kwargs)

    def _fused(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: Any = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: Any = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if self.target == "cpu":
            # the CPU flash kernel takes masks and grouped key/value heads as they are
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
            )[0]
        if attn_mask is None:
            # flash attention: grouped key/value heads are read in place
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )[0]
        # a mask selects the memory-efficient kernel, which takes it as an additive bias and
        # needs as many key/value heads as query heads
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeats = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
        )[0]
