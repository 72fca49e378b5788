"""The sampler's CUDA graphs choose exactly the rows the eager sampler chooses (CUDA only: on
the CPU the layers sample eagerly, as every other WTA-CRS test exercises)."""
import pytest
import torch

import zerokit.nn as znn
from zerokit.nn.function import keep_rows
from zerokit.nn.sampler_graphs import GRAPHS_KEPT, SamplerGraphs, sample_eagerly

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _both(sampler, input_norms, grad_norms, k, seed):
    graphed = sampler.sample(input_norms, grad_norms, k, torch.Generator(input_norms.device).manual_seed(seed))
    eager = sample_eagerly(input_norms, grad_norms, k, torch.Generator(input_norms.device).manual_seed(seed))
    return graphed, eager


def _assert_same(graphed, eager):
    assert torch.equal(graphed.indices, eager.indices) and torch.equal(graphed.weights, eager.weights)


@cuda
def test_graphed_and_eager_samples_are_identical():
    device = "cuda"
    sampler = SamplerGraphs()
    torch.manual_seed(0)
    heavy = torch.randn(4096, device=device).abs() ** 6  # a few winners
    grad = torch.rand(4096, device=device)
    grad[::3] = 0  # unknown norms take the typical value
    earlier = []
    for seed in range(3):  # the first call captures, the others replay
        for grad_norms in (None, grad):
            for k in (1, 100, 1229):
                graphed, eager = _both(sampler, heavy, grad_norms, k, seed)
                _assert_same(graphed, eager)
                earlier.append((graphed, eager))
    for graphed, eager in earlier:  # replays did not overwrite what earlier calls returned
        _assert_same(graphed, eager)


@cuda
def test_each_stream_replays_its_own_graph():
    sampler = SamplerGraphs()
    norms = torch.rand(2048, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = _both(sampler, norms, None, 300, 1)
    torch.cuda.current_stream().wait_stream(side)
    _assert_same(*on_side)
    _assert_same(*_both(sampler, norms, None, 300, 1))
    assert len(sampler._captured) == 2


@cuda
def test_the_number_of_graphs_kept_is_bounded():
    sampler = SamplerGraphs()
    for rows in range(64, 64 + GRAPHS_KEPT + 5):
        _assert_same(*_both(sampler, torch.rand(rows, device="cuda"), None, 10, rows))
    assert len(sampler._captured) == GRAPHS_KEPT


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_rows_with_graphs_keeps_the_eager_rows(dtype):
    x = torch.randn(4, 512, 256, device="cuda", dtype=dtype)
    grad_norms = torch.rand(4 * 512, device="cuda")
    sampler = SamplerGraphs()
    for seed in range(2):
        graphed = keep_rows(x, 0.3, seed, grad_norms, sampler)
        eager = keep_rows(x, 0.3, seed, grad_norms)
        assert all(torch.equal(a, b) for a, b in zip(graphed, eager))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_sampling_beside_its_matmul_saves_its_input_rows(dtype):
    torch.manual_seed(0)
    layer = znn.WTACRSLinear(1024, 512, bias=False, device="cuda", dtype=dtype, keep_ratio=0.3)
    for _ in range(3):
        x = torch.randn(4, 1024, 1024, device="cuda", dtype=dtype, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = layer(x * 2)  # a temporary input, freed once the forward returns
        torch.randn(64 << 20, device="cuda")  # reuses freed memory, if any was freed too early
        rows, indices, weights = [t for t in saved if t is not layer.weight]
        assert torch.equal(rows, (x.detach() * 2).reshape(-1, 1024).index_select(0, indices))
        grad = torch.randn_like(out)
        out.backward(grad)
        grad_rows = grad.reshape(-1, 512).index_select(0, indices).float()
        expected = (grad_rows * weights.unsqueeze(1)).t() @ rows.float()
        assert (layer.weight.grad.float() - expected).norm() <= 1e-2 * expected.norm()
        layer.weight.grad = None
