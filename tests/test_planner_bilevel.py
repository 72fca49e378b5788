"""Bi-level planning: composition, validity, bounds, and a plan built from a real profile."""
import itertools

import pytest
import torch

from planner import BlockPhase, DsaConfig, TensorLifetime, plan_iteration, profile_block, verify_plan
from tests.models import TinyGptBlock

KIB = 1024
LAYERS = 3


def assert_no_overlap(tensors, offsets, alignment):
    """Pairwise check, independent of verify_plan's sweep."""
    for a, b in itertools.combinations(tensors, 2):
        size_a = -(-a.size // alignment) * alignment
        size_b = -(-b.size // alignment) * alignment
        if a.start < b.end and b.start < a.end and size_a and size_b:
            low_a, low_b = offsets[a.name], offsets[b.name]
            assert low_a + size_a <= low_b or low_b + size_b <= low_a, (a, b)


def forward_tensors():
    return (
        TensorLifetime("norm", 4 * KIB, 0, 2),
        TensorLifetime("qkv", 12 * KIB, 1, 3),
        TensorLifetime("attn", 4 * KIB, 2, 4),
        TensorLifetime("up", 16 * KIB, 4, 6),
        TensorLifetime("act", 16 * KIB, 5, 7),
    )


def backward_tensors():
    return (
        TensorLifetime("grad_act", 16 * KIB, 0, 2),
        TensorLifetime("grad_up", 16 * KIB, 1, 3),
        TensorLifetime("grad_w", 8 * KIB, 2, 5),
        TensorLifetime("grad_attn", 4 * KIB, 3, 6),
        TensorLifetime("grad_qkv", 12 * KIB, 4, 6),
    )


def iteration():
    """embed (step 0), layers forward (1..3), head (4), layers backward (5..7), embed backward (8)."""
    phases = [BlockPhase(f"layer{i}.forward", 1 + i, forward_tensors()) for i in range(LAYERS)]
    phases += [BlockPhase(f"layer{i}.backward", 2 * LAYERS + 1 - i, backward_tensors()) for i in range(LAYERS)]
    phases.append(BlockPhase("head", LAYERS + 1, (TensorLifetime("logits", 64 * KIB, 0, 2),)))
    cross = [TensorLifetime("embedding_out", 8 * KIB, 0, LAYERS + 2)]
    cross += [TensorLifetime(f"layer{i}.saved", 24 * KIB, 1 + i, 2 * LAYERS + 2 - i) for i in range(LAYERS)]
    cross.append(TensorLifetime("grad_embedding", 8 * KIB, 2 * LAYERS + 1, 2 * LAYERS + 3))
    return phases, cross


def test_composed_plan_verifies_and_respects_both_levels():
    phases, cross = iteration()
    result = plan_iteration(phases, cross, DsaConfig(time_limit_s=2))
    verify_plan(result.plan)
    assert_no_overlap(result.plan.tensors, result.plan.offsets, 512)
    assert result.arena_bytes == result.level2.peak_bytes >= result.level2.lower_bound_bytes
    assert result.arena_bytes >= result.plan.lower_bound_bytes
    # identical phases share one level-1 solve
    assert result.level1["layer0.forward"] is result.level1["layer2.forward"]
    for phase in phases:
        base = result.level2.offsets[phase.name]
        block = result.level1[phase.name].peak_bytes
        for tensor in phase.tensors:
            offset = result.offset(tensor.name, phase=phase.name)
            assert offset == base + result.level1[phase.name].offsets[tensor.name]
            assert base <= offset and offset + tensor.size <= base + block
    for tensor in cross:
        assert result.offset(tensor.name) == result.level2.offsets[tensor.name]
    # every tensor of the iteration is in the composed plan
    assert len(result.plan.tensors) == sum(len(p.tensors) for p in phases) + len(cross)


def test_level2_lower_bound_is_what_it_claims():
    phases, cross = iteration()
    result = plan_iteration(phases, cross, DsaConfig(time_limit_s=2))
    layer_forward = result.level1["layer0.forward"].peak_bytes
    # at step 3 the last forward block runs beside the embedding output and all saved tensors
    live_at_step3 = layer_forward + 8 * KIB + LAYERS * 24 * KIB
    assert result.level2.lower_bound_bytes >= live_at_step3
    assert result.arena_bytes >= live_at_step3


def test_phase_steps_and_names_must_not_clash():
    tensors = (TensorLifetime("x", 512, 0, 1),)
    with pytest.raises(ValueError, match="step 1"):
        plan_iteration([BlockPhase("a", 1, tensors), BlockPhase("b", 1, tensors)])
    with pytest.raises(ValueError, match="used twice"):
        plan_iteration([BlockPhase("a", 1, tensors)], [TensorLifetime("a", 512, 0, 2)])
    with pytest.raises(ValueError, match="clash"):
        plan_iteration([BlockPhase("a", 1, tensors)], [TensorLifetime("a/x", 512, 0, 2)])
    with pytest.raises(ValueError, match="alignment"):
        plan_iteration([BlockPhase("a", 1, tensors)], level1_config=DsaConfig(alignment=256))


def test_plan_from_a_profiled_block():
    torch.manual_seed(0)
    profile = profile_block(TinyGptBlock(), torch.randn(2, 16, 32, requires_grad=True))
    forward, backward = profile.phase_lifetimes("forward"), profile.phase_lifetimes("backward")
    phases = [BlockPhase(f"layer{i}.forward", i, forward.transient) for i in range(LAYERS)]
    phases += [BlockPhase(f"layer{i}.backward", 2 * LAYERS - 1 - i, backward.transient) for i in range(LAYERS)]
    # what escapes a layer's forward lives until its backward step ends
    cross = [
        TensorLifetime(f"layer{i}.{t.name}", t.size, i, 2 * LAYERS - i) for i in range(LAYERS) for t in forward.escaping
    ]
    result = plan_iteration(phases, cross, DsaConfig(time_limit_s=0.5))
    verify_plan(result.plan)
    escaping_bytes = sum(-(-t.size // 512) * 512 for t in forward.escaping)
    assert result.arena_bytes >= LAYERS * escaping_bytes
    assert result.arena_bytes >= result.level2.lower_bound_bytes
