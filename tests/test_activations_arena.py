"""Restore buffers: blocks restore into the two preallocated buffers at planned offsets, each
prefetched while the block after it runs backward (or into one, without prefetching); plans are
cached on disk."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import zerokit.activations.arena as arena_module
from planner import TensorLifetime, verify_plan
from tests.test_activations_parity import assert_same, batches, gpt, train
from zerokit.activations import apply_activation_memory
from zerokit.activations.arena import ALIGNMENT, RestoreArena


def _train_every_block_swapped(policy: str, restore_buffers: int):
    """Three iterations of the example GPT with every block under `policy`, checked against the
    plain run: the manager, the iterations that restored (memo learns in the first) and the
    buffers' size while the first block's weight gradient is computed (the blocks' backward)."""
    torch.manual_seed(0)
    model, loss_fn = gpt()
    inputs = batches(3)
    expected = train(copy.deepcopy(model), loss_fn, inputs)
    config = {"policy": policy, "alpha": 0.5, "keep_last": 0, "restore_buffers": restore_buffers}
    manager = apply_activation_memory(model, config)
    during_backward = []
    first_weight = next(model.blocks[0].parameters())
    first_weight.register_hook(lambda grad: during_backward.append(manager.restore_buffer_bytes()))
    assert_same(expected, train(model, loss_fn, inputs))
    return manager, 3 if policy == "swap" else 2, during_backward[-1]


@pytest.mark.parametrize("policy", ["swap", "memo"])
def test_restores_are_prefetched_into_the_buffers(policy):
    manager, iterations, buffer_bytes = _train_every_block_swapped(policy, 2)
    counts = manager.restore_counts
    # the last block restores when its backward starts; each earlier one during the next one's
    assert counts["on_demand"] == iterations and counts["prefetched"] == 3 * iterations
    assert counts["restore_buffer"] == 4 * iterations and counts["allocator"] == 0
    plans = {}
    for record_plan in manager.arena._plans.values():
        verify_plan(record_plan)
        plans[record_plan.peak_bytes] = record_plan
    assert buffer_bytes == 2 * max(plans)
    assert manager.restore_buffer_bytes() == 0  # let go after the backward, for the next forward


@pytest.mark.parametrize("policy", ["swap", "memo"])
def test_one_restore_buffer_restores_each_block_after_the_next_ones_backward(policy):
    manager, iterations, buffer_bytes = _train_every_block_swapped(policy, 1)
    # nothing is prefetched: each block restores into the one buffer when its backward starts
    assert manager.restore_counts == {"on_demand": 4 * iterations, "restore_buffer": 4 * iterations}
    assert buffer_bytes == max(plan.peak_bytes for plan in manager.arena._plans.values())


def test_kept_last_blocks_prefetch_the_first_swapped_one():
    torch.manual_seed(0)
    model, loss_fn = gpt()
    manager = apply_activation_memory(model, {"policy": "swap"})  # blocks 2 and 3 kept
    train(model, loss_fn, batches(2))
    assert manager.restore_counts == {"prefetched": 4, "restore_buffer": 4}


def test_busy_buffer_falls_back_to_the_allocator():
    """Two graphs alive at once: the second backward cannot know when the first one's blocks
    are done with their buffers, so it restores into fresh memory, correctly."""
    torch.manual_seed(0)
    model, loss_fn = gpt()
    first, second = batches(2)
    reference = copy.deepcopy(model)
    (loss_fn(reference, first) + loss_fn(reference, second)).backward()
    manager = apply_activation_memory(model, {"policy": "swap", "keep_last": 0})
    loss_a, loss_b = loss_fn(model, first), loss_fn(model, second)
    loss_a.backward()
    loss_b.backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6)
    assert manager.restore_counts["allocator"] > 0


def test_plans_are_cached_on_disk(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, loss_fn = gpt()
    inputs = batches(2)
    first = copy.deepcopy(model)
    apply_activation_memory(first, {"policy": "swap", "plan_cache": str(tmp_path)})
    expected = train(first, loss_fn, inputs)
    files = sorted(tmp_path.glob("*.json"))
    assert files and all(json.loads(f.read_text())["kind"] == "offset_plan" for f in files)

    def no_solving(*args, **kwargs):
        raise AssertionError("the cached plan should have been used")

    monkeypatch.setattr(arena_module, "solve_dsa", no_solving)
    second = copy.deepcopy(model)
    apply_activation_memory(second, {"policy": "swap", "plan_cache": str(tmp_path)})
    assert_same(expected, train(second, loss_fn, inputs))
    assert sorted(tmp_path.glob("*.json")) == files


def test_arena_places_tensors_at_planned_offsets():
    arena = RestoreArena(torch.device("cpu"), torch.nn.Linear(2, 2), cache=None)
    lifetimes = [TensorLifetime("a", 1000, 0, 3), TensorLifetime("b", 600, 0, 2), TensorLifetime("c", 24, 2, 3)]
    plan = arena.plan(lifetimes, (2, 16, 32), torch.float32)
    verify_plan(plan)
    assert plan.offsets["c"] == plan.offsets["b"]  # b is dead when c is written
    assert arena.plan(lifetimes, (2, 16, 32), torch.float32) is plan
    arena.reserve([plan.peak_bytes, 0])
    owner, other = object(), object()
    assert arena.claim(0, owner, plan.peak_bytes) and not arena.claim(0, other, plan.peak_bytes)
    assert not arena.claim(1, other, 1)  # no buffer reserved
    a = arena.tensor(0, plan.offsets["a"], (5, 50), (50, 1), torch.float32)
    b = arena.tensor(0, plan.offsets["b"], (10, 15), (1, 10), torch.float32)
    buffer = arena.buffers[0]
    for tensor, name in ((a, "a"), (b, "b")):
        assert tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert tensor.storage_offset() * 4 == plan.offsets[name] and plan.offsets[name] % ALIGNMENT == 0
    arena.release(owner)
    assert arena.claim(0, other, plan.peak_bytes)
