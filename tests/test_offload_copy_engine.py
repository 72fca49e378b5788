"""The copy engine: same API on CPU and CUDA, references held until copies complete."""
import pytest
import torch

from offload.copy_engine import CopyEngine
from offload.pinned_pool import PinnedBufferPool


def test_cpu_engine_copies_synchronously():
    engine = CopyEngine("cpu")
    src = torch.randn(100, 3)
    on_device, handle = engine.to_device(src)
    assert handle.done() and torch.equal(on_device, src) and on_device.data_ptr() != src.data_ptr()
    out = torch.empty(100, 3)
    engine.to_host(on_device, out).wait()
    handle.wait_stream()
    assert torch.equal(out, src) and engine.in_flight == 0


def test_shape_and_device_mismatches_are_explained():
    engine = CopyEngine("cpu")
    with pytest.raises(ValueError, match="source and destination differ"):
        engine.to_device(torch.zeros(3), out=torch.zeros(4))
    with pytest.raises(ValueError, match="supports cuda and cpu"):
        CopyEngine("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_in_both_directions_at_once_keep_tensors_alive():
    engine = CopyEngine()
    pool = PinnedBufferPool(64 << 20)
    n = 4 << 20
    host_in = pool.acquire(n * 4).view(torch.float32)
    host_in.copy_(torch.arange(n, dtype=torch.float32))
    device_src = torch.arange(n, device="cuda", dtype=torch.float32) * 2
    host_out = pool.acquire(n * 4).view(torch.float32)
    on_device, h2d = engine.to_device(host_in)
    d2h = engine.to_host(device_src, host_out)
    del device_src  # the engine holds it until the copy completes
    assert engine.in_flight >= 0
    h2d.wait_stream()
    result = on_device + 1
    d2h.wait()
    pool.release(host_in, after=h2d)
    assert torch.equal(result.cpu(), torch.arange(n, dtype=torch.float32) + 1)
    assert torch.equal(host_out, torch.arange(n, dtype=torch.float32) * 2)
    engine.synchronize()
    assert engine.in_flight == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetch_into_a_caller_buffer_waits_only_for_after():
    engine = CopyEngine()
    buffer = torch.empty(1 << 20, device="cuda")
    last_use = torch.cuda.Event()
    last_use.record()
    src = torch.ones(1 << 20).pin_memory()
    out, handle = engine.to_device(src, out=buffer, after=last_use)
    assert out is buffer
    handle.wait_stream()
    assert bool((buffer == 1).all())
