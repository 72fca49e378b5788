"""Small models with the awkward features the engine must handle."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class AwkwardLM(nn.Module):
    """Tied embedding/head, a frozen projection, uneven shapes (13, 7, 50), a buffer, and one
    block called twice in a forward."""

    def __init__(self, vocab: int = 50, dim: int = 24, hidden: int = 13, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(layers))
        self.frozen = nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)
        self.odd = nn.Parameter(torch.randn(7) * 0.1)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor(0.5))

    def reset_parameters(self) -> None:
        """Initializes this module's own parameter and buffer (used when built on the meta device)."""
        nn.init.normal_(self.odd, std=0.1)
        self.scale.fill_(0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        h = self.blocks[0](h)  # reused module
        h = h + self.scale * self.frozen(h)
        h = h * (1 + self.odd.sum())
        return self.head(self.norm(h))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def batches(steps: int, batch: int, seq: int = 6, vocab: int = 50, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, (batch, seq), generator=generator), torch.randint(0, vocab, (batch, seq), generator=generator))
        for _ in range(steps)
    ]


class TinyGptBlock(nn.Module):
    """A pre-norm GPT block with SDPA attention, for profiling and planning tests."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, seq, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))
