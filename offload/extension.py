"""Load zerokit's native ops: prebuilt `zerokit._C`, else a JIT build of csrc/, else pure Python.

Every path exposes the same functions (see offload/fallback/__init__.py). `extension_status()`
says which path is active and why; `zerokit report` prints it. The Python fallback is correct
but slower, and announces itself with one warning per process. ZEROKIT_PYTHON_OPS=1 selects
the Python ops on purpose (their Adam follows torch.optim's operation order bit for bit).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal, Optional

from offload.native_flags import CXX_FLAGS, LINK_FLAGS

JIT_ENV = "ZEROKIT_JIT"  # "0" disables the JIT build
PYTHON_ENV = "ZEROKIT_PYTHON_OPS"  # "1" selects the pure-Python ops (bit-exact torch Adam order; debugging)
JIT_MODULE_NAME = "zerokit_native"
NATIVE_SOURCES = ("async_io.cpp", "bindings.cpp", "cpu_adam.cpp", "host_memory.cpp")


@dataclass(frozen=True)
class ExtensionStatus:
    path: Literal["prebuilt", "jit", "python"]
    reason: str


def native_ops() -> ModuleType:
    """The module implementing the native ops on the active path."""
    return _load()[0]


def extension_status() -> ExtensionStatus:
    return _load()[1]


def find_csrc() -> Optional[Path]:
    """The csrc/ directory next to this package (source checkouts, editable installs), if any."""
    candidates = [Path(__file__).resolve().parent.parent / "csrc"]
    spec = importlib.util.find_spec("zerokit")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(location) / "csrc" for location in spec.submodule_search_locations]
    for directory in candidates:
        if all((directory / name).is_file() for name in NATIVE_SOURCES):
            return directory
    return None


def _import_prebuilt() -> ModuleType:
    return importlib.import_module("zerokit._C")


@functools.cache
def _load() -> tuple[ModuleType, ExtensionStatus]:
    if os.environ.get(PYTHON_ENV, "0") == "1":
        return importlib.import_module("offload.fallback"), ExtensionStatus("python", f"{PYTHON_ENV}=1 selects it")
    try:
        return _import_prebuilt(), ExtensionStatus("prebuilt", "zerokit._C is installed")
    except ImportError as error:
        prebuilt_missing = f"no usable prebuilt zerokit._C ({error})"
    module, jit_failure = _jit_build()
    if module is not None:
        return module, ExtensionStatus("jit", f"{prebuilt_missing}; built from {find_csrc()} at first use")
    reason = f"{prebuilt_missing}; {jit_failure}"
    warnings.warn(
        f"zerokit is using its pure-Python CPU Adam and file I/O, which are much slower: {reason}. "
        "Build the extension with `pip install --no-build-isolation .` (needs a C++ compiler).",
        RuntimeWarning,
        stacklevel=3,
    )
    return importlib.import_module("offload.fallback"), ExtensionStatus("python", reason)


def _jit_build() -> tuple[Optional[ModuleType], str]:
    """The JIT-built module, or None and why it could not be built."""
    if os.environ.get(JIT_ENV, "1") == "0":
        return None, f"the JIT build is disabled ({JIT_ENV}=0)"
    csrc = find_csrc()
    if csrc is None:
        return None, "the C++ sources (csrc/) are not shipped with this installation, so there is nothing to JIT-build"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler}) on PATH for the JIT build"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed, which torch's JIT build needs (pip install ninja)"
    try:
        module = cpp_extension.load(
            name=JIT_MODULE_NAME,
            sources=[str(csrc / name) for name in NATIVE_SOURCES],
            extra_cflags=list(CXX_FLAGS),
            extra_ldflags=list(LINK_FLAGS),
            verbose=False,
        )
    except Exception as error:  # a failed compile raises whatever the toolchain gave; report it
        return None, f"the JIT build failed: {type(error).__name__}: {str(error).strip()[-2000:]}"
    return module, ""
