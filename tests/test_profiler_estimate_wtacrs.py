"""`zerokit estimate` with WTA-CRS linear layers: the traced converted model saves what the
converted model really saves on the CPU, and, for the hand model, what the arithmetic says."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from tests import test_profiler_trace as trace_models
from tests.saved_bytes import saved_bytes
from zerokit.cli import main
from zerokit.nn import WTACRSLinear, convert_to_wtacrs
from zerokit.profiler.estimate import Hardware, Workload, estimate, estimate_module
from zerokit.profiler.models import ModelSource, build_on_meta

HAND = "tests.test_profiler_estimate:hand_model"
KEEP = 0.3
BATCH, SEQ = 2, 64


def example_gpt() -> torch.nn.Module:
    return trace_models.example_gpt(layers=2)


def small_llama() -> torch.nn.Module:
    return trace_models.small_llama(layers=2)


# fp32 for the GPT: in bf16 its LayerNorm keeps mean and rstd in bf16 on the CPU, in fp32 on meta
MODELS = {"gpt": (example_gpt, torch.float32), "llama": (small_llama, torch.bfloat16)}


@pytest.mark.parametrize("name", list(MODELS))
def test_saved_bytes_equal_those_of_the_converted_model_on_the_cpu(name: str) -> None:
    build, dtype = MODELS[name]
    source = ModelSource(name, build)
    exact, sampled = (
        [block.saved for block in estimate(source, Hardware(), Workload(BATCH, SEQ, dtype, "cpu", keep)).blocks]
        for keep in (None, KEEP)
    )
    torch.manual_seed(0)
    model = build().to(dtype).train()
    replaced = convert_to_wtacrs(model, keep_ratio=KEEP)
    assert len(replaced) == (8 if name == "gpt" else 14)  # qkv/proj/up/down; q/k/v/o/gate/up/down, x2 blocks
    tokens = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    assert sampled == saved_bytes(model, tokens)[0]
    assert all(s < e for s, e in zip(sampled, exact))


# The hand model (tests/test_profiler_estimate.py): blocks x + down(relu(up(x))), bf16, B x S tokens.
# WTA-CRS: up keeps k = ceil(0.3 N) of the N = B S rows of x, their int64 indices and fp32
# weights instead of x; down reads relu's output, which relu saves anyway, so it stays exact.
HAND_B, HAND_S, D, FF, L = 2, 16, 128, 512, 4
ROWS = HAND_B * HAND_S
K = math.ceil(KEEP * ROWS)  # 10 of 32
X, A = ROWS * D * 2, ROWS * FF * 2


@pytest.fixture(scope="module")
def hand() -> tuple:
    hardware = Hardware(gpus_per_node=2, nvme=10**12)
    workloads = (Workload(HAND_B, HAND_S, torch.bfloat16, wtacrs_keep_ratio=keep) for keep in (None, KEEP))
    return tuple(estimate(HAND, hardware, workload) for workload in workloads)


def test_hand_model_blocks_keep_the_sampled_rows(hand) -> None:
    exact, sampled = hand
    assert K == 10
    for block in exact.blocks:
        assert (block.saved, block.inputs_saved) == (X + A, True)
    for block in sampled.blocks:
        assert block.saved == A + K * D * 2 + K * 8 + K * 4
        assert block.private == block.saved  # the rows are copies made in the block: recompute drops them
        assert (block.inputs, block.inputs_saved) == (X, False)  # x is no longer kept
    assert sampled.outside_blocks_saved == exact.outside_blocks_saved  # the head is never converted
    assert (sampled.parameters, sampled.units) == (exact.parameters, exact.units)


def test_hand_model_configurations_reflect_the_converted_blocks(hand) -> None:
    swapped = L - 2  # swap moves what each block saved to the host: now the sample
    assert hand[1].find(1, "none", "swap").host["activations"] == swapped * (A + K * (D * 2 + 8 + 4))
    # more tokens than the fixture's, so that activations (not gradients) make the step's peak
    batch, seq = 16, 128
    rows = batch * seq
    workloads = (Workload(batch, seq, torch.bfloat16, wtacrs_keep_ratio=keep) for keep in (None, KEEP))
    before, after = (estimate(HAND, Hardware(gpus_per_node=2), w).find(1, "none", "none") for w in workloads)
    # the peak comes at the loss, with every block's activations: each keeps k rows instead of x
    saved_per_block = rows * D * 2 - math.ceil(KEEP * rows) * (D * 2 + 8 + 4)
    assert before.gpu["activations"] - after.gpu["activations"] == L * saved_per_block
    assert before.peak_allocated - after.peak_allocated == L * saved_per_block
    states = ("parameters", "master_weights", "optimizer_states")
    assert [after.gpu[k] for k in states] == [before.gpu[k] for k in states]


def test_estimate_module_leaves_the_given_model_as_it_is() -> None:
    model = build_on_meta(ModelSource("gpt", example_gpt), torch.bfloat16)
    before = copy.deepcopy(model)
    result = estimate_module(model, "gpt", Hardware(), Workload(BATCH, SEQ, wtacrs_keep_ratio=KEEP))
    assert not any(isinstance(m, WTACRSLinear) for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    assert result.blocks[0].saved < estimate_module(model, "gpt", Hardware(), Workload(BATCH, SEQ)).blocks[0].saved


@pytest.mark.parametrize("keep", [0, -0.5, 1.5, float("nan"), True, "0.3"])
def test_bad_keep_ratio_is_rejected(keep) -> None:
    with pytest.raises(ValueError, match=r"wtacrs_keep_ratio \(--wtacrs\) must be a number in \(0, 1\]"):
        Workload(BATCH, SEQ, wtacrs_keep_ratio=keep)


def test_models_without_block_linear_layers_give_a_clear_error() -> None:
    def no_blocks() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Linear(16, 256))

    with pytest.raises(ValueError, match="no nn.Linear layer was selected for WTA-CRS"):
        estimate(ModelSource("flat", no_blocks), Hardware(), Workload(BATCH, SEQ, wtacrs_keep_ratio=KEEP))


ARGS = ["--model", HAND, "--gpus", "2", "--micro-batch", str(HAND_B), "--seq", str(HAND_S)]


def test_cli_flag_and_json(capsys) -> None:
    assert main(["estimate", *ARGS, "--wtacrs", "0.3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["workload"]["wtacrs_keep_ratio"] == 0.3
    assert data["activations"]["largest_block"]["saved_bytes"] == A + K * (D * 2 + 8 + 4)
    assert main(["estimate", *ARGS, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["workload"]["wtacrs_keep_ratio"] is None
    assert data["activations"]["largest_block"]["saved_bytes"] == X + A
    assert main(["estimate", *ARGS, "--wtacrs", "0.3"]) == 0
    assert "WTA-CRS linear layers keeping 0.3" in capsys.readouterr().out


@pytest.mark.parametrize("keep", ["0", "2"])
def test_cli_bad_keep_ratio(capsys, keep: str) -> None:
    assert main(["estimate", *ARGS, "--wtacrs", keep]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("zerokit estimate: wtacrs_keep_ratio (--wtacrs) must be")
