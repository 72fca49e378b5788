"""`zerokit estimate` with a chunked loss (Workload.chunked_loss) and memo's keep_last,
restore_buffers and alpha.

The chunked model is traced as a training script runs it, wrapped in ChunkedLossCausalLM: what
its blocks and its loss save equals what the wrapped model saves on the CPU, one chunk's logits
exist at a time in forward and backward, and keep_last and alpha reach the swap and memo rows as
the runtime's activation_memory keys do.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.saved_bytes import saved_bytes
from zerokit.cli import main
from zerokit.nn import ChunkedLossCausalLM
from zerokit.profiler.activations import RESTORE_BUFFERS, block_activations, gpu_timeline
from zerokit.profiler.estimate import Hardware, Workload, estimate
from zerokit.profiler.models import ModelSource, build_on_meta
from zerokit.profiler.trace import trace_step
from zerokit.zero.units import plan_units

from tests.test_profiler_estimate import hand_model

VOCAB, HIDDEN = 4096, 64
BATCH, SEQ, CHUNK = 2, 256, 64
TOKENS = BATCH * SEQ
HAND = "tests.test_profiler_estimate:hand_model"


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, attn_implementation="sdpa", use_cache=False, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


TINY = ModelSource("tiny-llama", tiny_llama)


@pytest.fixture(scope="module")
def estimates() -> dict:
    return {
        chunk: estimate(TINY, Hardware(), Workload(BATCH, SEQ, torch.bfloat16, "cpu", chunked_loss=chunk))
        for chunk in (None, CHUNK)
    }


@pytest.mark.parametrize("chunk", [None, CHUNK])
def test_saved_bytes_equal_those_of_the_model_on_the_cpu(estimates, chunk) -> None:
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16).train()
    if chunk is not None:
        model = ChunkedLossCausalLM(model, chunk)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    per_block, outside = saved_bytes(model, tokens)
    result = estimates[chunk]
    assert [block.saved for block in result.blocks] == per_block
    assert result.outside_blocks_saved == outside


def test_chunked_loss_keeps_less_than_the_full_logits(estimates) -> None:
    full, chunked = estimates[None], estimates[CHUNK]
    assert [b.saved for b in chunked.blocks] == [b.saved for b in full.blocks]  # the blocks are the same
    assert (chunked.parameters, chunked.units) == (full.parameters, full.units)
    logits = TOKENS * VOCAB * 4  # the whole sequence's fp32 logits, which the plain loss saves (log-softmax)
    assert full.outside_blocks_saved > logits > 10 * chunked.outside_blocks_saved
    for stage in (0, 3):
        peaks = [result.find(stage, "none", "none").peak_allocated for result in (chunked, full)]
        assert peaks[0] <= peaks[1] - logits


def test_one_chunk_of_logits_and_its_gradient_at_a_time() -> None:
    model = ChunkedLossCausalLM(build_on_meta(TINY, torch.bfloat16), CHUNK)
    with torch.random.fork_rng(devices=[]):
        trace = trace_step(model, plan_units(model), BATCH, SEQ, "cpu")
    activations = [live - grads for live, grads in zip(trace.live, trace.param_grads)]
    chunk_logits, all_logits = CHUNK * VOCAB * 4, TOKENS * VOCAB * 4  # fp32
    last = trace.blocks[-1]

    def transient(start: int, stop: int) -> int:
        return max(activations[start:stop]) - activations[start]

    # forward: one chunk's logits (upcast to fp32 for the loss), dropped before the next chunk
    forward = transient(last.forward_end, trace.backward_start)
    assert chunk_logits <= forward < 2 * chunk_logits + chunk_logits // 2
    # backward: one chunk's logits recomputed, with their gradient
    backward = transient(trace.backward_start, last.backward_start)
    assert 2 * chunk_logits <= backward < all_logits // 2


def test_chunked_loss_needs_a_causal_lm() -> None:
    with pytest.raises(ValueError, match=r"chunked_loss \(--chunked-loss\) wraps a Hugging Face causal LM"):
        estimate(HAND, Hardware(), Workload(2, 16, chunked_loss=8))

    def wrapped() -> torch.nn.Module:
        return ChunkedLossCausalLM(tiny_llama(), CHUNK)

    with pytest.raises(ValueError, match="already computes a chunked loss"):
        estimate(ModelSource("wrapped", wrapped), Hardware(), Workload(BATCH, SEQ, chunked_loss=CHUNK))


# The hand model (tests/test_profiler_estimate.py): L = 4 blocks x + down(relu(up(x))), each saving
# x and relu's output a (inputs saved: nothing held beyond them), bf16; more tokens than there, so
# that activations make the step's peak.
L, D, FF = 4, 128, 512
B, S = 16, 128
X, A = B * S * D * 2, B * S * FF * 2


def hand(**options) -> object:
    return estimate(HAND, Hardware(gpus_per_node=2), Workload(B, S, torch.bfloat16, **options))


def test_keep_last_moves_activations_between_host_and_gpu() -> None:
    results = {keep: hand(keep_last=keep) for keep in (0, 1, 2, 3)}
    for keep, result in results.items():
        assert result.find(1, "none", "swap").host["activations"] == (L - keep) * (X + A)
        memo = result.find(1, "none", "memo")
        assert memo.memo_alpha == 1.0 and memo.host["activations"] == (L - keep) * (X + A)
    assert hand().find(1, "none", "memo") == results[2].find(1, "none", "memo")  # the runtime's default
    # keeping more blocks never lowers the GPU peak while any block is swapped: the last two hold
    # theirs until backward starts anyway, a third kept adds its own
    peaks = [results[keep].find(1, "none", "memo").peak_allocated for keep in (0, 1, 2, 3)]
    assert peaks == sorted(peaks) and peaks[3] - peaks[2] == X + A


def test_last_blocks_swapped_leave_the_gpu_when_backward_starts() -> None:
    model = build_on_meta(ModelSource("hand", hand_model), torch.bfloat16)
    trace = trace_step(model, plan_units(model), B, S)
    blocks = block_activations(trace)
    every, default = gpu_timeline(trace, blocks, "swap", keep_last=0), gpu_timeline(trace, blocks, "swap")
    last = trace.blocks[-1]
    loss = (last.forward_end + last.backward_start) // 2
    assert every[loss] == default[loss]  # their copies are waited for at backward's start, not before
    assert default[last.backward_start] - every[last.backward_start] == 2 * (X + A)


def test_memo_holds_and_restores_the_block_input() -> None:
    # a Llama block does not save its input (its norm upcasts it first); memo copies it to host
    # memory whole and brings it back into the restore buffer, so each buffer holds it as well
    model = build_on_meta(TINY, torch.bfloat16)
    trace = trace_step(model, plan_units(model), BATCH, SEQ, "cpu")
    blocks = block_activations(trace)
    assert not blocks[0].inputs_saved and blocks[0].inputs == TOKENS * HIDDEN * 2
    memo, swap = gpu_timeline(trace, blocks, "memo", 0), gpu_timeline(trace, blocks, "swap", 0)
    during_backward = trace.blocks[-1].backward_start + 1  # the buffers exist (past the recompute transient)
    assert memo[0] == swap[0]
    assert memo[during_backward] - swap[during_backward] == RESTORE_BUFFERS * blocks[0].inputs


def test_one_restore_buffer_holds_one_block_less() -> None:
    model = build_on_meta(ModelSource("hand", hand_model), torch.bfloat16)
    trace = trace_step(model, plan_units(model), B, S)
    blocks = block_activations(trace)
    during_backward = trace.blocks[-1].backward_start + 1
    for policy in ("swap", "memo"):
        one, two = (gpu_timeline(trace, blocks, policy, 0, buffers) for buffers in (1, 2))
        assert two[during_backward] - one[during_backward] == X + A  # the largest block's restore
        assert one[: trace.blocks[-1].backward_start] == two[: trace.blocks[-1].backward_start]
    assert hand(restore_buffers=1).find(1, "none", "recompute") == hand().find(1, "none", "recompute")


def test_memo_forward_holds_only_the_swapped_share_until_the_copies_are_waited_for() -> None:
    model = build_on_meta(ModelSource("hand", hand_model), torch.bfloat16)
    trace = trace_step(model, plan_units(model), B, S)
    blocks = block_activations(trace)
    assert blocks[0].other == A  # x + down(relu(up(x))): the input x is saved, relu's output is the rest
    whole, quarter = gpu_timeline(trace, blocks, "memo", 0), gpu_timeline(trace, blocks, "memo", 0, alpha=0.25)
    for b in range(L - 1):  # when block b + 1 starts, block b's dropped three quarters are gone
        start = trace.blocks[b + 1].forward_start
        assert whole[start] - quarter[start] == int(0.75 * A)
    backward = trace.blocks[-1].backward_start + 1
    assert whole[backward:] == quarter[backward:]  # restored in full either way


def test_given_alpha_is_memos() -> None:
    planned, given = hand(), hand(alpha=0.25)
    assert planned.find(1, "none", "memo").memo_alpha == 1.0
    memo = given.find(1, "none", "memo")
    assert memo.memo_alpha == 0.25
    assert memo.host["activations"] == (L - 2) * (X + 0.25 * A)  # inputs and attention whole, a quarter of the rest
    assert memo.gpu == planned.find(1, "none", "memo").gpu  # the restore buffer holds every token either way
    assert given.find(1, "none", "swap") == planned.find(1, "none", "swap")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"chunked_loss": 0}, r"chunked_loss \(--chunked-loss\) must be a whole number of tokens per chunk >= 1"),
        ({"chunked_loss": 8.0}, r"chunked_loss \(--chunked-loss\) must be"),
        ({"chunked_loss": True}, r"chunked_loss \(--chunked-loss\) must be"),
        ({"keep_last": -1}, r"keep_last \(--keep-last\) must be a whole number of blocks >= 0"),
        ({"keep_last": 1.5}, r"keep_last \(--keep-last\) must be"),
        ({"restore_buffers": 3}, r"restore_buffers \(--restore-buffers\) must be 1 or 2"),
        ({"restore_buffers": True}, r"restore_buffers \(--restore-buffers\) must be 1 or 2"),
        ({"alpha": 1.5}, r"alpha \(--alpha\) must be a number in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha \(--alpha\) must be"),
        ({"alpha": float("nan")}, r"alpha \(--alpha\) must be"),
        ({"alpha": "0.3"}, r"alpha \(--alpha\) must be"),
    ],
)
def test_bad_values_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Workload(B, S, **options)


def test_cli_flags_and_json(capsys, tmp_path) -> None:
    tiny_llama().config.save_pretrained(tmp_path)
    args = ["estimate", "--model", str(tmp_path), "--micro-batch", str(BATCH), "--seq", str(SEQ)]
    flags = ["--chunked-loss", str(CHUNK), "--keep-last", "0", "--alpha", "0.5", "--restore-buffers", "1"]
    assert main([*args, *flags, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    workload = data["workload"]
    assert (workload["chunked_loss_tokens"], workload["keep_last"], workload["alpha"]) == (CHUNK, 0, 0.5)
    assert workload["restore_buffers"] == 1
    assert data["activations"]["outside_blocks_saved_bytes"] < TOKENS * VOCAB * 4
    rows = {(c["stage"], c["offload"], c["activations"]): c for c in data["configurations"]}
    assert rows[(1, "none", "memo")]["memo_alpha"] == 0.5
    assert main([*args, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["workload"]
    assert (plain["chunked_loss_tokens"], plain["keep_last"], plain["alpha"]) == (None, None, None)
    assert main([*args, *flags]) == 0
    table = capsys.readouterr().out
    options = "loss over chunks of 64 tokens, swap and memo keep the last 0 blocks, 1 restore buffer, memo alpha 0.5"
    assert options in table


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--chunked-loss", "0", "chunked_loss (--chunked-loss) must be"), ("--keep-last", "-2", "keep_last (--keep-last)"),
     ("--alpha", "2", "alpha (--alpha) must be")],
)  # fmt: skip
def test_cli_bad_values(capsys, flag: str, value: str, message: str) -> None:
    assert main(["estimate", "--model", HAND, "--micro-batch", "2", "--seq", "16", flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"zerokit estimate: {message}")
