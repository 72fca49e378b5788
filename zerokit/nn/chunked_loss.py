"""A causal-LM loss that never holds the full logits.

At long sequences the logits (tokens x vocabulary, upcast to fp32 for the loss) and their
gradient outgrow all the blocks' activations: 16.8 GB at 128K tokens for a 32K vocabulary. Here
the head and the cross entropy run over chunks of tokens; each chunk's logits are recomputed in
backward (torch.utils.checkpoint), so one chunk's logits exist at a time, in either pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # Hugging Face's label for "no loss here"

# Config fields with which a Hugging Face causal LM transforms its logits after the head (Gemma-2's
# soft-capping, Cohere's scale, Granite's divisor), and the value that leaves them unchanged.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 8192,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross entropy of `hidden @ weight.T (+ bias)` against `labels`, as Hugging
    Face causal LMs compute it: the logits at position t predict labels[t + 1], positions labelled
    -100 are skipped, and the loss is taken in fp32.

    hidden: (..., seq, dim); labels: (..., seq); weight: (vocab, dim), the output head's.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} differ in their "
                         "leading (batch, sequence) dimensions")  # fmt: skip
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be at least 1")
    # Shift the labels rather than the hidden states: no copy of the (large) hidden states.
    targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(_summed_loss, flat[start:stop], weight, bias, targets[start:stop], use_reentrant=False)
    count = (targets != IGNORE_INDEX).sum().clamp_min(1)
    return total / count


def _summed_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


class ChunkedLossCausalLM(nn.Module):
    """A Hugging Face causal LM whose forward returns the loss of chunked_cross_entropy.

    `model(input_ids=..., labels=...)` returns the scalar loss; other keyword arguments go to the
    decoder (`model.get_decoder()`), whose last hidden state feeds the output head
    (`model.get_output_embeddings()`) chunk by chunk. Wrap before zerokit.initialize; the
    wrapped model's parameters and state_dict keys are unchanged under `lm.`.
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int = 8192):
        super().__init__()
        config = getattr(lm, "config", None)
        for field, neutral in LOGIT_TRANSFORMS.items():
            value = getattr(config, field, neutral)
            if value != neutral:
                raise ValueError(
                    f"this model's config sets {field}={value!r}: its forward transforms the logits after the output "
                    "head, and the chunked loss (the head's matmul only) would train on other logits. Train it "
                    "without ChunkedLossCausalLM (no --chunked-loss)."
                )
        self.lm = lm
        self.chunk_tokens = chunk_tokens

    @property
    def config(self):
        """The wrapped model's config (checks such as memo's attention implementation read it)."""
        return self.lm.config

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **decoder_kwargs) -> torch.Tensor:
        hidden = self.lm.get_decoder()(input_ids=input_ids, **decoder_kwargs).last_hidden_state
        head = self.lm.get_output_embeddings()
        return chunked_cross_entropy(hidden, head.weight, labels, self.chunk_tokens, head.bias)
