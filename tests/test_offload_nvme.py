"""NVMe swapper: path checks, round trips, checksums, streaming, and leaving nothing behind."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import offload.aio as aio_module
import offload.nvme as nvme_module
from offload.nvme import CHECKSUM_ENV, NVMePathError, NVMeSwapper, check_nvme_path
from offload.raw_memory import aligned_size
from tests.offload_backends import BACKENDS, use_backend

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nvme_dir(tmp_path):
    """An nvme_path that already holds someone else's files, which must stay untouched."""
    (tmp_path / "other.bin").write_bytes(b"not zerokit's")
    (tmp_path / "other-dir").mkdir()
    (tmp_path / "other-dir" / "keep.txt").write_text("keep")
    return tmp_path


def _snapshot(directory):
    paths = sorted(directory.rglob("*"))
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in paths}


def test_missing_path_is_explained(tmp_path):
    with pytest.raises(NVMePathError, match="does not exist; create it"):
        check_nvme_path(tmp_path / "nope", 1)


def test_file_instead_of_directory_is_explained(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NVMePathError, match="is not a directory"):
        NVMeSwapper(tmp_path / "file", 4096)


def test_unwritable_path_is_explained(tmp_path, monkeypatch):
    # Tests may run as root, which writes anywhere: ask os.access to say no.
    monkeypatch.setattr(nvme_module.os, "access", lambda path, mode: False)
    with pytest.raises(NVMePathError, match="is not writable by this process"):
        check_nvme_path(tmp_path, 1)


def test_too_little_free_space_says_needed_and_free_bytes(tmp_path):
    needed = 1 << 60
    with pytest.raises(NVMePathError) as error:
        NVMeSwapper(tmp_path, needed)
    assert f"but {needed} bytes" in str(error.value) and "bytes (" in str(error.value) and "free" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # checked before anything was created


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_and_cleanup_touch_only_our_directory(nvme_dir, backend, monkeypatch):
    use_backend(backend, monkeypatch, aio_module)
    before = _snapshot(nvme_dir)
    tensors = {"w": torch.randn(1000, 33), "b": torch.randn(7), "i": torch.arange(4099, dtype=torch.int16)}
    swapper = NVMeSwapper(nvme_dir, NVMeSwapper.bytes_needed(list(tensors.values())), rank=3)
    assert swapper.directory.parent == nvme_dir and swapper.directory.name.startswith("zerokit-swap-rank3-")
    handles = [swapper.swap_out(key, t) for key, t in tensors.items()]
    for handle in handles:
        handle.wait()
    for key, t in tensors.items():
        out = torch.empty_like(t)
        swapper.swap_in(key, out).wait()
        assert torch.equal(out, t)
        assert swapper.extent(key).offset % 4096 == 0
    swapper.close()
    assert _snapshot(nvme_dir) == before
    with pytest.raises(RuntimeError, match="closed"):
        swapper.swap_out("w", tensors["w"])


def test_sizes_keys_and_capacity_are_checked(nvme_dir):
    with NVMeSwapper(nvme_dir, 3 * 4096) as swapper:
        swapper.swap_out("a", torch.zeros(1024)).wait()
        with pytest.raises(ValueError, match="was swapped out with 4096 bytes, now 4100"):
            swapper.swap_out("a", torch.zeros(1025))
        with pytest.raises(ValueError, match="holds 4096 bytes, but out has 2048"):
            swapper.swap_in("a", torch.empty(512))
        with pytest.raises(KeyError, match="never swapped out"):
            swapper.swap_in("b", torch.empty(1))
        swapper.swap_out("b", torch.zeros(2048)).wait()
        with pytest.raises(ValueError, match="size capacity_bytes with NVMeSwapper.bytes_needed"):
            swapper.swap_out("c", torch.zeros(1))


def test_swap_in_waits_for_the_pending_swap_out_of_the_same_key(nvme_dir):
    with NVMeSwapper(nvme_dir, 64 << 20, block_size=1 << 20) as swapper:
        data = torch.randn(8 << 20)
        swapper.swap_out("x", data)  # not waited
        out = torch.empty_like(data)
        swapper.swap_in("x", out).wait()
        assert torch.equal(out, data)


def test_checksum_catches_corruption_on_disk(nvme_dir, monkeypatch):
    monkeypatch.setenv(CHECKSUM_ENV, "1")
    with NVMeSwapper(nvme_dir, 1 << 20) as swapper:
        assert swapper.checksum
        data = torch.randn(5000)
        swapper.swap_out("x", data).wait()
        swapper.swap_in("x", torch.empty(5000)).wait()  # intact: passes
        path = swapper.directory / nvme_module.SWAP_FILE_NAME
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"\xff" * 16, swapper.extent("x").offset + 100)
        os.close(fd)
        with pytest.raises(RuntimeError, match="checksum mismatch swapping in 'x'"):
            swapper.swap_in("x", torch.empty(5000)).wait()


def test_stream_double_buffers_reads_and_write_back(nvme_dir):
    gen = torch.Generator().manual_seed(0)
    groups = [[f"p{i}", f"m{i}"] for i in range(5)]
    originals = {}
    with NVMeSwapper(nvme_dir, 1 << 24, block_size=64 << 10) as swapper:
        for i, (p, m) in enumerate(groups):
            originals[p] = torch.randn(1000 + 97 * i, generator=gen)
            originals[m] = torch.randn(3, 100 + i, generator=gen)
            swapper.swap_out(p, originals[p]).wait()
            swapper.swap_out(m, originals[m]).wait()
        size = swapper.staging_bytes(groups)
        group_bytes = [aligned_size(originals[p].numel() * 4) + aligned_size(originals[m].numel() * 4)
                       for p, m in groups]
        assert size == max(group_bytes)
        staging = [torch.empty(size, dtype=torch.uint8) for _ in range(2)]
        seen = []

        def update(views):
            p, m = groups[len(seen)]
            param, moment = views
            assert torch.equal(param, originals[p]) and torch.equal(moment, originals[m])
            seen.append(p)
            param.add_(1)
            moment.mul_(2)

        swapper.stream(groups, staging, update, write_back=True)
        assert seen == [g[0] for g in groups]
        for p, m in groups:
            out_p, out_m = torch.empty_like(originals[p]), torch.empty_like(originals[m])
            swapper.swap_in(p, out_p).wait()
            swapper.swap_in(m, out_m).wait()
            assert torch.equal(out_p, originals[p] + 1) and torch.equal(out_m, originals[m] * 2)
        with pytest.raises(ValueError, match="consecutive groups must not share keys"):
            swapper.stream([["p0"], ["p0"]], staging, update, write_back=True)
        with pytest.raises(ValueError, match="staging_bytes"):
            swapper.stream(groups, [torch.empty(16, dtype=torch.uint8)] * 2, update)


def test_stream_stops_writing_back_when_fn_raises(nvme_dir):
    with NVMeSwapper(nvme_dir, 1 << 20) as swapper:
        for key in "abc":
            swapper.swap_out(key, torch.zeros(100)).wait()
        staging = [torch.empty(swapper.staging_bytes([["a"]]), dtype=torch.uint8) for _ in range(2)]
        calls = []

        def fail_on_b(views):
            calls.append(1)
            views[0].fill_(len(calls))
            if len(calls) == 2:
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            swapper.stream([["a"], ["b"], ["c"]], staging, fail_on_b, write_back=True)
        values = []
        for key in "abc":
            out = torch.empty(100)
            swapper.swap_in(key, out).wait()
            values.append(out[0].item())
        assert values == [1.0, 0.0, 0.0]


def test_swap_files_are_removed_at_interpreter_exit(nvme_dir):
    before = _snapshot(nvme_dir)
    script = textwrap.dedent(
        f"""
        import torch
        from offload.nvme import NVMeSwapper
        swapper = NVMeSwapper({str(nvme_dir)!r}, 1 << 20)
        swapper.swap_out("x", torch.randn(1000))  # left in flight, never closed
        print(swapper.directory)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == nvme_dir
    assert not Path(result.stdout.strip()).exists()
    assert _snapshot(nvme_dir) == before


def test_swapper_is_cleaned_up_when_garbage_collected(nvme_dir):
    swapper = NVMeSwapper(nvme_dir, 1 << 20)
    directory = swapper.directory
    assert directory.exists()
    del swapper
    assert not directory.exists()
