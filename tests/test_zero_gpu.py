"""The sharding engine on CUDA with NCCL: parity with plain PyTorch, communication overlap that
changes no bit of the result, and bf16 mixed precision close to the fp32 reference."""
from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_world
from tests.test_zero_parity import SCENARIOS, assert_matches_reference, zerokit_runs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
WORLD = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 1
GPU_SCENARIOS = {name: SCENARIOS[name] for name in ("stage1_accum_clip", "stage2", "stage3", "stage3_accum_clip",
                                                     "stage3_tight_prefetch", "stage2_boundary_only")}


def _overlap_on_and_off(rank: int) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    return {
        "overlap": zerokit_runs(rank, GPU_SCENARIOS),
        "serial": zerokit_runs(rank, {n: ({**z, "overlap_comm": False}, a, c) for n, (z, a, c) in GPU_SCENARIOS.items()}),
        "bf16": zerokit_runs(rank, {"stage3": SCENARIOS["stage3"]}, {"bf16": {"enabled": True}}),
    }


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_world(_overlap_on_and_off, WORLD)


@pytest.mark.parametrize("name", list(GPU_SCENARIOS))
def test_cuda_matches_plain_pytorch(results: list[dict], name: str) -> None:
    assert_matches_reference([r["overlap"] for r in results], name, device="cuda", atol=2e-5)


@pytest.mark.parametrize("name", list(GPU_SCENARIOS))
def test_overlap_changes_no_bit(results: list[dict], name: str) -> None:
    for rank_result in results:
        losses, state, _ = rank_result["overlap"][name]
        serial_losses, serial_state, _ = rank_result["serial"][name]
        assert losses == serial_losses
        for key in state:
            assert torch.equal(state[key], serial_state[key]), key


def test_bf16_close_to_fp32(results: list[dict]) -> None:
    fp32 = [sum(v) / WORLD for v in zip(*(r["overlap"]["stage3"][0] for r in results))]
    bf16 = [sum(v) / WORLD for v in zip(*(r["bf16"]["stage3"][0] for r in results))]
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    for r in results:
        state = r["bf16"]["stage3"][1]
        assert state["blocks.0.up.weight"].dtype == torch.float32  # trainable: from the fp32 masters
        assert state["frozen.weight"].dtype == torch.bfloat16  # frozen: kept in compute dtype only
