"""The activations traced on the meta device equal what the same models save and allocate on the CPU.

Two independent measurements on real tensors: the bytes each block saves for backward
(saved_tensors_hooks, deduplicated by storage), and the peak of everything a real training step
of the engine allocates beyond the model states it held before (the planner's allocation
recorder), with and without activation checkpointing of every block."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import zerokit
from planner.profile import AllocationRecorder
from zerokit.profiler.estimate import Hardware, Workload, estimate
from zerokit.profiler.models import ModelSource, build_on_meta, training_loss
from zerokit.profiler.trace import trace_step
from zerokit.profiler.activations import block_activations
from tests.saved_bytes import saved_bytes
from zerokit.zero.units import plan_units

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from gpt import GPT, GPTConfig  # noqa: E402

BATCH, SEQ = 4, 128


def example_gpt(layers: int = 4) -> torch.nn.Module:
    return GPT(GPTConfig(layers=layers, dim=64, heads=4, max_seq=SEQ))


def small_llama(layers: int = 4) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, attn_implementation="sdpa", use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


MODELS = {"gpt": (example_gpt, torch.bfloat16), "llama": (small_llama, torch.float32)}


def _checkpoint_blocks(model: torch.nn.Module) -> None:
    if isinstance(model, GPT):
        model.checkpoint_blocks = True
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _step_peak(build, dtype: torch.dtype, tokens: torch.Tensor, checkpoint: bool) -> int:
    """Peak bytes allocated during forward and backward of a real engine step (world of one,
    stage 0), beyond what existed before: activations, gradients and reduction buffers."""
    torch.manual_seed(0)
    model = build()
    if checkpoint:
        _checkpoint_blocks(model)
    engine = zerokit.initialize(model, torch.optim.AdamW(model.parameters()),
                                {"bf16": {"enabled": dtype == torch.bfloat16}})  # fmt: skip
    peak = 0
    for _ in range(2):  # the second step runs with optimizer states in place, as the estimate assumes
        recorder = AllocationRecorder()
        with recorder:
            engine.backward(training_loss(engine.module, tokens, engine))
        recorder.stop()
        live = peak = 0
        for event in recorder.events:
            live += event.nbytes if event.kind == "alloc" else -event.nbytes
            peak = max(peak, live)
        engine.step()
    return peak


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(MODELS))
def test_saved_bytes_per_block_match_the_cpu(name: str, tokens: torch.Tensor) -> None:
    build, dtype = MODELS[name]
    meta = build_on_meta(ModelSource(name, build), dtype)
    traced = [block.saved for block in block_activations(trace_step(meta, plan_units(meta), BATCH, SEQ, "cpu"))]
    torch.manual_seed(0)
    measured = saved_bytes(build().to(dtype).train(), tokens)[0]
    # equal but for LayerNorm's mean and rstd: fp32 on meta (as on CUDA), the input dtype on CPU
    assert traced == pytest.approx(measured, rel=0.01)
    assert len(set(traced)) == 1 and traced[0] > 0


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("policy", ["none", "recompute"])
@pytest.mark.parametrize("name", list(MODELS))
def test_step_peak_matches_the_cpu(name: str, policy: str, tokens: torch.Tensor) -> None:
    build, dtype = MODELS[name]
    result = estimate(ModelSource(name, build), Hardware(), Workload(BATCH, SEQ, dtype, attention="cpu"))
    config = result.find(0, "none", policy)
    estimated = config.gpu["activations"] + config.gpu["gradients"] + config.gpu["communication"]
    measured = _step_peak(build, dtype, tokens, checkpoint=policy == "recompute")
    assert estimated == pytest.approx(measured, rel=0.01)


def test_recompute_keeps_far_less_than_none(tokens: torch.Tensor) -> None:
    result = estimate(ModelSource("gpt", example_gpt), Hardware(), Workload(BATCH, SEQ, torch.bfloat16, "cpu"))
    none, recompute = (result.find(0, "none", p).gpu["activations"] for p in ("none", "recompute"))
    assert recompute < none / 2
