"""Offload on CUDA: parity with plain PyTorch, host-device copies on their own streams that change
no bit of the result (against the same run with overlap off), pinned host buffers, and device
memory without the offloaded states."""
from __future__ import annotations

import pytest
import torch

import zerokit
from tests.models import AwkwardLM, batches, lm_loss
from tests.multiprocess import run_world
from tests.test_zero_parity import BATCH, LR, STEPS, reference_run, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
WORLD = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 1
ACCUMULATION, CLIPPING = 2, 0.5
STAGE3 = {"stage": 3, "stage3_param_persistence_threshold": 0}


def scenarios(nvme: str) -> dict[str, dict]:
    return {
        "optimizer_cpu_stage2": {"stage": 2, "offload_optimizer": {"device": "cpu", "tile_size": 64}},
        "optimizer_nvme_stage1": {"stage": 1, "offload_optimizer": {"device": "nvme", "nvme_path": nvme}},
        "params_cpu_stage3": {**STAGE3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
        "params_nvme_stage3": {**STAGE3, "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "tile_size": 64},
                               "offload_param": {"device": "nvme", "nvme_path": nvme, "max_in_cpu": 0}},
        # partial offload: the first units step on the GPU while the CPU steps the last ones
        "ratio05_stage2": {"stage": 2, "offload_optimizer": {"device": "cpu", "tile_size": 64, "ratio": 0.5}},
        "ratio05_params_cpu_stage3": {**STAGE3, "offload_optimizer": {"device": "cpu", "ratio": 0.5},
                                      "offload_param": {"device": "cpu"}},
    }  # fmt: skip


def _engine(zero: dict, extra: dict | None = None) -> zerokit.Engine:
    torch.manual_seed(0)
    model = AwkwardLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    return zerokit.initialize(model, optimizer, {
        "train_micro_batch_size_per_gpu": BATCH // WORLD, "gradient_accumulation_steps": ACCUMULATION,
        "gradient_clipping": CLIPPING, "zero_optimization": zero, **(extra or {}),
    })  # fmt: skip


def _runs(rank: int, nvme: str) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {}
    for name, zero in scenarios(nvme).items():
        engine = _engine(zero)
        pinned = engine._offloaded_groups[0].host_grads.buffer.is_pinned()
        results[name] = {"overlap": train(engine, rank, WORLD, ACCUMULATION), "pinned": pinned}
        engine.close()
        results[name]["serial"] = train(_engine({**zero, "overlap_comm": False}), rank, WORLD, ACCUMULATION)
    results["bf16"] = train(_engine(scenarios(nvme)["optimizer_cpu_stage2"], {"bf16": {"enabled": True}}),
                            rank, WORLD, ACCUMULATION)  # fmt: skip
    # overflowing fp16 steps first: one overflow check over gradients on the GPU and in host memory
    fp16 = {"fp16": {"enabled": True, "initial_scale_power": 20, "loss_scale_window": 2}}  # 6 of 10 skipped
    results["fp16"] = {name: train(_engine(zero, fp16), rank, WORLD, ACCUMULATION)
                       for name, zero in (("none", {"stage": 2}), ("ratio05", scenarios(nvme)["ratio05_stage2"]))}
    offloaded = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    results["memory"] = {"none": _peak({"stage": 2}), "offloaded": _peak(offloaded)}
    return results


def _peak(zero: dict) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = _engine(zero)
    for tokens, targets in batches(2 * ACCUMULATION, BATCH):
        engine.backward(lm_loss(engine(tokens[: BATCH // WORLD].cuda()), targets[: BATCH // WORLD].cuda()))
        engine.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return run_world(_runs, WORLD, str(tmp_path_factory.mktemp("nvme")))


@pytest.mark.parametrize("name", list(scenarios("")))
def test_cuda_offload_matches_plain_pytorch(results: list[dict], name: str) -> None:
    ref_losses, ref_state = reference_run(ACCUMULATION, CLIPPING, device="cuda")
    mean = [sum(v) / WORLD for v in zip(*(r[name]["overlap"][0] for r in results))]
    assert mean == pytest.approx(ref_losses, abs=2e-5)
    for rank_result in results:
        losses, state, steps = rank_result[name]["overlap"]
        assert steps == STEPS
        for key, expected in ref_state.items():
            torch.testing.assert_close(state[key], expected, rtol=0, atol=3e-5, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", list(scenarios("")))
def test_copy_streams_change_no_bit(results: list[dict], name: str) -> None:
    for rank_result in results:
        assert rank_result[name]["pinned"]
        (losses, state, _), (serial_losses, serial_state, _) = rank_result[name]["overlap"], rank_result[name]["serial"]
        assert losses == serial_losses
        for key in state:
            assert torch.equal(state[key], serial_state[key]), key


def test_bf16_close_to_fp32(results: list[dict]) -> None:
    fp32 = [sum(v) / WORLD for v in zip(*(r["optimizer_cpu_stage2"]["overlap"][0] for r in results))]
    bf16 = [sum(v) / WORLD for v in zip(*(r["bf16"][0] for r in results))]
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_fp16_partial_offload_close_to_the_device_alone(results: list[dict]) -> None:
    for rank_result in results:
        none, partial = rank_result["fp16"]["none"], rank_result["fp16"]["ratio05"]
        assert partial[0] == pytest.approx(none[0], abs=1e-3)


def test_offload_frees_device_memory(results: list[dict]) -> None:
    for rank_result in results:
        memory = rank_result["memory"]
        assert memory["offloaded"] < memory["none"]
