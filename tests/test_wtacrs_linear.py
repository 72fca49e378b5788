"""WTACRSLinear: exactness, memory saved, norm cache, checkpointing, determinism, ranks."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import zerokit.nn as znn
from zerokit.nn.sampling import row_budget


def _pair(in_features=16, out_features=12, bias=True, dtype=torch.float32, keep_ratio=0.3, seed=0):
    torch.manual_seed(seed)
    reference = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    layer = znn.WTACRSLinear(in_features, out_features, bias=bias, dtype=dtype, keep_ratio=keep_ratio)
    layer.load_state_dict(reference.state_dict())
    return reference, layer


def _grads(module, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad_out)
    bias_grad = None if module.bias is None else module.bias.grad
    return y, x.grad, module.weight.grad, bias_grad


def _saved_tensors(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("shape", [(40, 16), (3, 7, 16), (2, 3, 5, 16), (16,)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_input_and_bias_gradients_are_exact(shape, bias):
    reference, layer = _pair(bias=bias)
    x = torch.randn(shape)
    grad_out = torch.randn(*shape[:-1], 12)
    y_ref, gx_ref, _, gb_ref = _grads(reference, x, grad_out)
    y, gx, gw, gb = _grads(layer, x, grad_out)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    if bias:
        torch.testing.assert_close(gb, gb_ref, rtol=1e-6, atol=1e-6)
    assert gw.shape == layer.weight.shape and gw.dtype == layer.weight.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_full_keep_ratio_is_exact(dtype):
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    reference, layer = _pair(dtype=dtype, keep_ratio=1.0)
    x = torch.randn(4, 9, 16, dtype=dtype)
    grad_out = torch.randn(4, 9, 12, dtype=dtype)
    expected = _grads(reference, x, grad_out)
    for got, want in zip(_grads(layer, x, grad_out), expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    sampled = znn.WTACRSLinear(16, 12, dtype=dtype, keep_ratio=0.3)
    _, _, gw, gb = _grads(sampled, x, grad_out)
    assert gw.dtype == dtype and bool(torch.isfinite(gw).all())


def test_weight_gradient_is_unbiased_through_autograd():
    reference, layer = _pair(in_features=6, out_features=5, dtype=torch.float64, keep_ratio=0.25)
    x = torch.randn(2, 10, 6, dtype=torch.float64) * torch.rand(2, 10, 1, dtype=torch.float64) ** 3
    grad_out = torch.randn(2, 10, 5, dtype=torch.float64)
    exact = _grads(reference, x, grad_out)[2]
    estimates = []
    for seed in range(960):
        torch.manual_seed(seed)
        estimates.append(_grads(layer, x, grad_out)[2].clone())
    estimates = torch.stack(estimates)
    chunk_errors = (estimates.view(16, 60, 5, 6).mean(1) - exact).flatten(1).norm(dim=1)
    total_error = (estimates.mean(0) - exact).norm()
    assert chunk_errors.pow(2).mean().sqrt() / total_error > 2.5  # about 4 = sqrt(16)
    mse = (estimates - exact).pow(2).flatten(1).sum(1).mean()
    assert total_error**2 <= 9 * mse / len(estimates)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_only_sampled_rows_indices_and_weights(dtype):
    layer = znn.WTACRSLinear(32, 24, dtype=dtype, keep_ratio=0.3)
    x = torch.randn(4, 50, 32, dtype=dtype, requires_grad=True)
    y, saved = _saved_tensors(lambda: layer(x))
    assert any(t is layer.weight for t in saved)  # the parameter itself, not a copy
    others = [t for t in saved if t is not layer.weight]
    rows, indices, weights = others
    kept = indices.numel()
    assert kept == row_budget(0.3, 200) == 60
    assert rows.shape == (kept, 32) and rows.dtype == dtype
    assert indices.dtype == torch.int64 and weights.shape == (kept,) and weights.dtype == torch.float32
    saved_bytes = sum(t.numel() * t.element_size() for t in others)
    assert saved_bytes == kept * (32 * x.element_size() + 8 + 4)
    # 12 bytes of index and weight per kept row on top of its data (64 bytes at this tiny width)
    assert saved_bytes <= 0.3 * x.numel() * x.element_size() * (1 + 12 / (32 * x.element_size()))
    torch.testing.assert_close(rows, x.detach().reshape(-1, 32)[indices])


def test_frozen_weight_and_eval_mode_behave_as_nn_linear():
    layer = znn.WTACRSLinear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    layer.weight.requires_grad_(False)
    _, saved = _saved_tensors(lambda: layer(x))
    assert all(t.data_ptr() == layer.weight.data_ptr() for t in saved)  # no input rows at all
    layer.weight.requires_grad_(True)
    layer.eval()
    state = torch.random.get_rng_state()
    _, saved = _saved_tensors(lambda: layer(x))
    assert any(t.data_ptr() == x.data_ptr() and t.shape == x.shape for t in saved)  # plain nn.Linear
    assert torch.equal(state, torch.random.get_rng_state())  # eval draws nothing


def test_input_kept_by_its_producer_is_saved_whole_and_exact():
    reference, layer = _pair()
    x = torch.randn(30, 16)
    for producer in (torch.relu, lambda t: torch.relu(t).t().t()):  # the result itself, or a view of it
        h = producer(x.clone().requires_grad_(True))
        _, saved = _saved_tensors(lambda: layer(h))
        assert all(t.dtype != torch.int64 for t in saved)  # no sample: ReLU keeps h anyway
    grad_out = torch.randn(30, 12)
    for module in (reference, layer):
        module.zero_grad(set_to_none=True)
        module(torch.relu(x.clone().requires_grad_(True))).backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)


def test_empty_input():
    layer = znn.WTACRSLinear(4, 3)
    x = torch.randn(0, 4, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(3, 4))


def test_state_dict_round_trips_with_nn_linear():
    reference, layer = _pair()
    assert list(layer.state_dict()) == list(reference.state_dict()) == ["weight", "bias"]
    fresh_reference = nn.Linear(16, 12)
    fresh_reference.load_state_dict(layer.state_dict())
    fresh_layer = znn.WTACRSLinear(16, 12)
    fresh_layer.load_state_dict(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(fresh_reference.state_dict()[key], value)
        assert torch.equal(fresh_layer.state_dict()[key], value)
    assert isinstance(layer, nn.Linear)


def test_regathered_weight_storage_is_read_in_backward():
    """As ZeRO-3 does: free the parameter's storage after forward, gather it again before backward."""
    layer = znn.WTACRSLinear(8, 6)
    x = torch.randn(10, 8, requires_grad=True)
    y = layer(x)
    regathered = layer.weight.detach() * 2
    storage = layer.weight.untyped_storage()
    size = storage.nbytes()
    storage.resize_(0)
    storage.resize_(size)
    layer.weight.data.copy_(regathered)
    grad_out = torch.randn(10, 6)
    y.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ regathered)


def test_weight_gradient_goes_through_accumulate_grad_hooks():
    layer = znn.WTACRSLinear(8, 6)
    seen = []
    layer.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    layer(torch.randn(10, 8)).sum().backward()
    assert len(seen) == 1 and torch.equal(seen[0], layer.weight.grad)


def test_autocast_matches_nn_linear():
    reference, layer = _pair()
    x = torch.randn(3, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = reference(x)
        y = layer(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32


def test_sampling_is_deterministic_under_a_seed():
    _, layer = _pair()
    x, grad_out = torch.randn(6, 10, 16), torch.randn(6, 10, 12)
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        torch.manual_seed(seed)
        runs[name] = _grads(layer, x, grad_out)[2].clone()
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.equal(runs["a"], runs["c"])


def _dropout_block(layer, x):
    return F.dropout(layer(x), p=0.5, training=True)


def _run_block(layer, x, grad_out, mode, indices=None):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    with znn.sample_indices(layer, indices):
        if mode == "none":
            y = _dropout_block(layer, x)
        else:
            y = checkpoint(_dropout_block, layer, x, use_reentrant=(mode == "reentrant"))
        y.backward(grad_out)
    return layer.weight.grad.clone(), x.grad.clone(), y.detach()


@pytest.mark.parametrize("with_cache", [False, True])
def test_checkpoint_recomputation_draws_the_same_sample(with_cache):
    _, layer = _pair()
    x, grad_out = torch.randn(4, 10, 16), torch.randn(4, 10, 12)
    indices = torch.tensor([3, 0, 8, 5]) if with_cache else None
    if with_cache:  # a first step fills the norm cache the second one reads
        _run_block(layer, x, torch.randn(4, 10, 12) * torch.rand(4, 10, 1) ** 4, "none", indices)
    modes = ("none", "reentrant", "non_reentrant")
    results = {mode: _run_block(copy.deepcopy(layer), x, grad_out, mode, indices) for mode in modes}
    for mode in ("reentrant", "non_reentrant"):
        assert torch.equal(results[mode][0], results["none"][0]), mode  # same rows and weights
        assert torch.equal(results[mode][1], results["none"][1]), mode  # same dropout mask in backward
        assert torch.equal(results[mode][2], results["none"][2]), mode  # and in forward: RNG use in step


def test_norm_cache_records_exact_per_token_norms():
    for dataset_size in (None, 12):
        layer = znn.WTACRSLinear(16, 12, sampling_state=znn.SamplingState(znn.GradNormCache(dataset_size)))
        x, grad_out = torch.randn(3, 5, 16), torch.randn(3, 5, 12)
        with znn.sample_indices(layer, [7, 2, 9]):
            layer(x).backward(grad_out)
        cache = layer.sampling_state.cache
        stored = cache.lookup(layer.cache_slot, torch.tensor([7, 2, 9, 4]), 5)
        assert stored.dtype == torch.bfloat16  # as stored: a sampling weight needs no more digits
        torch.testing.assert_close(stored[:3].float(), grad_out.norm(dim=-1), rtol=1e-2, atol=0)
        assert not stored[3].any()  # never seen
        assert cache.nbytes == (3 * 5 * 2 if dataset_size is None else 12 * 5 * 2)


def test_norms_recorded_outside_a_backward_pass_wait_for_the_batch_boundary():
    cache = znn.GradNormCache()
    slot = cache.new_slot()
    norms = torch.rand(2, 5) + 0.5
    cache.record(slot, torch.tensor([3, 8]), norms)  # no backward running: nothing to hook its end
    assert cache.lookup(slot, torch.tensor([3]), 5) is None
    cache.commit()
    assert torch.equal(cache.lookup(slot, torch.tensor([8, 3]), 5), norms.flip(0).to(torch.bfloat16))


def test_cached_norms_steer_the_sample_and_no_indices_falls_back():
    layer = znn.WTACRSLinear(16, 12, keep_ratio=1 / 3)
    x = torch.randn(1, 15, 16)
    x = x / x.norm(dim=-1, keepdim=True)  # equal ‖H_i‖: only cached ‖∇Z_i‖ can tell rows apart
    grad_out = torch.full((1, 15, 12), 1e-3)
    grad_out[0, [2, 6, 11]] = 1e3
    with znn.sample_indices(layer, [4]):
        layer(x).backward(grad_out)

    def kept(indices):
        with znn.sample_indices(layer, indices):
            _, saved = _saved_tensors(lambda: layer(x.clone().requires_grad_(True)))
        rows, picked, weights = [t for t in saved if t is not layer.weight]
        return dict(zip(picked.tolist(), weights.tolist()))

    for seed in range(4):
        torch.manual_seed(seed)
        winners = {row for row, weight in kept([4]).items() if weight == 1.0}
        assert {2, 6, 11} <= winners  # k = 5: the three large-gradient rows are kept exactly
        torch.manual_seed(seed)
        assert all(weight != 1.0 for weight in kept(None).values())  # p uniform: no winners
        torch.manual_seed(seed)
        assert all(weight != 1.0 for weight in kept([5]).values())  # unseen sample: fallback
    assert layer.sampling_state.cache.nbytes == 15 * 2  # only sample 4 was recorded


def test_bad_arguments_get_clear_errors():
    for keep_ratio in (0, 1.5, "0.3", True):
        with pytest.raises(ValueError, match="keep_ratio"):
            znn.WTACRSLinear(4, 4, keep_ratio=keep_ratio)
    layer = znn.WTACRSLinear(4, 4)
    for indices in ([[1, 2]], [0.5], [-1]):
        with pytest.raises(ValueError, match="sample indices"):
            znn.set_sample_indices(layer, indices)
    with pytest.raises(ValueError, match="no WTA-CRS layers"):
        znn.set_sample_indices(nn.Linear(4, 4), [0])
    dense = znn.WTACRSLinear(4, 4, sampling_state=znn.SamplingState(znn.GradNormCache(dataset_size=3)))
    with pytest.raises(ValueError, match="dataset_size"):
        znn.set_sample_indices(dense, [1, 3])
    with znn.sample_indices(dense, [0, 1]):
        dense(torch.randn(2, 5, 4)).sum().backward()
    with pytest.raises(ValueError, match="tokens per sample"):
        with znn.sample_indices(dense, [0, 1]):
            dense(torch.randn(2, 6, 4))


def test_input_not_batch_first_falls_back_with_a_warning(caplog):
    layer = znn.WTACRSLinear(4, 4)
    with znn.sample_indices(layer, [0, 1, 2]):
        layer(torch.randn(5, 3, 4)).sum().backward()
    assert "batch-first" in caplog.text
    assert layer.sampling_state.cache.nbytes == 0


def _rank_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    for same in (False, True):
        layer = znn.WTACRSLinear(8, 8, sampling_state=znn.SamplingState(same_samples_across_ranks=same))
        torch.manual_seed(0)  # every rank seeded alike, as usual
        x = torch.ones(1, 64, 8)  # same data on both ranks: only the draws can differ
        _, saved = _saved_tensors(lambda: layer(x))
        results[same] = [t for t in saved if t.dtype == torch.int64][0]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ranks_draw_independently_unless_configured(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(rank0[False], rank1[False])
    assert torch.equal(rank0[True], rank1[True])


def test_layers_reading_one_input_share_one_sample():
    state = znn.SamplingState()
    q, k = (znn.WTACRSLinear(16, 8, sampling_state=state) for _ in range(2))
    x = torch.randn(4, 20, 16, requires_grad=True)
    _, saved = _saved_tensors(lambda: (q(x), k(x)))
    rows = [t for t in saved if t.dim() == 2 and t.shape[1] == 16 and t is not q.weight and t is not k.weight]
    assert len(rows) == 2 and rows[0] is rows[1]  # one tensor in memory
    _, saved = _saved_tensors(lambda: (q(x), k(x * 1)))  # another input: its own sample
    rows = [t for t in saved if t.dim() == 2 and t.shape[1] == 16 and t is not q.weight and t is not k.weight]
    assert rows[0] is not rows[1]
    (out_q, out_k), saved = _saved_tensors(lambda: (q(x), k(x)))
    (out_q.sum() + out_k.sum()).backward()
    _, again = _saved_tensors(lambda: q(x))  # a backward ended that forward: the same x gets a new sample
    new_indices = [t for t in again if t.dtype == torch.int64][0]
    old_indices = [t for t in saved if t.dtype == torch.int64][0]
    assert new_indices is not old_indices and not torch.equal(new_indices, old_indices)
    h = x * 1
    _, first = _saved_tensors(lambda: q(h))
    with torch.no_grad():
        h.mul_(2)  # changed in place: the earlier sample no longer describes it
    _, second = _saved_tensors(lambda: k(h))
    assert all(a is not b for a in first for b in second if a.dim() == 2 and a.shape[1] == 16)


def test_only_the_layer_drawing_a_shared_sample_caches_norms():
    state = znn.SamplingState()
    q, k = (znn.WTACRSLinear(16, 8, sampling_state=state) for _ in range(2))
    model = nn.ModuleList([q, k])
    x, batch = torch.randn(2, 10, 16), torch.tensor([0, 1])
    with znn.sample_indices(model, batch):
        (q(x).sum() + k(x).sum()).backward()  # k reuses q's sample: its norms would never be read
    assert state.cache.lookup(q.cache_slot, batch, 10) is not None
    assert state.cache.lookup(k.cache_slot, batch, 10) is None
    grad_out = torch.randn(2, 10, 8)
    with znn.sample_indices(model, batch):
        k(x).backward(grad_out)  # alone, k draws its own sample and caches its own norms
    stored = state.cache.lookup(k.cache_slot, batch, 10).float()
    torch.testing.assert_close(stored, grad_out.norm(dim=-1), rtol=1e-2, atol=0)


def test_shared_sample_is_unbiased_for_the_second_layer():
    torch.manual_seed(0)
    state = znn.SamplingState()
    first, second = (
        znn.WTACRSLinear(6, 5, dtype=torch.float64, keep_ratio=0.25, sampling_state=state) for _ in range(2)
    )
    x = torch.randn(2, 10, 6, dtype=torch.float64) * torch.rand(2, 10, 1, dtype=torch.float64) ** 3
    grad_out = torch.randn(2, 10, 5, dtype=torch.float64) * torch.rand(2, 10, 1, dtype=torch.float64) ** 3
    first_grad = torch.randn(2, 10, 5, dtype=torch.float64) * (torch.rand(2, 10, 1, dtype=torch.float64) + 0.05)
    exact = grad_out.reshape(-1, 5).T @ x.reshape(-1, 6)
    estimates = []
    for seed in range(960):
        torch.manual_seed(seed)
        second.zero_grad(set_to_none=True)
        h = x.clone().requires_grad_(True)
        with znn.sample_indices(first, [0, 1]):  # the sample follows the first layer's cached ‖∇Z‖
            ((first(h) * first_grad).sum() + (second(h) * grad_out).sum()).backward()
        estimates.append(second.weight.grad.clone())
    estimates = torch.stack(estimates)
    chunk_errors = (estimates.view(16, 60, 5, 6).mean(1) - exact).flatten(1).norm(dim=1)
    total_error = (estimates.mean(0) - exact).norm()
    assert chunk_errors.pow(2).mean().sqrt() / total_error > 2.5
    mse = (estimates - exact).pow(2).flatten(1).sum(1).mean()
    assert total_error**2 <= 9 * mse / len(estimates)


def test_converted_layers_pickle_after_a_forward():
    import pickle

    layer = znn.WTACRSLinear(4, 4)
    x = torch.randn(3, 4)
    y = layer(x)
    clone = pickle.loads(pickle.dumps(layer))
    assert torch.equal(clone.weight, layer.weight) and clone.keep_ratio == layer.keep_ratio
    assert copy.deepcopy(layer).sampling_state is not layer.sampling_state
    del y


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_layer_is_exact_where_it_must_be_and_recomputes_the_same_sample(dtype):
    torch.manual_seed(0)
    reference = nn.Linear(64, 48, device="cuda", dtype=dtype)
    layer = znn.WTACRSLinear(64, 48, device="cuda", dtype=dtype, keep_ratio=0.3,
                             sampling_state=znn.SamplingState(znn.GradNormCache(dataset_size=8)))
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(4, 128, 64, device="cuda", dtype=dtype)
    grad_out = torch.randn(4, 128, 48, device="cuda", dtype=dtype)
    y_ref, gx_ref, _, gb_ref = _grads(reference, x, grad_out)
    with znn.sample_indices(layer, [0, 1, 2, 3]):
        y, gx, gw, gb = _grads(layer, x, grad_out)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gb, gb_ref)
    assert gw.dtype == dtype and bool(torch.isfinite(gw).all())
    _, saved = _saved_tensors(lambda: layer(x.clone().requires_grad_(True)))
    kept = [t for t in saved if t.dtype == torch.int64][0]
    assert kept.is_cuda and 0 < kept.numel() <= row_budget(0.3, 512)
    results = {mode: _run_block(copy.deepcopy(layer), x, grad_out, mode, [0, 1, 2, 3])
               for mode in ("none", "reentrant", "non_reentrant")}
    for mode in ("reentrant", "non_reentrant"):
        for got, want in zip(results[mode], results["none"]):
            assert torch.equal(got, want), mode
