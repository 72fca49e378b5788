"""Asynchronous file I/O (native pool and Python fallback): byte-exact under concurrency."""
import os
import random

import pytest
import torch

import offload.aio as aio_module
from offload.aio import AsyncIO
from offload.raw_memory import IO_ALIGNMENT, aligned_size
from tests.offload_backends import BACKENDS, use_backend

BLOCK = 64 << 10  # small blocks: many per request, spread over the threads


@pytest.fixture(params=BACKENDS)
def io(request, monkeypatch):
    use_backend(request.param, monkeypatch, aio_module)
    return AsyncIO(num_threads=4, block_size=BLOCK)


def _random_bytes(n, gen):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


def _unaligned(n):
    """A uint8 tensor of n bytes whose address is not 4096-aligned."""
    base = torch.empty(n + 1 + IO_ALIGNMENT, dtype=torch.uint8)
    start = (-base.data_ptr() % IO_ALIGNMENT) + 1
    return base[start : start + n]


@pytest.mark.parametrize("direct", [True, False])
def test_many_concurrent_requests_round_trip_byte_exactly(io, tmp_path, direct):
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    sizes = [1, 7, 4095, 4096, 4097, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 123, 1_000_003]
    sizes += [rng.randrange(1, 300_000) for _ in range(30)]
    rng.shuffle(sizes)
    file = io.open(tmp_path / "data.bin", direct=direct)
    assert file.direct == direct or (direct and file.fallback_reason)
    offsets, cursor = [], 0
    for n in sizes:
        offsets.append(cursor)
        cursor += aligned_size(n)
    payloads = [_random_bytes(n, gen) for n in sizes]
    # Half the sources sit at unaligned addresses, exercising the O_DIRECT bounce path.
    sources = [p if i % 2 else _unaligned(len(p)).copy_(p) for i, p in enumerate(payloads)]
    writes = [io.write(file, src, off) for src, off in zip(sources, offsets)]
    for request in writes:
        request.wait()
        assert request.done() and request.error == ""
    targets = [torch.zeros(n, dtype=torch.uint8) if i % 3 else _unaligned(n).zero_() for i, n in enumerate(sizes)]
    reads = [io.read(file, dst, off) for dst, off in zip(targets, offsets)]
    for request in reads:
        request.wait()
    for payload, target in zip(payloads, targets):
        assert torch.equal(payload, target)
    file.close()
    assert file.closed


def test_typed_tensors_and_interleaved_reads_and_writes(io, tmp_path):
    file = io.open(tmp_path / "typed.bin")
    a = torch.randn(333, 7)
    b = torch.arange(10_001, dtype=torch.int64)
    io.write(file, a, 0).wait()
    pending = [io.write(file, b, aligned_size(a.numel() * 4)), io.read(file, out_a := torch.empty(333, 7), 0)]
    for request in pending:
        request.wait()
    out_b = torch.empty_like(b)
    io.read(file, out_b, aligned_size(a.numel() * 4)).wait()
    assert torch.equal(out_a, a) and torch.equal(out_b, b)


def test_request_keeps_its_buffer_alive(io, tmp_path):
    file = io.open(tmp_path / "alive.bin")
    source = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8)
    expected = source.clone()
    request = io.write(file, source, 0)
    del source  # only the request references it now
    scribble = [torch.full((1 << 20,), 7, dtype=torch.uint8) for _ in range(16)]  # invite reuse
    request.wait()
    back = torch.empty_like(expected)
    io.read(file, back, 0).wait()
    assert torch.equal(back, expected) and len(scribble) == 16


def test_direct_writes_pad_the_extent_and_keep_the_logical_size(io, tmp_path):
    file = io.open(tmp_path / "tail.bin", direct=True)
    payload = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    io.write(file, payload, 0).wait()
    size = os.path.getsize(file.path)
    assert size == (aligned_size(5000) if file.direct else 5000)
    back = torch.empty(5000, dtype=torch.uint8)
    io.read(file, back, 0).wait()
    assert torch.equal(back, payload)


def test_reading_past_the_end_reports_the_file_and_offset(io, tmp_path):
    file = io.open(tmp_path / "short.bin")
    io.write(file, torch.ones(100, dtype=torch.uint8), 0).wait()
    request = io.read(file, torch.empty(10_000, dtype=torch.uint8), 0)
    with pytest.raises(RuntimeError, match=r"hit end of file after \d+ bytes"):
        request.wait()
    assert "short.bin" in request.error


def test_bad_requests_are_explained(io, tmp_path):
    file = io.open(tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="not a non-negative multiple of 4096"):
        io.write(file, torch.ones(8), 100)
    with pytest.raises(ValueError, match="must be contiguous"):
        io.write(file, torch.ones(8, 8).t(), 0)
    with pytest.raises(RuntimeError, match="cannot open"):
        io.open(tmp_path / "missing-dir" / "x.bin")
    file.close()
    with pytest.raises(ValueError, match="is closed"):
        io.write(file, torch.ones(8), 0)
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 4096"):
        AsyncIO(block_size=1000)


def test_close_waits_for_nothing_but_refuses_while_in_flight(io, tmp_path):
    file = io.open(tmp_path / "busy.bin")
    big = torch.zeros(64 << 20, dtype=torch.uint8)
    request = io.write(file, big, 0)
    try:
        file.close()  # may succeed only if the write already finished
        assert request.done()
    except RuntimeError as error:
        assert "still in flight" in str(error)
        request.wait()
        file.close()
    assert file.closed


def test_empty_tensor_completes_immediately(io, tmp_path):
    file = io.open(tmp_path / "empty.bin")
    request = io.write(file, torch.empty(0), 0)
    assert request.done()
    request.wait()
