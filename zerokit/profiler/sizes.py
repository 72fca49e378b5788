"""Sizes on the command line ("80GB", "512GiB") and in tables."""
from __future__ import annotations

import re

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*$")
GiB = 2**30


def parse_size(text: str) -> int:
    """Bytes of "80GB" (10^9 bytes each), "80GiB" (2^30 bytes each), "1.5TB", or a plain byte count."""
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read size {text!r}: write a number and a unit, such as 80GB (10^9 bytes) or 80GiB (2^30 bytes)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}"
