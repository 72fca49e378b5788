"""WTACRSLinear: a drop-in nn.Linear whose weight gradient is a WTA-CRS estimate."""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from zerokit.nn.function import WTACRSLinearFunction, keep_rows
from zerokit.nn.state import SamplingState


def check_keep_ratio(keep_ratio: float) -> float:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be a number in (0, 1] (the fraction of rows kept), got {keep_ratio!r}")
    return float(keep_ratio)


def _autocast_arguments(input: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Cast as autocast casts nn.Linear's arguments (the function itself runs on one dtype)."""
    device_type = input.device.type
    # Meta tensors (shape-only runs such as `zerokit estimate`) have no autocast state to ask.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return input.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _saved_by_its_producer(input: Tensor) -> bool:
    """Whether autograd already keeps ``input`` (or the tensor it is a view of) for its producer.

    ReLU, tanh, sigmoid and softmax keep their result, fused attention kernels their output: a
    layer reading such a tensor saves it in full at no extra cost, whereas a sample would be
    extra memory. Only attributes' presence is checked, so no saved tensor is unpacked.
    """
    source = input if input._base is None else input._base
    node = source.grad_fn
    if node is None:
        return False
    return hasattr(node, "_saved_result") or (source.output_nr == 0 and hasattr(node, "_saved_output"))


class WTACRSLinear(nn.Linear):
    """nn.Linear with the same parameters and state_dict, saving only ~keep_ratio of its input rows.

    In training mode with a trainable weight, the output and the input gradient are exact and
    the weight gradient is an unbiased WTA-CRS estimate built from k = ceil(keep_ratio · N) of
    the N input rows (all leading dimensions flattened). In eval mode, or with a frozen weight
    (PyTorch then saves no input at all), it is exactly nn.Linear; so it is when autograd keeps
    the input anyway for the op that produced it (after ReLU, or on a fused attention output).

    Layers built by convert_to_wtacrs share one SamplingState, through which the training loop
    passes the batch's sample indices (see sample_indices); a layer built directly gets its own.
    Layers of one SamplingState that read the same input tensor (q/k/v, gate/up projections)
    save one shared sample of it, drawn with the first one's probabilities: unbiased for each.
    Only that first layer's ∇Z norms are cached (the others' would never be read).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        keep_ratio: float = 0.3,
        sampling_state: Optional[SamplingState] = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.sampling_state = sampling_state if sampling_state is not None else SamplingState()
        self.cache_slot = self.sampling_state.cache.new_slot()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, keep_ratio: float = 0.3, sampling_state: Optional[SamplingState] = None
    ) -> "WTACRSLinear":
        """A WTACRSLinear holding the very parameter objects of ``linear`` (no data is copied)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            keep_ratio=keep_ratio,
            sampling_state=sampling_state,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, input: Tensor) -> Tensor:
        given = input
        input, weight, bias = _autocast_arguments(input, self.weight, self.bias)
        if not (self.training and weight.requires_grad):
            return F.linear(input, weight, bias)
        state = self.sampling_state
        # Drawn before the grad-mode test: see [Note: where samples must agree] in state.py.
        seed = state.draw_seed()
        if not torch.is_grad_enabled() or _saved_by_its_producer(input):
            return F.linear(input, weight, bias)
        kept = state.shared_rows(given, self.keep_ratio, input.dtype)
        batch = join = None  # a layer reusing a sample caches no norms: only the one drawing it reads them
        if kept is None:
            batch = state.batch_for(self.cache_slot, input) if input.numel() else None
            grad_norms = None
            if batch is not None:
                tokens = input.numel() // (input.shape[-1] * len(batch))
                grad_norms = state.cached_grad_norms(self.cache_slot, batch, tokens, input.device)
            with state.beside(input.device) as join:  # the sampler's small kernels overlap the matmul
                kept = keep_rows(input, self.keep_ratio, seed, grad_norms, state.sampler)
            state.share_rows(given, self.keep_ratio, input.dtype, kept)
        observe_backward = functools.partial(state.observe_backward, self.cache_slot, batch)
        return WTACRSLinearFunction.apply(input, weight, bias, kept, observe_backward, join)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep_ratio={self.keep_ratio}"
