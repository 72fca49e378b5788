"""`zerokit plan`: the MEMO plan of a small model, printed and saved."""
from __future__ import annotations

import json

import pytest

from planner import IterationPlan, verify_plan
from tests.test_profiler_estimate import FF, D
from zerokit.cli import main

HAND = "tests.test_profiler_estimate:hand_model"  # 4 blocks x -> x + down(relu(up(x)))
B, S = 2, 16


def _plan(capsys, tmp_path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "plan.json"
    code = main(["plan", "--seq", str(S), "--micro-batch", str(B), "--time-limit", "2", "--out", str(out), *args])
    printed = capsys.readouterr().out
    assert code == 0
    return printed, json.loads(out.read_text())


def test_plan_of_a_small_model(capsys, tmp_path) -> None:
    bandwidth, host = 10**9, 10 * 2**20
    printed, data = _plan(capsys, tmp_path, "--model", HAND, "--bandwidth", "1GB", "--host-memory", "10MiB")
    assert data["schema"] == "zerokit.plan/1" and data["blocks"] == 4 and data["device"] == "cpu"
    block = data["block"]
    # the block saves relu's output (its input x was made before the block ran, and is counted apart)
    assert block["saved_bytes"] == B * S * FF * 2 and block["other_bytes"] == B * S * FF * 2
    assert block["input_bytes"] == B * S * D * 2 and block["attention_bytes"] == 0
    # MEMO's closed form, with this machine's measured forward time of one block
    mandatory = block["input_bytes"] + block["attention_bytes"]
    by_link = (bandwidth * block["forward_s"] - mandatory) / block["other_bytes"]
    by_memory = (host / (4 - 2) - mandatory) / block["other_bytes"]
    assert data["alpha"]["value"] == pytest.approx(min(max(min(by_link, by_memory), 0.0), 1.0))
    assert data["alpha"]["bandwidth_source"] == "given" and data["alpha"]["given"] is False

    plan = IterationPlan.from_dict(data["iteration_plan"])
    verify_plan(plan.plan)
    assert data["plan"]["arena_bytes"] == plan.arena_bytes >= max(data["plan"]["phase_peak_bytes"].values())
    assert plan.arena_bytes >= plan.plan.lower_bound_bytes > 0
    for line in ("MEMO plan for " + HAND, "alpha = ", "arena", "level 1, one block's forward", "level 2", "saved:"):
        assert line in printed


def test_given_alpha_and_a_transformer(capsys, tmp_path) -> None:
    printed, data = _plan(capsys, tmp_path, "--model", "llama-tiny", "--alpha", "0.25", "--dtype", "fp32")
    assert "alpha = 0.250 (given)" in printed
    assert data["alpha"]["value"] == 0.25 and data["alpha"]["given"] is True
    assert data["block"]["attention_bytes"] > 0  # output and log-sum-exp of the attention kernel
    assert data["dtype"] == "float32"


def test_bad_requests(capsys) -> None:
    assert main(["plan", "--model", "llama-1t", "--seq", "8", "--micro-batch", "1"]) == 2
    assert "not a preset" in capsys.readouterr().err
    assert main(["plan", "--model", HAND, "--seq", "8", "--micro-batch", "1", "--alpha", "2"]) == 2
    assert "alpha must be in [0, 1]" in capsys.readouterr().err
