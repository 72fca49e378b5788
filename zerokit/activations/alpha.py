"""Planning memo's alpha (the fraction of tokens swapped) with planner.swap_fraction."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import psutil
import torch

from planner import SwapFraction, SwapInputs, swap_fraction
from zerokit.activations.config import ActivationMemoryConfig
from zerokit.activations.layout import PROBE_TOKENS

# On CPU the "host" copy stays in the same memory: copying is never what limits alpha there.
CPU_BANDWIDTH = 1e12  # bytes/s
_PROBE_BYTES = 64 << 20


@dataclass(frozen=True)
class SwapSizes:
    """Bytes of one block call's saved activations, by how memo treats them."""

    hidden_bytes: int  # the block input, swapped whole
    attention_bytes: int  # attention outputs, swapped whole
    whole_bytes: int  # other tensors without a token dimension, swapped whole
    token_bytes: int  # tensors a fraction alpha of whose tokens is swapped


@dataclass(frozen=True)
class AlphaPlan:
    alpha: float
    fraction: SwapFraction  # with the binding constraint
    forward_s: float
    bandwidth_bytes_per_s: float
    host_memory_bytes: int
    sizes: SwapSizes


def plan_alpha(
    config: ActivationMemoryConfig, device: torch.device, sizes: SwapSizes, forward_s: float, swapped_blocks: int
) -> AlphaPlan:
    """alpha from the closed form: the swaps must hide behind one block's forward and all swapped
    blocks must fit in the host memory budget. Whole-swapped tensors count with the attention
    output (mandatory), the token-split ones as "other"."""
    bandwidth = host_bandwidth(config, device)
    budget = host_memory_budget(config)
    fraction = swap_fraction(
        SwapInputs(
            bandwidth_bytes_per_s=bandwidth,
            layer_forward_s=forward_s,
            input_bytes=sizes.hidden_bytes,
            attention_bytes=sizes.attention_bytes + sizes.whole_bytes,
            other_bytes=sizes.token_bytes,
            host_memory_bytes=budget,
            num_layers=swapped_blocks,
            kept_layers=0,  # only the swapped blocks are counted
        )
    )
    return AlphaPlan(fraction.alpha, fraction, forward_s, bandwidth, budget, sizes)


def swapped_tokens(alpha: float, tokens: int) -> int:
    """How many of `tokens` memo swaps: alpha * tokens, rounded, leaving no fewer tokens to
    recompute than the smallest count its layout was checked with (a 1-token recomputation can
    take other code paths)."""
    swapped = round(alpha * tokens)
    least = min(PROBE_TOKENS)
    if 0 < tokens - swapped < least:
        swapped = tokens - least
    return max(swapped, 0)


def host_bandwidth(config: ActivationMemoryConfig, device: torch.device) -> float:
    if config.host_bandwidth is not None:
        return float(config.host_bandwidth)
    if device.type != "cuda":
        return CPU_BANDWIDTH
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _measured_bandwidth(index)


@functools.cache
def _measured_bandwidth(device_index: int) -> float:
    """Device-to-host bytes/s of one timed pinned copy (the best of three)."""
    device = torch.device("cuda", device_index)
    with torch.cuda.device(device):
        source = torch.empty(_PROBE_BYTES, dtype=torch.uint8, device=device)
        target = torch.empty(_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
        target.copy_(source, non_blocking=True)  # warm up
        torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000.0)
    return _PROBE_BYTES / best


def host_memory_budget(config: ActivationMemoryConfig) -> int:
    if config.host_memory_budget is not None:
        return config.host_memory_budget
    processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return psutil.virtual_memory().available // 2 // processes
