"""A small GPT and a corpus that needs no download, for the example and the tests.

The corpus is the source text of the Python standard library installed on this machine, read at
run time and tokenized as bytes (vocabulary 256): every machine that runs Python has it.
"""
from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class GPTConfig:
    layers: int = 4
    dim: int = 128
    heads: int = 4
    max_seq: int = 1024
    vocab: int = 256
    mlp_ratio: int = 4


PRESETS = {
    "tiny": GPTConfig(layers=4, dim=128, heads=4),
    "small": GPTConfig(layers=6, dim=384, heads=6),
    "medium": GPTConfig(layers=12, dim=768, heads=12),
    "large": GPTConfig(layers=24, dim=1024, heads=16),
}


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads = config.heads
        self.attn_norm = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.mlp_norm = nn.LayerNorm(config.dim)
        self.up = nn.Linear(config.dim, config.mlp_ratio * config.dim)
        self.down = nn.Linear(config.mlp_ratio * config.dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, seq, 3, self.heads, dim // self.heads).unbind(2)
        attention = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, seq, dim))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.position = nn.Embedding(config.max_seq, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.checkpoint_blocks = False  # recompute each block's activations in backward
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialization. zerokit calls it per module when the model is built on meta."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks else block(x)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def stdlib_corpus(max_bytes: int = 8 << 20) -> torch.Tensor:
    """The standard library's top-level modules, in name order, as a uint8 tensor."""
    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if size < 1 << 16:
        raise RuntimeError("could not read the Python standard library's sources to build the corpus")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)


def sample_batch(corpus: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the corpus: inputs and next-byte targets."""
    starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), generator=generator)
    windows = torch.stack([corpus[s : s + seq + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config: GPTConfig, params: int, seq: int) -> float:
    """Training FLOPs per token: 6N plus attention's 12·L·d·s."""
    return 6 * params + 12 * config.layers * config.dim * seq


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
