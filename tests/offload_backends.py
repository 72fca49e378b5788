"""Run an offload test against the native extension or the Python fallback."""
from __future__ import annotations

from types import ModuleType

import pytest

import offload.fallback
from offload.extension import extension_status

BACKENDS = ("native", "python")


def use_backend(name: str, monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> None:
    """Route `module`'s native_ops to the native extension (skipping the test where it is not
    available) or to the Python fallback."""
    if name == "native":
        if extension_status().path == "python":
            pytest.skip(f"native extension unavailable: {extension_status().reason}")
    else:
        monkeypatch.setattr(module, "native_ops", lambda: offload.fallback)
