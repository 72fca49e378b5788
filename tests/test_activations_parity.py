"""Every activation policy gives the losses and gradients of the plain run (fp32, 1e-6), over
several iterations (memo learns its layout in the first), on the example GPT, a tiny Hugging
Face Llama (sdpa, grouped-query attention, rotary tables passed into each layer) and GPT-2."""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from zerokit.activations import apply_activation_memory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, GPTConfig  # noqa: E402

BATCH, SEQ, VOCAB = 2, 16, 64
TOLERANCE = dict(rtol=1e-6, atol=1e-6)

POLICIES = {
    "keep": {"policy": "none"},
    "recompute": {"policy": "recompute"},
    "swap": {"policy": "swap"},
    "memo_alpha0": {"policy": "memo", "alpha": 0.0},
    "memo_alpha0.5": {"policy": "memo", "alpha": 0.5},
    "memo_alpha1": {"policy": "memo", "alpha": 1.0},
    "memo_planned": {"policy": "memo"},
    "mixed": {"block_policies": ["memo", "swap", "recompute", "keep"], "alpha": 0.5},
}


def gpt() -> tuple[nn.Module, Callable]:
    model = GPT(GPTConfig(layers=4, dim=32, heads=2, max_seq=64, vocab=VOCAB))
    return model, lambda m, tokens: m(tokens, tokens)


def llama(attention: str = "sdpa") -> tuple[nn.Module, Callable]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attention,
    )
    return LlamaForCausalLM(config), lambda m, tokens: m(input_ids=tokens, labels=tokens, use_cache=False).loss


def gpt2(attention: str = "sdpa", dropout: float = 0.0) -> tuple[nn.Module, Callable]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation=attention,
    )
    return GPT2LMHeadModel(config), lambda m, tokens: m(input_ids=tokens, labels=tokens, use_cache=False).loss


MODELS = {"gpt": gpt, "llama": llama, "gpt2": gpt2}


def batches(count: int, seq: int = SEQ) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, seq), generator=generator) for _ in range(count)]


def train(model: nn.Module, loss_fn: Callable, inputs: list[torch.Tensor], seed: int = 0) -> list[tuple]:
    """Loss and gradients of each batch (no optimizer step: every iteration sees the same weights)."""
    torch.manual_seed(seed)
    results = []
    for tokens in inputs:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, tokens)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results


def assert_same(expected: list[tuple], actual: list[tuple]) -> None:
    assert len(expected) == len(actual)
    for (loss0, grads0), (loss1, grads1) in zip(expected, actual):
        torch.testing.assert_close(loss1, loss0, **TOLERANCE)
        assert grads0.keys() == grads1.keys()
        for name in grads0:
            torch.testing.assert_close(grads1[name], grads0[name], **TOLERANCE, msg=name)


@pytest.fixture(scope="module", params=list(MODELS))
def reference(request):
    torch.manual_seed(0)
    model, loss_fn = MODELS[request.param]()
    model.train()
    inputs = batches(3)
    return model, loss_fn, inputs, train(copy.deepcopy(model), loss_fn, inputs)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_matches_plain_run(reference, policy):
    model, loss_fn, inputs, expected = reference
    model = copy.deepcopy(model)
    manager = apply_activation_memory(model, POLICIES[policy])
    assert_same(expected, train(model, loss_fn, inputs))
    if POLICIES[policy].get("policy") == "memo":
        reports = manager.reports()
        assert [r.policy for r in reports] == ["memo", "memo"]  # the last two blocks are kept
        assert all(r.tokens == SEQ for r in reports)


def test_memo_relearns_for_new_shapes():
    torch.manual_seed(0)
    model, loss_fn = gpt()
    inputs = [batches(1, 16)[0], batches(1, 12)[0], batches(1, 16)[0], batches(1, 12)[0]]
    expected = train(copy.deepcopy(model), loss_fn, inputs)
    manager = apply_activation_memory(model, {"policy": "memo", "alpha": 0.5})
    assert_same(expected, train(model, loss_fn, inputs))
    assert all(len(block.learned) == 2 for block in manager.blocks if block.policy == "memo")
    assert [r.swapped_tokens for r in manager.reports()] == [6, 6]


@pytest.mark.parametrize("policy", ["recompute", "memo"])
def test_recomputation_stops_after_the_last_tensor_it_needs(policy):
    """A Llama block's down projection saves its input last: a block run again stops there,
    before the projection computes (its output, and the residual after it, are not needed)."""
    torch.manual_seed(0)
    model, loss_fn = llama()
    inputs = batches(3)
    expected = train(copy.deepcopy(model), loss_fn, inputs)
    calls = [0] * len(model.model.layers)
    for index, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    apply_activation_memory(model, {"policy": policy, "alpha": 0.5})
    assert_same(expected, train(model, loss_fn, inputs))
    # memo's first iteration learns the layout: the block runs again in full and twice on a few tokens
    learning = [0, 0] if policy == "recompute" else [3, 3]
    assert calls == [3 + n for n in learning] + [3, 3]  # the last two blocks keep their activations


@pytest.mark.parametrize("policy", ["recompute", "memo"])
def test_dropout_is_reproduced(policy):
    """Recomputation replays the random state; memo swaps whole what dropout touched."""
    torch.manual_seed(0)
    model, loss_fn = gpt2(dropout=0.1)
    model.train()
    inputs = batches(3)
    expected = train(copy.deepcopy(model), loss_fn, inputs, seed=5)
    manager = apply_activation_memory(model, {"policy": policy, "alpha": 0.5})
    assert_same(expected, train(model, loss_fn, inputs, seed=5))
    if policy == "memo":
        layout = next(iter(manager.blocks[0].learned.values()))
        counts = layout.counts()
        assert counts["whole"] > 0 and counts["tokens"] > 0


@pytest.mark.parametrize("policy", ["recompute", "swap", "memo"])
def test_backward_twice_with_retained_graph(policy):
    torch.manual_seed(0)
    model, loss_fn = gpt()
    tokens = batches(1)[0]
    reference = copy.deepcopy(model)
    loss_fn(reference, tokens).backward()
    manager = apply_activation_memory(model, {"policy": policy, "alpha": 0.5})
    loss_fn(model, tokens).backward()  # memo learns its layout
    model.zero_grad()
    loss = loss_fn(model, tokens)
    loss.backward(retain_graph=True)
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad, **TOLERANCE, msg=name)
    assert manager.records == []


def test_two_forwards_then_two_backwards():
    """Gradient accumulation with both graphs alive: the second backward finds its blocks
    without the first one's bookkeeping and restores them on demand."""
    torch.manual_seed(0)
    model, loss_fn = gpt()
    first, second = batches(2)
    reference = copy.deepcopy(model)
    (loss_fn(reference, first) + loss_fn(reference, second)).backward()
    manager = apply_activation_memory(model, {"policy": "memo", "alpha": 0.5, "keep_last": 0})
    loss_fn(model, first).backward()  # learn
    model.zero_grad()
    loss_a, loss_b = loss_fn(model, first), loss_fn(model, second)
    loss_a.backward()
    loss_b.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOLERANCE, msg=name)
    assert manager.restore_counts["on_demand"] > 0


def test_no_grad_forward_is_left_alone():
    torch.manual_seed(0)
    model, loss_fn = gpt()
    manager = apply_activation_memory(model, {"policy": "swap"})
    with torch.no_grad():
        loss_fn(model, batches(1)[0])
    assert manager.records == []


@pytest.mark.parametrize("policy", ["swap", "memo"])
def test_bf16(policy):
    torch.manual_seed(0)
    model, loss_fn = gpt()
    model.to(torch.bfloat16)
    inputs = batches(3)
    expected = train(copy.deepcopy(model), loss_fn, inputs)
    manager = apply_activation_memory(model, {"policy": policy, "alpha": 0.5})
    actual = train(model, loss_fn, inputs)
    for (loss0, grads0), (loss1, grads1) in zip(expected, actual):
        torch.testing.assert_close(loss1, loss0, rtol=1e-2, atol=1e-2)
        for name in grads0:
            error = (grads1[name].float() - grads0[name].float()).norm() / grads0[name].float().norm()
            assert error < 1e-2, name
    assert all(r.host_bytes > 0 for r in manager.reports())


def test_recovers_from_a_failed_backward():
    torch.manual_seed(0)
    model, loss_fn = gpt()
    inputs = batches(2)
    expected = train(copy.deepcopy(model), loss_fn, inputs)
    manager = apply_activation_memory(model, {"policy": "memo", "alpha": 0.5, "keep_last": 0})
    train(model, loss_fn, inputs[:1])  # learn

    def fail(grad):
        raise RuntimeError("backward failed on purpose")

    handle = model.blocks[1].register_full_backward_pre_hook(lambda module, grad: fail(grad))
    with pytest.raises(RuntimeError, match="on purpose"):
        loss_fn(model, inputs[0]).backward()
    handle.remove()
    assert_same(expected, train(model, loss_fn, inputs))
    assert manager.records == []
