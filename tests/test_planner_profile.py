"""Profiling one block: times, the allocation trace, saved tensors, and DSA input from it."""
import pytest
import torch

from planner import DsaConfig, ProfileConfig, profile_block, solve_dsa, verify_plan
from tests.models import TinyGptBlock


def profile_tiny(device="cpu"):
    torch.manual_seed(0)
    block = TinyGptBlock().to(device)
    x = torch.randn(2, 16, 32, device=device, requires_grad=True)
    return block, x, profile_block(block, x, ProfileConfig(warmup=1, repeats=3))


def check_trace(profile):
    assert profile.forward_s > 0 and profile.backward_s > 0
    assert 0 < profile.backward_start < len(profile.ops)
    assert any("scaled_dot_product" in op for op in profile.ops[: profile.backward_start])
    allocated, freed = {}, set()
    last_index = -1
    for event in profile.events:
        assert event.op_index >= last_index  # in order
        last_index = event.op_index
        assert event.nbytes > 0
        if event.kind == "alloc":
            assert event.tensor_id not in allocated
            allocated[event.tensor_id] = event
        else:
            assert event.tensor_id in allocated and event.tensor_id not in freed
            assert event.op_index > allocated[event.tensor_id].op_index
            assert event.nbytes == allocated[event.tensor_id].nbytes
            freed.add(event.tensor_id)
    forward_ids = {i for i, e in allocated.items() if e.op_index < profile.backward_start}
    assert profile.saved_ids and profile.saved_ids <= forward_ids
    return allocated


def test_profile_records_times_allocations_and_saved_tensors():
    block, x, profile = profile_tiny()
    allocated = check_trace(profile)
    # the block output is 2*16*32 fp32 values and is produced by the last forward op
    output_id = max(i for i, e in allocated.items() if e.op_index < profile.backward_start)
    assert allocated[output_id].nbytes == 2 * 16 * 32 * 4
    # what survives the forward is exactly what autograd saved, plus the output
    escaping = {int(t.name[1:]) for t in profile.phase_lifetimes("forward").escaping}
    assert escaping == set(profile.saved_ids) | {output_id}
    # the attention inputs (one qkv projection, viewed) and output are among the saved tensors
    saved_sizes = sorted(allocated[i].nbytes for i in profile.saved_ids)
    assert 2 * 16 * 96 * 4 in saved_sizes
    # backward produces one gradient per parameter and one for x, still alive at the end
    gradient_bytes = sorted(t.size for t in profile.phase_lifetimes("backward").escaping)
    expected = sorted([p.numel() * 4 for p in block.parameters()] + [x.numel() * 4])
    assert gradient_bytes == expected


def test_profile_gives_dsa_input_that_solves():
    _, _, profile = profile_tiny()
    lifetimes = profile.lifetimes()
    assert len(lifetimes) == sum(1 for e in profile.events if e.kind == "alloc")
    plan = solve_dsa(lifetimes, DsaConfig(time_limit_s=0.5))
    verify_plan(plan)
    assert plan.peak_bytes >= plan.lower_bound_bytes > 0
    for phase in ("forward", "backward"):
        split = profile.phase_lifetimes(phase)
        verify_plan(solve_dsa(split.transient + split.escaping, DsaConfig(time_limit_s=0.2)))


def test_profile_restores_gradients():
    block = TinyGptBlock()
    marker = torch.full_like(block.qkv.weight, 7.0)
    block.qkv.weight.grad = marker
    profile_block(block, torch.randn(1, 4, 32), ProfileConfig(warmup=0, repeats=1))
    assert block.qkv.weight.grad is marker
    assert block.proj.weight.grad is None


def test_profile_rejects_unusable_inputs():
    block = TinyGptBlock()
    with pytest.raises(ValueError, match="leaf"):
        profile_block(block, torch.randn(1, 4, 32, requires_grad=True) * 2)
    frozen = TinyGptBlock().requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        profile_block(frozen, torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="phase"):
        profile_tiny()[2].phase_lifetimes("sideways")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_on_cuda():
    _, _, profile = profile_tiny("cuda")
    assert profile.device.startswith("cuda")
    check_trace(profile)
    verify_plan(solve_dsa(profile.lifetimes(), DsaConfig(time_limit_s=0.5)))
