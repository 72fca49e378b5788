"""memo restores each saved tensor once: a tensor saved by several ops of a block (the input of the
q, k and v projections, RMSNorm's fp32 input saved by its pow and its mul) shares one restore, so
the restore buffers are as large as the estimator's model of them (zerokit.profiler.activations:
the storages only the block saved, plus its input), measured from a meta-device trace."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.test_activations_parity import assert_same, train
from zerokit.activations import apply_activation_memory
from zerokit.activations.slots import Storage
from zerokit.nn import ChunkedLossCausalLM
from zerokit.profiler.activations import block_activations
from zerokit.profiler.trace import trace_step
from zerokit.zero.units import plan_units

VOCAB, SEQ, CHUNK, LAYERS = 256, 256, 64, 4


def tiny_llama() -> ChunkedLossCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=VOCAB, attn_implementation="sdpa", use_cache=False, tie_word_embeddings=False,
    )  # fmt: skip
    return ChunkedLossCausalLM(LlamaForCausalLM(config), CHUNK)


def loss_of(model, tokens):
    return model(input_ids=tokens, labels=tokens)


def estimated_restore_bytes() -> list[int]:
    """Per block, what the estimator restores under memo: the storages only the block saved, and
    its input where the block does not save it itself."""
    with torch.device("meta"):
        model = tiny_llama().to(torch.bfloat16)
    trace = trace_step(model, plan_units(model), 1, SEQ, "cpu")
    return [b.swappable + (0 if b.inputs_saved else b.inputs) for b in block_activations(trace)]


@pytest.mark.parametrize(("alpha", "buffers"), [(0.0, 2), (0.5, 2), (1.0, 2), (0.5, 1)])
def test_memo_restores_each_saved_tensor_once(alpha, buffers):
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16).train()
    tokens = [torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected = train(copy.deepcopy(model), loss_of, tokens)
    config = {"policy": "memo", "keep_last": 0, "alpha": alpha, "restore_buffers": buffers}
    manager = apply_activation_memory(model, config)
    during_backward = []
    first_weight = next(model.lm.model.layers[0].parameters())
    first_weight.register_hook(lambda grad: during_backward.append(manager.restore_buffer_bytes()))
    assert_same(expected, train(model, loss_of, tokens))  # shared restores give the same gradients

    loss = loss_of(model, tokens[0])  # between forward and backward, every saved tensor is stored
    restored = estimated_restore_bytes()
    assert [record.restore_plan().peak_bytes for record in manager.records] == restored
    record = manager.records[0]
    split_slots = [s for s in record.live_slots() if s.storage is Storage.SPLIT]
    assert len(record.restore_targets()) < len(split_slots)  # q, k, v's input, RMSNorm's fp32 input: once each
    loss.backward()
    assert during_backward[-1] == buffers * max(restored)
