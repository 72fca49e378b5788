"""Layers that save less activation memory: WTA-CRS sampled linear layers, and a causal-LM loss
computed in chunks of tokens (never the full logits).

Typical use::

    replaced = zerokit.nn.convert_to_wtacrs(model, keep_ratio=0.3)
    for indices, batch in loader:            # indices: data-set index of each sample
        with zerokit.nn.sample_indices(model, indices):
            loss = model(batch).loss
            loss.backward()
"""
from zerokit.nn.batch import sample_indices, sampling_states, set_sample_indices
from zerokit.nn.chunked_loss import ChunkedLossCausalLM, chunked_cross_entropy
from zerokit.nn.config import WTACRSConfig
from zerokit.nn.convert import convert_to_wtacrs, select_linear_layers
from zerokit.nn.function import WTACRSLinearFunction
from zerokit.nn.linear import WTACRSLinear
from zerokit.nn.norm_cache import GradNormCache
from zerokit.nn.state import SamplingState

__all__ = [
    "ChunkedLossCausalLM",
    "GradNormCache",
    "SamplingState",
    "WTACRSConfig",
    "WTACRSLinear",
    "WTACRSLinearFunction",
    "chunked_cross_entropy",
    "convert_to_wtacrs",
    "sample_indices",
    "sampling_states",
    "select_linear_layers",
    "set_sample_indices",
]
