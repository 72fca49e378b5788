"""Loading the native ops: prebuilt, JIT build, Python fallback with one warning."""
import os
import warnings

import pytest
import torch

import offload.extension as extension
import offload.fallback
from offload.extension import ExtensionStatus, extension_status, native_ops
from offload.raw_memory import IO_ALIGNMENT


@pytest.fixture
def fresh_loader():
    """Forget the cached choice before and after, so each test sees its own loading."""
    extension._load.cache_clear()
    yield
    extension._load.cache_clear()


def _no_prebuilt():
    raise ImportError("simulated: zerokit._C was not built")


def _prebuilt_or_skip():
    try:
        return extension._import_prebuilt()
    except ImportError as error:
        pytest.skip(f"zerokit._C is not built here ({error}); run `python setup.py build_ext --inplace`")


def test_prebuilt_extension_is_preferred(fresh_loader):
    module = _prebuilt_or_skip()
    assert native_ops() is module
    assert extension_status() == ExtensionStatus("prebuilt", "zerokit._C is installed")
    assert module.IO_ALIGNMENT == IO_ALIGNMENT


def test_fallback_warns_exactly_once_and_says_why(fresh_loader, monkeypatch):
    monkeypatch.setattr(extension, "_import_prebuilt", _no_prebuilt)
    monkeypatch.setenv(extension.JIT_ENV, "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert native_ops() is offload.fallback
            status = extension_status()
    assert [w.category for w in caught] == [RuntimeWarning]
    assert "pure-Python" in str(caught[0].message) and "ZEROKIT_JIT=0" in str(caught[0].message)
    assert status.path == "python"
    assert "simulated: zerokit._C was not built" in status.reason and "ZEROKIT_JIT=0" in status.reason


def test_missing_compiler_is_reported(fresh_loader, monkeypatch):
    monkeypatch.setattr(extension, "_import_prebuilt", _no_prebuilt)
    monkeypatch.setenv("CXX", "no-such-compiler-zerokit")
    with pytest.warns(RuntimeWarning):
        status = extension_status()
    assert status.path == "python" and "no C++ compiler (no-such-compiler-zerokit)" in status.reason


def test_failed_jit_build_falls_back_with_the_error(fresh_loader, monkeypatch):
    from torch.utils import cpp_extension

    def broken_load(**kwargs):
        raise RuntimeError("Error building extension 'zerokit_native': simulated compiler error")

    monkeypatch.setattr(extension, "_import_prebuilt", _no_prebuilt)
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    with pytest.warns(RuntimeWarning, match="simulated compiler error"):
        assert native_ops() is offload.fallback


def test_jit_build_compiles_the_repository_sources(fresh_loader, monkeypatch):
    from torch.utils import cpp_extension

    prebuilt = _prebuilt_or_skip()
    calls = []

    def recording_load(**kwargs):
        calls.append(kwargs)
        return prebuilt

    monkeypatch.setattr(extension, "_import_prebuilt", _no_prebuilt)
    monkeypatch.setattr(cpp_extension, "load", recording_load)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    assert native_ops() is prebuilt
    assert extension_status().path == "jit"
    (call,) = calls
    assert call["name"] == extension.JIT_MODULE_NAME
    assert sorted(os.path.basename(s) for s in call["sources"]) == sorted(extension.NATIVE_SOURCES)
    assert all(os.path.isfile(s) for s in call["sources"])
    assert "-fopenmp" in call["extra_cflags"] and "-ffp-contract=off" in call["extra_cflags"]


def test_csrc_is_found_next_to_the_package():
    csrc = extension.find_csrc()
    assert csrc is not None and (csrc / "bindings.cpp").is_file()


@pytest.mark.skipif(
    os.environ.get("ZEROKIT_TEST_JIT_BUILD") != "1",
    reason="compiles the extension (about a minute on 2 cores); set ZEROKIT_TEST_JIT_BUILD=1",
)
def test_real_jit_build_matches_prebuilt(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setattr(extension, "_import_prebuilt", _no_prebuilt)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    module = native_ops()
    assert extension_status().path == "jit", extension_status().reason
    assert module is not offload.fallback
    param, grad = torch.randn(1001), torch.randn(1001)
    expected = param.clone()
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    offload.fallback.adam_step(expected, grad, torch.zeros(1001), torch.zeros(1001), 1, *hyper)
    module.adam_step(param, grad, torch.zeros(1001), torch.zeros(1001), 1, *hyper)
    torch.testing.assert_close(param, expected, rtol=2e-6, atol=1e-7)
