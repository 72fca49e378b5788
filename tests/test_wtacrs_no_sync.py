"""A WTA-CRS step never makes the host wait for the device.

On the meta device tensors have shapes but no data, so everything that would read device values
on the host (.item(), .tolist(), nonzero, a boolean mask, a data-dependent shape, a copy to the
host) raises there: a forward and backward that run through on meta read none. The cache skips
recording ∇Z norms of meta tensors (they have no values), so their copy to the host is checked
only on CUDA, where the sync debug mode must stay silent through a forward and backward with the
gradient-norm cache.
"""
import pytest
import torch
import torch.nn as nn

import zerokit.nn as znn
from zerokit.nn.sampling import row_budget


def test_the_meta_device_refuses_host_reads():
    x = torch.randn(8, device="meta")
    reads = (lambda: x.sum().item(), lambda: x.tolist(), lambda: x.nonzero(), lambda: x[x > 0], lambda: x.cpu())
    for read in reads:
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


def _layers_sharing_an_input(dtype, device=None):
    state = znn.SamplingState(znn.GradNormCache(dataset_size=4))
    return nn.ModuleList(
        znn.WTACRSLinear(2048, 48, bias=False, device=device, dtype=dtype, keep_ratio=0.3, sampling_state=state)
        for _ in range(2)
    )


def _step(layers, x, indices):
    with znn.sample_indices(layers, indices):
        sum(layer(x).float().sum() for layer in layers).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_read_no_device_values(dtype):
    layers = _layers_sharing_an_input(dtype)
    shape = (2, 2048, 2048)  # 8 M elements: bfloat16 rows are widened in slices on this device
    _step(layers, torch.randn(shape, dtype=dtype), [1, 3])  # fills the norm cache, on the CPU
    cache = layers[0].sampling_state.cache
    assert cache.lookup(layers[0].cache_slot, torch.tensor([1, 3]), shape[1]).count_nonzero() > 0

    layers.to("meta")
    x = torch.randn(shape, dtype=dtype, device="meta", requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _step(layers, x, [1, 3])  # reads the cache, samples and computes ∇Z norms on meta (recording skips meta)
    kept_indices = [t for t in saved if t.dtype == torch.int64]
    assert len(kept_indices) == 2 and kept_indices[0] is kept_indices[1]  # one shared sample
    assert kept_indices[0].is_meta and kept_indices[0].numel() == row_budget(0.3, 2 * 2048)
    assert x.grad.is_meta and x.grad.shape == shape
    assert all(layer.weight.grad.is_meta and layer.weight.grad.shape == (48, 2048) for layer in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_and_backward_never_synchronize(dtype):
    layers = _layers_sharing_an_input(dtype, device="cuda")
    x = torch.randn(4, 512, 2048, device="cuda", dtype=dtype, requires_grad=True)
    _step(layers, x, [0, 1, 2, 3])  # fills the norm cache; the next batch boundary applies it
    with znn.sample_indices(layers, [0, 1, 2, 3]):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sum(layer(x).float().sum() for layer in layers).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(layer.weight.grad).all()) for layer in layers)
