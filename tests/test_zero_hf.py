"""Unmodified Hugging Face models (Llama, GPT-2 with tied embeddings) under ZeRO-3 with two ranks
match a plain single-process run, also with activation checkpointing (both variants), and build
from the meta device with only shards materialized."""
from __future__ import annotations

import pytest
import torch

import zerokit
from tests.multiprocess import run_world

transformers = pytest.importorskip("transformers")

STEPS, BATCH, SEQ, VOCAB = 4, 4, 16, 128
# GPT-2's key bias has an exactly-zero true gradient; a larger eps keeps Adam from amplifying
# its rounding noise (which differs between any two reduction orders) into lr-sized steps.
EPS = 1e-6
VARIANTS = ("llama", "gpt2", "llama_checkpointed", "gpt2_checkpointed_reentrant")


def _build(variant: str, device: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant.startswith("llama"):
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                          attn_implementation="sdpa")
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                         attn_implementation="eager")
        cls = transformers.GPT2LMHeadModel
    with torch.device(device or "cpu"):
        model = cls(config)
    if "checkpointed" in variant:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": "reentrant" in variant})
    return model


def _data() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(STEPS)]


def _train(model: torch.nn.Module, rank: int, world: int) -> list[float]:
    engine = zerokit.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2, eps=EPS),
                                {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    losses, share = [], slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for tokens in _data():
        loss = engine(input_ids=tokens[share], labels=tokens[share]).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, engine.full_state_dict()


def _runs(rank: int) -> dict:
    results = {variant: _train(_build(variant), rank, 2) for variant in VARIANTS}
    torch.manual_seed(123)
    meta = _build("llama", device="meta")
    engine = zerokit.initialize(meta, torch.optim.AdamW(meta.parameters(), lr=1e-2),
                                {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    results["meta"] = (engine.full_state_dict(), engine.memory_breakdown(), meta.model.rotary_emb.inv_freq.clone())
    return results


@pytest.fixture(scope="module")
def world_results() -> list[dict]:
    return run_world(_runs, 2)


def _reference(variant: str) -> tuple[list[float], dict]:
    model = _build(variant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=EPS)
    losses = []
    for tokens in _data():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_model_matches_plain_pytorch(world_results: list[dict], variant: str) -> None:
    ref_losses, ref_state = _reference(variant)
    mean = [sum(v) / 2 for v in zip(*(r[variant][0] for r in world_results))]
    assert mean == pytest.approx(ref_losses, abs=1e-5)
    for rank_result in world_results:
        state = rank_result[variant][1]
        assert state.keys() == ref_state.keys()
        for key, value in ref_state.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)


def test_hf_meta_build_materializes_shards(world_results: list[dict]) -> None:
    real = _build("llama")
    states = [r["meta"][0] for r in world_results]
    assert states[0].keys() == real.state_dict().keys()
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key  # one model across ranks
    assert torch.equal(world_results[0]["meta"][2], real.model.rotary_emb.inv_freq)  # buffers initialized too
    assert torch.equal(states[0]["model.norm.weight"], torch.ones(32))
    assert 0.015 < states[0]["model.layers.0.mlp.up_proj.weight"].std() < 0.025  # HF's normal(0, 0.02)
    held = world_results[0]["meta"][1]
    total = 4 * sum(p.numel() for p in real.parameters())
    assert held["parameters"] == 0  # stage 3: nothing gathered between steps
    assert held["master_weights"] == pytest.approx(total / 2, rel=0.05)
