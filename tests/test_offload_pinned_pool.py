"""Aligned host buffers and the budgeted buffer pool."""
import pytest
import torch

import offload.host_memory as host_memory_module
from offload.host_memory import allocate_host_buffer
from offload.pinned_pool import PinnedBufferPool, PinnedPoolBudgetError
from offload.raw_memory import IO_ALIGNMENT
from tests.offload_backends import BACKENDS, use_backend


class FakeOperation:
    """Stands in for an in-flight copy or I/O request."""

    def __init__(self):
        self.finished = False
        self.waited = False

    def done(self):
        return self.finished

    def wait(self):
        self.waited = self.finished = True


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    use_backend(request.param, monkeypatch, host_memory_module)
    return request.param


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 12345, 3 << 20])
def test_host_buffers_are_aligned_writable_and_sized(backend, nbytes):
    buffer = allocate_host_buffer(nbytes)
    assert buffer.tensor.dtype == torch.uint8 and buffer.tensor.numel() == nbytes
    assert buffer.tensor.data_ptr() % IO_ALIGNMENT == 0 or nbytes == 0
    buffer.tensor.fill_(3)
    assert int(buffer.tensor.sum()) == 3 * nbytes
    if not torch.cuda.is_available():
        assert not buffer.pinned


def test_pin_request_without_cuda_says_why(backend):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    buffer = allocate_host_buffer(4096, pin=True)
    assert not buffer.pinned and buffer.pin_reason


def test_host_memory_is_freed_when_the_last_view_dies(backend):
    import psutil

    rss = psutil.Process().memory_info().rss
    for _ in range(8):
        view = allocate_host_buffer(64 << 20).tensor[:10]
        view.fill_(1)
        del view
    assert psutil.Process().memory_info().rss - rss < 256 << 20  # 512 MiB allocated in total


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_buffers_copy_asynchronously_on_cuda(backend):
    buffer = allocate_host_buffer(1 << 20, pin=True)
    assert buffer.pinned and buffer.tensor.is_pinned(), buffer.pin_reason
    assert buffer.tensor.data_ptr() % IO_ALIGNMENT == 0
    buffer.tensor.copy_(torch.arange(1 << 20) % 251)
    device = buffer.tensor.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(device.cpu(), buffer.tensor)


def test_pool_reuses_buffers():
    pool = PinnedBufferPool(1 << 20, pin=False)
    a = pool.acquire(5000)
    assert a.numel() == 5000 and a.data_ptr() % IO_ALIGNMENT == 0
    pointer = a.data_ptr()
    pool.release(a)
    b = pool.acquire(8192)  # fits the 8192-byte buffer made for 5000 bytes
    assert b.data_ptr() == pointer
    assert pool.reserved_bytes == 8192 and pool.in_use_bytes == 8192


def test_over_budget_request_names_bytes_budget_and_setting():
    pool = PinnedBufferPool(64 << 10, pin=False, budget_setting="offload_optimizer.buffer_bytes")
    held = pool.acquire(40 << 10)
    with pytest.raises(PinnedPoolBudgetError) as error:
        pool.acquire(30 << 10)
    message = str(error.value)
    expected = ["30720 bytes", "40960 bytes are in use", "budget of 65536 bytes", "offload_optimizer.buffer_bytes"]
    for fragment in expected + ["at least 73728"]:
        assert fragment in message
    pool.release(held)
    pool.acquire(30 << 10)  # fits once released


def test_idle_buffers_are_freed_to_make_room_within_the_budget():
    pool = PinnedBufferPool(64 << 10, pin=False)
    small = [pool.acquire(16 << 10) for _ in range(3)]
    for tensor in small:
        pool.release(tensor)
    big = pool.acquire(48 << 10)  # needs two idle buffers dropped
    assert big.numel() == 48 << 10
    assert pool.reserved_bytes <= pool.budget_bytes


def test_release_after_an_operation_defers_reuse_until_it_completes():
    pool = PinnedBufferPool(8192, pin=False)
    first = pool.acquire(4096)
    operation = FakeOperation()
    pool.release(first, after=operation)
    second = pool.acquire(4096)  # the first is still being copied: a new buffer
    assert second.data_ptr() != first.data_ptr()
    pool.release(second)
    operation.finished = True
    pool.trim()
    assert pool.reserved_bytes == 0


def test_pool_waits_for_pending_buffers_before_exceeding_the_budget():
    pool = PinnedBufferPool(4096, pin=False)
    first = pool.acquire(4096)
    operation = FakeOperation()
    pool.release(first, after=operation)
    again = pool.acquire(4096)
    assert operation.waited and again.data_ptr() == first.data_ptr()


def test_pool_misuse_is_explained():
    pool = PinnedBufferPool(8192, pin=False)
    tensor = pool.acquire(10)
    pool.release(tensor)
    with pytest.raises(ValueError, match="already released"):
        pool.release(tensor)
    with pytest.raises(ValueError, match="budget_bytes must be a positive int"):
        PinnedBufferPool(0)
    with pool.borrow(100) as borrowed:
        assert borrowed.numel() == 100
    assert pool.in_use_bytes == 0
