"""The chunked causal-LM loss equals Hugging Face's own loss and gradients (with ignored labels and
chunks that do not divide the tokens), holds one chunk's logits at a time, and trains under
ZeRO-3 with two ranks like the unwrapped model in one process."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zerokit
from tests.multiprocess import run_world
from zerokit.nn import ChunkedLossCausalLM, chunked_cross_entropy

transformers = pytest.importorskip("transformers")

VOCAB, BATCH, SEQ = 96, 2, 24


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, attn_implementation="sdpa",
                                      tie_word_embeddings=False)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk_tokens", [1, 7, 10_000])
def test_loss_and_gradients_equal_hugging_face(chunk_tokens: int) -> None:
    reference, chunked = _llama(), ChunkedLossCausalLM(_llama(), chunk_tokens)
    tokens = _tokens()
    labels = tokens.clone()
    labels[0, :5] = -100  # a prompt without loss
    expected = reference(input_ids=tokens, labels=labels).loss
    expected.backward()
    loss = chunked(input_ids=tokens, labels=labels)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    grads = dict(chunked.lm.named_parameters())
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(grads[name].grad, parameter.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bias_and_all_ignored_labels() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight, bias = torch.randn(11, 8), torch.randn(11)
    labels = torch.randint(0, 11, (2, 5))
    expected = F.cross_entropy((hidden[:, :-1] @ weight.T + bias).reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, 3, bias), expected)
    nothing = chunked_cross_entropy(hidden, weight, torch.full_like(labels, -100), 3)
    assert nothing.item() == 0.0  # no division by zero when every label is ignored


def test_only_one_chunk_of_logits_is_saved() -> None:
    hidden = torch.randn(1, 64, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(hidden, weight, torch.randint(0, 50, (1, 64)), 16)
    # neither the full logits nor one chunk's are kept for backward: each chunk's are recomputed there
    assert max(saved) < 16 * 50


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="leading"):
        chunked_cross_entropy(torch.randn(2, 5, 8), torch.randn(3, 8), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_cross_entropy(torch.randn(2, 5, 8), torch.randn(3, 8), torch.zeros(2, 5, dtype=torch.long), 0)


def _train_zero3(rank: int) -> list[float]:
    model = ChunkedLossCausalLM(_llama(), chunk_tokens=10)
    engine = zerokit.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                                {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    losses = []
    for step in range(3):
        tokens = _tokens(step)[rank : rank + 1].to(engine.device)
        loss = engine(input_ids=tokens, labels=tokens)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_zero3_training_matches_plain_hugging_face() -> None:
    model = _llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    expected = []
    for step in range(3):
        losses = [model(input_ids=_tokens(step)[r : r + 1], labels=_tokens(step)[r : r + 1]).loss for r in range(2)]
        (sum(losses) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append([loss.item() for loss in losses])
    ranks = run_world(_train_zero3, 2)
    for step in range(3):
        assert [ranks[0][step], ranks[1][step]] == pytest.approx(expected[step], abs=1e-5)


def test_models_that_transform_their_logits_are_refused() -> None:
    config = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, vocab_size=VOCAB)  # fmt: skip
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0"):
        ChunkedLossCausalLM(transformers.Gemma2ForCausalLM(config))  # its logits are soft-capped
    llama = _llama()
    llama.config.logits_scaling = 1.0  # Granite's divisor at its neutral value changes nothing
    ChunkedLossCausalLM(llama)
    llama.config.logits_scaling = 4.0
    with pytest.raises(ValueError, match=r"logits_scaling=4\.0"):
        ChunkedLossCausalLM(llama)
