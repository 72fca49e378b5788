"""`zerokit report` runs anywhere and says what it finds."""
import pytest
import torch

from zerokit.cli import main


def _report(capsys, *args):
    assert main(["report", *args]) == 0
    return capsys.readouterr().out


def test_report_lists_every_section(capsys):
    out = _report(capsys)
    for heading in ["versions", "GPUs", "host", "native extension"]:
        assert f"\n{heading}\n" in f"\n{out}"
    assert torch.__version__ in out
    assert "locked-memory limit" in out and "host memory" in out
    assert "path" in out and "reason" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only wording")
def test_report_without_gpu_says_so(capsys):
    out = _report(capsys)
    assert "CUDA available  no" in out
    assert "none: CUDA is not available" in out
    assert "NCCL            n/a (no CUDA)" in out


def test_nvme_probe_measures_and_cleans_up(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    out = _report(capsys, "--nvme-path", str(tmp_path), "--probe-mib", "8")
    assert "read back  identical" in out and "GB/s" in out
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_nvme_probe_of_a_missing_path_reports_the_error(capsys, tmp_path):
    out = _report(capsys, "--nvme-path", str(tmp_path / "missing"))
    assert "does not exist" in out


def test_probe_size_is_bounded(capsys):
    assert main(["report", "--probe-mib", "100000"]) == 2
    assert "--probe-mib must be between" in capsys.readouterr().err
