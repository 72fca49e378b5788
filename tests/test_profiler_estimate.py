"""`zerokit estimate` figures for a model small enough to do by hand, category by category.

The model: an embedding (V x D), L blocks x -> x + down(relu(up(x))) with up: D -> F and
down: F -> D (no biases), and an untied head D -> V; bf16, micro-batch B x S tokens, 2 GPUs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zerokit.config import Config
from zerokit.profiler.activations import block_activations, gpu_timeline
from zerokit.profiler.estimate import GPU_RUNTIME_BYTES, HOST_RUNTIME_BYTES, Hardware, Workload, estimate
from zerokit.profiler.models import build_on_meta, resolve_model
from zerokit.profiler.trace import trace_step
from zerokit.zero.memory import model_state_bytes
from zerokit.zero.policy import OffloadPolicy, ShardingPolicy
from zerokit.zero.units import plan_units

V, D, FF, L = 256, 128, 512, 4
B, S = 2, 16
GPUS = 2
GiB = 2**30


class HandBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, FF, bias=False)
        self.down = nn.Linear(FF, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class HandModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(HandBlock() for _ in range(L))
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(x).flatten(0, 1).float(), targets.flatten())


def hand_model() -> nn.Module:
    return HandModel()


# -- the arithmetic ------------------------------------------------------------------------------
BF16, FP32 = 2, 4
BLOCK = 2 * D * FF  # 131072 elements: above the stage-3 persistence threshold (1e5), so sharded
ROOT = V * D + D * V  # 65536 elements: below it, so kept gathered under stage 3
P = L * BLOCK + ROOT  # 589824; every size is a multiple of 2 * 16, so no alignment padding
# Each unit holds two parameters of equal size: with 2 shards each rank owns exactly one of them,
# one optimizer "piece" per unit and rank (one fp32 step count each).
PIECES = {1: 2 * (L + 1), 2: L + 1}
STATES = {  # (parameters, master weights, gradient shards, optimizer states) per rank
    0: (P * BF16, P * FP32, P * FP32, 2 * FP32 * P + 4 * PIECES[1]),
    1: (P * BF16, P * FP32 // 2, P * FP32 // 2, 2 * FP32 * P // 2 + 4 * PIECES[2]),
    2: (P * BF16, P * FP32 // 2, P * FP32 // 2, 2 * FP32 * P // 2 + 4 * PIECES[2]),
    3: (ROOT * BF16, P * FP32 // 2, P * FP32 // 2, 2 * FP32 * P // 2 + 4 * PIECES[2]),
}
# Stage 3 gathers the block in use and one prefetched, and casts one shard as the gather source.
GATHERED = 2 * BLOCK * BF16 + BLOCK // 2 * BF16
BLOCK_FLAT = BLOCK * FP32  # one reduce-scatter's fp32 flat buffer
# Per block, autograd saves x (up's input) and relu's output a, which down saves again (once).
X, A = B * S * D * BF16, B * S * FF * BF16


@pytest.fixture(scope="module")
def result():
    hardware = Hardware(gpus_per_node=GPUS, gpu_memory=80 * 10**9, host_memory=512 * 10**9, nvme=10**12)
    return estimate("tests.test_profiler_estimate:hand_model", hardware, Workload(B, S, torch.bfloat16))


def test_model_description(result) -> None:
    assert (result.parameters, result.trainable_parameters, result.units, len(result.blocks)) == (P, P, L + 1, L)


def test_block_activations(result) -> None:
    for block in result.blocks:
        assert block.saved == X + A  # a saved twice counts once
        assert block.private == A  # x comes from before the block: recompute keeps it
        assert block.swappable == X + A  # saved by this block alone
        assert (block.attention, block.inputs, block.inputs_saved) == (0, X, True)
        assert block.other == A


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_states_per_stage_without_offload(result, stage: int) -> None:
    parameters, master, gradients, optimizer = STATES[stage]
    config = result.find(stage, "none", "none")
    assert config.gpu["parameters"] == parameters
    assert config.gpu["master_weights"] == master
    assert config.gpu["optimizer_states"] == optimizer
    assert config.gpu["gradients"] <= gradients + P * BF16  # shards so far + bf16 ones awaiting reduction
    assert config.gpu["runtime"] == GPU_RUNTIME_BYTES
    allocated = sum(v for k, v in config.gpu.items() if k not in ("allocator_overhead", "runtime"))
    assert config.peak_allocated == allocated
    assert config.gpu["allocator_overhead"] == int(0.10 * allocated)
    in_flight = config.gpu["communication"] - (GATHERED if stage == 3 else 0)
    assert in_flight in ((0,) if stage == 0 else (0, BLOCK_FLAT, 2 * BLOCK_FLAT, BLOCK_FLAT + ROOT * FP32))
    assert config.host == {"parameters": 0, "master_weights": 0, "gradients": 0, "optimizer_states": 0,
                           "activations": 0, "staging": 0, "runtime": HOST_RUNTIME_BYTES}  # fmt: skip


def test_gradients_are_all_there_at_the_end_of_backward(result) -> None:
    # with no activations to hold, the peak of stage 0 comes when every fp32 gradient exists
    config = result.find(0, "none", "recompute")
    assert config.gpu["gradients"] >= STATES[0][2]


def test_offload_placements(result) -> None:
    # Offloaded figures are the engine's own plan (zero/memory.py): moments over each whole shard
    # (no fp32 step counters: offloaded steps are counted on the host), staging by the engine's
    # default buffers: 4 upload buffers of one tile (at most the largest shard) in compute dtype,
    # 2 NVMe buffers of a tile's master and moments, 5 + 1 parameter shards read from NVMe.
    _, master, gradients, optimizer = STATES[2]
    moments = optimizer - 4 * PIECES[2]
    shard = BLOCK // 2  # the largest shard, a block's
    uploads = 4 * shard * BF16
    cpu = result.find(2, "cpu_optimizer", "none")
    assert (cpu.gpu["master_weights"], cpu.gpu["optimizer_states"]) == (0, 0)
    assert cpu.gpu["gradients"] <= P * BF16  # only bf16 gradients awaiting reduction
    on_host = (cpu.host["master_weights"], cpu.host["optimizer_states"], cpu.host["gradients"])
    assert on_host == (master, moments, gradients)
    assert cpu.host["staging"] == uploads

    params = result.find(3, "cpu_optimizer_params", "none")
    assert params.gpu["parameters"] == ROOT * BF16  # the kept-gathered root only
    assert params.host["parameters"] == L * BLOCK // 2 * BF16  # this rank's shard of every block
    assert params.host["staging"] == uploads

    nvme = result.find(3, "nvme", "none")
    assert nvme.nvme == {"parameters": L * BLOCK // 2 * BF16, "master_weights": master, "optimizer_states": moments}
    assert nvme.host["gradients"] == gradients and nvme.host["optimizer_states"] == 0
    tile = 3 * shard * FP32  # master and two moments
    assert nvme.host["staging"] == uploads + 2 * tile + (5 + 1) * shard * BF16

    # the optimizer alone on NVMe: parameters stay on the GPU (stage 2 keeps them whole), fp32
    # gradient shards in pinned host memory, masters and moments in the swap file (every shard is
    # a multiple of 4 KiB in fp32: no extent padding), staged through uploads and two NVMe tiles
    disk = result.find(2, "nvme_optimizer", "none")
    assert (disk.gpu["parameters"], disk.gpu["master_weights"], disk.gpu["optimizer_states"]) == (P * BF16, 0, 0)
    assert disk.gpu["gradients"] <= P * BF16
    assert disk.nvme == {"parameters": 0, "master_weights": master, "optimizer_states": moments}
    on_host = (disk.host["parameters"], disk.host["master_weights"], disk.host["optimizer_states"])
    assert on_host == (0, 0, 0) and disk.host["gradients"] == gradients
    assert disk.host["staging"] == uploads + 2 * tile
    # the same GPU side as the optimizer in host memory, at a higher relative cost
    assert (disk.gpu, disk.peak_allocated) == (cpu.gpu, cpu.peak_allocated)
    costs = [result.find(3, offload, "none").relative_cost
             for offload in ("cpu_optimizer", "cpu_optimizer_params", "nvme_optimizer", "nvme")]  # fmt: skip
    assert costs == sorted(costs) and len(set(costs)) == 4  # the disk is slower than host memory


def test_partial_optimizer_offload() -> None:
    # offload_ratio 0.5 of 589824 elements: blocks 3 and 2 (262144) come closer to the target than
    # blocks 3 to 1 (393216); the root and blocks 0-1, used first in forward, keep theirs on the GPU
    hardware = Hardware(gpus_per_node=GPUS, gpu_memory=80 * 10**9, host_memory=512 * 10**9, nvme=10**12)
    half = estimate("tests.test_profiler_estimate:hand_model", hardware, Workload(B, S, offload_ratio=0.5))
    device, offloaded = ROOT + 2 * BLOCK, 2 * BLOCK
    row, whole = half.find(2, "cpu_optimizer", "recompute"), half.find(2, "none", "recompute")
    assert row.gpu["master_weights"] == device * FP32 // 2
    assert row.gpu["optimizer_states"] == 2 * FP32 * device // 2 + 4 * 3  # root and two blocks: 3 pieces per rank
    on_host = (row.host["master_weights"], row.host["gradients"], row.host["optimizer_states"])
    assert on_host == (offloaded * FP32 // 2, offloaded * FP32 // 2, 2 * FP32 * offloaded // 2)
    # the offloaded units' fp32 gradient shards land in host memory, the others' stay on the GPU
    assert row.gpu["gradients"] == whole.gpu["gradients"] - offloaded * FP32 // 2
    assert half.to_json()["workload"]["offload_ratio"] == 0.5
    with pytest.raises(ValueError, match="offload_ratio"):
        Workload(B, S, offload_ratio=0)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_on_nvme_is_the_engines_plan(result, stage: int, tmp_path) -> None:
    # the wiring: the estimator places what the engine plans for this config (arithmetic: test_offload_placements)
    # the zero_optimization section of benchmarks/offload_step.py's zerokit-offload-nvme, at each stage
    zero = Config.load({"zero_optimization": {"stage": stage, "offload_optimizer": {
        "device": "nvme", "nvme_path": str(tmp_path)}}}).zero_optimization  # fmt: skip
    model = build_on_meta(resolve_model("tests.test_profiler_estimate:hand_model"), torch.bfloat16)
    plan = model_state_bytes(plan_units(model), ShardingPolicy.from_config(zero), torch.bfloat16, GPUS,
                             offload=OffloadPolicy.from_config(zero))  # fmt: skip
    row = result.find(stage, "nvme_optimizer", "none")
    assert row.nvme == plan.offload.nvme
    assert row.host == {**plan.offload.host, "activations": 0, "runtime": HOST_RUNTIME_BYTES}
    # stage 3 keeps each sharded unit's bf16 shard on the GPU, the source of its all-gathers
    parameters = STATES[stage][0] if stage < 3 else ROOT * BF16 + L * BLOCK // 2 * BF16
    on_gpu = (row.gpu["parameters"], row.gpu["master_weights"], row.gpu["optimizer_states"])
    assert on_gpu == (plan.parameters, plan.master_weights, plan.optimizer_states) == (parameters, 0, 0)


def test_optimizer_on_nvme_with_parameters_in_host_memory_is_the_engines_plan(result, tmp_path) -> None:
    # the wiring: the estimator places what the engine plans for this config (arithmetic: test_offload_placements)
    # benchmarks/offload_step.py's zerokit-offload-nvme-cpu-params
    zero = Config.load({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": str(
        tmp_path)}, "offload_param": {"device": "cpu"}}}).zero_optimization  # fmt: skip
    model = build_on_meta(resolve_model("tests.test_profiler_estimate:hand_model"), torch.bfloat16)
    plan = model_state_bytes(plan_units(model), ShardingPolicy.from_config(zero), torch.bfloat16, GPUS,
                             offload=OffloadPolicy.from_config(zero))  # fmt: skip
    row = result.find(3, "nvme_optimizer_cpu_params", "none")
    assert row.nvme == plan.offload.nvme and row.nvme["parameters"] == 0 and row.nvme["master_weights"] > 0
    assert row.host == {**plan.offload.host, "activations": 0, "runtime": HOST_RUNTIME_BYTES}
    assert row.host["parameters"] > 0
    assert row.gpu["master_weights"] == row.gpu["optimizer_states"] == 0


def test_unsupported_combinations(result) -> None:
    assert not result.find(0, "cpu_optimizer", "none").supported
    assert not result.find(0, "nvme_optimizer", "memo").supported
    for stage in (0, 1, 2):
        assert not result.find(stage, "cpu_optimizer_params", "none").supported
        assert not result.find(stage, "nvme", "recompute").supported
        assert not result.find(stage, "nvme_optimizer_cpu_params", "none").supported
    for stage in (1, 2, 3):
        assert result.find(stage, "nvme_optimizer", "none").supported
    assert len(result.configurations) == 4 * 6 * 4


def test_activation_policies_on_host(result) -> None:
    swapped = L - 2  # the last two blocks keep their activations
    assert result.find(1, "none", "swap").host["activations"] == swapped * (X + A)
    memo = result.find(1, "none", "memo")
    assert memo.memo_alpha == 1.0  # host memory is plentiful: every token of the others swapped
    assert memo.host["activations"] == swapped * (X + 0 + 1.0 * A)  # input + attention + alpha * other
    assert result.find(1, "none", "recompute").host["activations"] == 0


def test_activation_policies_on_gpu() -> None:
    model = build_on_meta(resolve_model("tests.test_profiler_estimate:hand_model"), torch.bfloat16)
    trace = trace_step(model, plan_units(model), B, S)
    blocks = block_activations(trace)
    none, recompute, swap, memo = (gpu_timeline(trace, blocks, p) for p in ("none", "recompute", "swap", "memo"))
    # between the last block's forward and the first block's backward (the loss):
    loss = (trace.blocks[-1].forward_end + trace.blocks[-1].backward_start) // 2
    assert recompute[loss] == none[loss] - L * A  # every block's a dropped, x kept as the checkpoint's input
    assert swap[loss] == none[loss] - (L - 2) * (X + A)  # all but the last two on the host
    assert memo[loss] == swap[loss]
    # the two restore buffers of one block each are reserved when the blocks' backward starts
    last = trace.blocks[-1].backward_start
    assert (swap[last] - none[last]) - (swap[last - 1] - none[last - 1]) == 2 * (X + A)
    # recomputing block 0 in its backward brings its activations back, plus the forward's transient
    start = trace.blocks[0].backward_start
    assert recompute[start] == none[start] + blocks[0].recompute_transient


def test_recommendation_is_the_cheapest_that_fits() -> None:
    small = Hardware(gpus_per_node=GPUS, gpu_memory=GPU_RUNTIME_BYTES + 9 * 2**20, host_memory=10**12)
    result = estimate("tests.test_profiler_estimate:hand_model", small, Workload(B, S, torch.bfloat16))
    best = result.recommended
    assert best is not None and best.fits
    assert not result.find(0, "none", "none").fits_gpu  # 18 bytes per parameter and more
    for config in result.configurations:
        if config.relative_cost < best.relative_cost:
            assert not config.fits, config.label
        if config.fits and config.relative_cost == best.relative_cost:
            assert sum(config.gpu.values()) >= sum(best.gpu.values())


def test_nothing_fits_gives_no_recommendation() -> None:
    tiny = Hardware(gpus_per_node=GPUS, gpu_memory=2**20, host_memory=10**12)
    result = estimate("tests.test_profiler_estimate:hand_model", tiny, Workload(B, S, torch.bfloat16))
    assert result.recommended is None and not any(c.fits for c in result.configurations)


def test_bad_hardware_and_workload_are_rejected() -> None:
    with pytest.raises(ValueError, match="gpus_per_node"):
        Hardware(gpus_per_node=0)
    with pytest.raises(ValueError, match="micro_batch"):
        Workload(0, 16)
    with pytest.raises(ValueError, match="attention"):
        Workload(1, 16, attention="tpu")
