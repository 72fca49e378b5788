"""Built-in models for `zerokit estimate` and `zerokit plan`: Llama-style decoders (transformers).

`llama-0.95b` and `llama-2.7b` are the models of the benchmarks (benchmarks/llama_step.py);
the others have the published shapes of Llama 2 (7B, 13B, 70B) and Llama 3 (8B).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    rope_theta: float = 10000.0

    def config_kwargs(self) -> dict:
        return dict(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            rope_theta=self.rope_theta,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
        )


PRESETS = {
    "llama-tiny": LlamaShape(64, 176, 2, 4, 4),
    "llama-0.95b": LlamaShape(2048, 5632, 16, 16, 16),
    "llama-2.7b": LlamaShape(2560, 6912, 32, 20, 20),
    "llama2-7b": LlamaShape(4096, 11008, 32, 32, 32),
    "llama2-13b": LlamaShape(5120, 13824, 40, 40, 40),
    "llama2-70b": LlamaShape(8192, 28672, 80, 64, 8),
    "llama3-8b": LlamaShape(4096, 14336, 32, 32, 8, vocab=128256, rope_theta=500000.0),
}
