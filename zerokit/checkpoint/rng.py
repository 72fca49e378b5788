"""Random number generator states as JSON: Python's, NumPy's (when installed), torch's CPU
generator and the rank's CUDA generator (when on CUDA)."""
from __future__ import annotations

import base64
import random
from typing import Any, Optional

import torch

try:
    import numpy
except ImportError:  # numpy is optional
    numpy = None


def capture_rng(device: torch.device) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": _encode(torch.get_rng_state()),
    }
    if numpy is not None:
        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]
    if device.type == "cuda":
        state["cuda"] = _encode(torch.cuda.get_rng_state(device))
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(_decode(state["torch"]))
    if numpy is not None and "numpy" in state:
        kind, keys, position, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), position, has_gauss, cached))
    cuda: Optional[str] = state.get("cuda")
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(_decode(cuda), device)


def _encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(bytes(tensor.cpu().tolist())).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()
