"""memo's bookkeeping: the layout it learns, where each block's saved bytes go under each policy
(against an independent count of what autograd saves), alpha from the planner, and errors."""
from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from planner import SwapInputs, swap_fraction
from tests.test_activations_parity import BATCH, SEQ, assert_same, batches, gpt, gpt2, llama, train
from zerokit.activations import ActivationMemoryConfig, apply_activation_memory
from zerokit.activations.alpha import swapped_tokens
from zerokit.activations.layout import SlotKind
from zerokit.activations.tensors import TokenLayout, nbytes, storage_ptr, view_key

DIM, HEADS = 32, 2  # the GPT of test_activations_parity


def saved_bytes_of_first_block(model, loss_fn, tokens) -> int:
    """Bytes of the distinct non-parameter tensors the first block saves, counted by a plain
    saved-tensor hook (the reference for what the policies move)."""
    block = model.blocks[0]
    parameters = {storage_ptr(p) for p in model.parameters()}
    seen: dict[tuple, torch.Tensor] = {}

    def pack(tensor):
        if storage_ptr(tensor) not in parameters:
            seen.setdefault(view_key(tensor), tensor)
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    handles = [block.register_forward_pre_hook(lambda *_: hooks.__enter__()),
               block.register_forward_hook(lambda *_: hooks.__exit__(None, None, None))]
    loss_fn(model, tokens)
    for handle in handles:
        handle.remove()
    return sum(nbytes(t) for t in seen.values())


def first_report(policy: dict):
    torch.manual_seed(0)
    model, loss_fn = gpt()
    manager = apply_activation_memory(model, policy)
    tokens = batches(1)[0]
    loss_fn(model, tokens).backward()  # memo learns its layout here
    loss_fn(model, tokens)
    return manager.reports()[0]


def test_swap_and_recompute_move_every_saved_byte():
    torch.manual_seed(0)
    model, loss_fn = gpt()
    total = saved_bytes_of_first_block(model, loss_fn, batches(1)[0])
    hidden = BATCH * SEQ * DIM * 4
    swap = first_report({"policy": "swap"})
    assert (swap.host_bytes, swap.kept_bytes, swap.dropped_bytes) == (total, 0, 0)
    assert swap.parameter_bytes > 0
    recompute = first_report({"policy": "recompute"})
    assert (recompute.kept_bytes, recompute.dropped_bytes, recompute.host_bytes) == (hidden, total - hidden, 0)


def test_memo_moves_the_planned_bytes():
    hidden = BATCH * SEQ * DIM * 4
    attention = BATCH * HEADS * SEQ * (DIM // HEADS) * 4
    logsumexp = BATCH * HEADS * SEQ * 4  # the only other tensor attention saves besides q, k, v
    reports = {alpha: first_report({"policy": "memo", "alpha": alpha}) for alpha in (0.0, 0.25, 0.5, 1.0)}
    none_swapped = reports[0.0]
    assert none_swapped.host_bytes == hidden + attention + logsumexp
    token_bytes = none_swapped.dropped_bytes
    for alpha, report in reports.items():
        swapped = swapped_tokens(alpha, SEQ)
        assert report.kept_bytes == 0  # nothing of the block's own stays on the device
        assert (report.swapped_tokens, report.tokens) == (swapped, SEQ)
        assert report.dropped_bytes == token_bytes * (SEQ - swapped) // SEQ
        assert report.host_bytes + report.dropped_bytes == hidden + attention + logsumexp + token_bytes
    assert reports[1.0].host_bytes <= first_report({"policy": "swap"}).host_bytes


@pytest.mark.parametrize(
    "policy, input_freed, activation_freed",
    [("none", False, False), ("recompute", False, True), ("swap", True, True), ("memo", True, True)],
)
def test_moved_activations_are_freed(policy, input_freed, activation_freed):
    """After the forward, nothing references the first block's input (unless recompute keeps
    it) or its MLP activation (unless kept)."""
    torch.manual_seed(0)
    model, loss_fn = gpt()
    apply_activation_memory(model, {"policy": policy, "alpha": 0.5})
    tokens = batches(1)[0]
    loss_fn(model, tokens).backward()
    block_input, activation = [], []
    handles = [
        model.blocks[0].register_forward_pre_hook(lambda m, args: block_input.append(weakref.ref(args[0]))),
        model.blocks[0].up.register_forward_hook(lambda m, i, out: activation.append(weakref.ref(out))),
    ]
    loss = loss_fn(model, tokens)
    for handle in handles:
        handle.remove()
    assert (block_input[0]() is None, activation[0]() is None) == (input_freed, activation_freed)
    loss.backward()


def test_calibrating_iteration_keeps_no_block_input():
    """memo's first iteration recomputes its blocks to learn them, but from inputs in host memory
    (full recomputation would keep every block's input on the device)."""
    torch.manual_seed(0)
    model, loss_fn = gpt()
    manager = apply_activation_memory(model, {"policy": "memo", "alpha": 0.5})
    block_input = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: block_input.append(weakref.ref(args[0])))
    loss = loss_fn(model, batches(1)[0])
    assert manager.records[0].policy == "memo" and not manager.blocks[0].learned  # calibrating
    assert block_input[0]() is None
    loss.backward()
    assert manager.blocks[0].learned


def test_gpt_block_layout():
    torch.manual_seed(0)
    model, loss_fn = gpt()
    manager = apply_activation_memory(model, {"policy": "memo", "alpha": 0.5})
    loss_fn(model, batches(1)[0]).backward()
    layout = next(iter(manager.blocks[0].learned.values()))
    inside = [s for s in layout.slots if s.call == 0]
    assert sorted(s.argument for s in inside if s.kind is SlotKind.ATTENTION_INPUT) == [0, 1, 2]
    assert all(s.kind is SlotKind.WHOLE for s in inside if s.kind is not SlotKind.ATTENTION_INPUT)
    by_shape = {(s.shape, s.kind): s.tokens for s in layout.slots if s.call is None}
    assert by_shape[((BATCH, SEQ, 4 * DIM), SlotKind.TOKENS)] == TokenLayout(1)  # gelu input
    # a Linear on (batch, seq, dim) saves a (batch * seq, dim) view: tokens inside the batch
    assert by_shape[((BATCH * SEQ, 4 * DIM), SlotKind.TOKENS)] == TokenLayout(0, BATCH, tokens_outer=False)
    assert by_shape[((DIM, 4 * DIM), SlotKind.WHOLE)] is None  # a weight (kept as a parameter)


class MixingBlock(nn.Module):
    """Attention, then an op that mixes tokens (cumsum): what it feeds cannot be recomputed
    for some tokens alone."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.up = nn.Linear(dim, dim)
        self.down = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        h = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        mixed = torch.tanh(torch.cumsum(self.up(h), dim=1))
        return h + self.down(mixed)


class Stack(nn.Module):
    def __init__(self, block: type, layers: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def test_token_mixing_tensors_are_swapped_whole():
    torch.manual_seed(0)
    model = Stack(MixingBlock)
    inputs = [torch.randn(2, 12, 16) for _ in range(3)]
    loss_fn = lambda m, x: m(x)  # noqa: E731
    expected = train(copy.deepcopy(model), loss_fn, inputs)
    manager = apply_activation_memory(model, {"policy": "memo", "alpha": 0.5, "keep_last": 1})
    assert_same(expected, train(model, loss_fn, inputs))
    layout = next(iter(manager.blocks[0].learned.values()))
    mixed = [s for s in layout.slots if s.shape == (2, 12, 16) and s.kind is SlotKind.WHOLE]
    assert mixed, "tanh of the cumsum (and what follows it) must not be recomputed token-wise"
    assert any(s.kind is SlotKind.TOKENS for s in layout.slots)


def test_alpha_is_planned_from_host_memory_and_bandwidth():
    torch.manual_seed(0)
    model, loss_fn = gpt()
    tokens = batches(1)[0]
    probe, slow_model = copy.deepcopy(model), copy.deepcopy(model)
    learn = apply_activation_memory(probe, {"policy": "memo"})
    loss_fn(probe, tokens).backward()
    plan = next(iter(learn.alpha_plans.values()))
    sizes, swapped_blocks = plan.sizes, 2
    assert sizes.hidden_bytes == BATCH * SEQ * DIM * 4 and sizes.token_bytes > 0
    mandatory = sizes.hidden_bytes + sizes.attention_bytes + sizes.whole_bytes
    budget = swapped_blocks * (mandatory + sizes.token_bytes // 2)

    manager = apply_activation_memory(model, {"policy": "memo", "host_memory_budget": budget})
    loss_fn(model, tokens).backward()
    loss_fn(model, tokens)
    expected = swap_fraction(SwapInputs(plan.bandwidth_bytes_per_s, plan.forward_s, sizes.hidden_bytes,
                                        sizes.attention_bytes + sizes.whole_bytes, sizes.token_bytes, budget, 4))
    assert manager.alpha == pytest.approx(expected.alpha) and manager.alpha == pytest.approx(0.5, abs=0.01)
    assert next(iter(manager.alpha_plans.values())).fraction.limited_by == "host_memory"
    assert [r.swapped_tokens for r in manager.reports()] == [SEQ // 2] * 2

    slow = apply_activation_memory(slow_model, {"policy": "memo", "host_bandwidth": 1.0})
    loss_fn(slow_model, tokens).backward()
    assert slow.alpha == 0.0
    assert next(iter(slow.alpha_plans.values())).fraction.limited_by == "bandwidth"


def test_swapped_tokens_leave_at_least_two_to_recompute():
    assert [swapped_tokens(a, 16) for a in (0.0, 0.5, 0.9, 0.95, 1.0)] == [0, 8, 14, 14, 16]


# -- errors ------------------------------------------------------------------------------------


def test_eager_attention_is_refused():
    model, _ = llama(attention="eager")
    with pytest.raises(ValueError, match='attn_implementation="sdpa"'):
        apply_activation_memory(model, {"policy": "memo"})
    model, _ = gpt2(attention="eager")
    with pytest.raises(ValueError, match='attn_implementation="sdpa"'):
        apply_activation_memory(model, {"policy": "memo"})
    apply_activation_memory(model, {"policy": "swap"})  # swapping works with any attention


def test_block_without_attention_fails_clearly():
    from tests.models import AwkwardLM

    model = AwkwardLM()
    apply_activation_memory(model, {"policy": "memo", "keep_last": 1})
    with pytest.raises(RuntimeError, match="scaled_dot_product_attention"):
        model(torch.randint(0, 50, (2, 6)))


def test_model_without_blocks_fails_clearly():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="no repeated blocks.*activation_memory.blocks"):
        apply_activation_memory(model, {"policy": "swap"})
    with pytest.raises(ValueError, match="matches no module.*Linear"):
        apply_activation_memory(model, {"policy": "swap", "blocks": ["Block"]})
    manager = apply_activation_memory(model, {"policy": "swap", "blocks": ["Linear"]})
    assert [b.name for b in manager.blocks] == ["0", "2"]


def test_kv_cache_is_refused_when_blocks_run_again():
    torch.manual_seed(0)
    model, _ = llama()
    apply_activation_memory(model, {"policy": "memo"})
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=batches(1)[0], use_cache=True)


class _ChangesOnRerun(nn.Module):
    """Concatenates its input with itself on every second call: a forward run again differs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls % 2 == 0:
            x = torch.cat([x, x], dim=1)
        return torch.relu(self.linear(x))[:, : 4]


def test_recomputation_refuses_a_forward_that_changed():
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList([_ChangesOnRerun(), _ChangesOnRerun()])
    apply_activation_memory(model, {"policy": "recompute"})
    x = torch.randn(2, 4, 8)
    loss = model.blocks[1](model.blocks[0](x)).sum()
    with pytest.raises(RuntimeError, match=r"saved tensor \d+ as \(2, 4, 8\) .* but \(2, 8, 8\) .* when run again"):
        loss.backward()


def test_config_errors():
    with pytest.raises(ValueError, match="activation_memory.policy='fast'"):
        ActivationMemoryConfig(policy="fast")
    with pytest.raises(ValueError, match="activation_memory.alpha=1.5"):
        ActivationMemoryConfig(alpha=1.5)
    with pytest.raises(ValueError, match="host_memory_budget"):
        ActivationMemoryConfig(host_memory_budget=-1)
    with pytest.raises(ValueError, match="block_policies"):
        ActivationMemoryConfig(block_policies=("memo", "fast"))
    with pytest.raises(ValueError, match="unknown activation_memory key.*'alhpa'"):
        ActivationMemoryConfig.from_dict({"alhpa": 0.5})
    assert ActivationMemoryConfig.from_dict({"blocks": ["Block"]}).blocks == ("Block",)
    model, _ = gpt()
    with pytest.raises(ValueError, match="has 2 entries but the model has 4 blocks"):
        apply_activation_memory(model, {"block_policies": ["memo", "swap"]})


def test_remove_detaches_the_hooks():
    torch.manual_seed(0)
    model, loss_fn = gpt()
    inputs = batches(2)
    expected = train(copy.deepcopy(model), loss_fn, inputs)
    manager = apply_activation_memory(model, {"policy": "memo", "alpha": 0.5})
    loss = loss_fn(model, inputs[0])
    manager.remove()
    loss.backward()  # what was stored still comes back
    assert_same(expected, train(model, loss_fn, inputs))
    assert manager.records == []
    for block in manager.blocks:
        assert not block.module._forward_hooks and not block.module._forward_pre_hooks
