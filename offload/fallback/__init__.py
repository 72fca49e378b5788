"""Pure-Python implementation of the native ops in csrc/, with the same names and signatures.

Used when the C++ extension can neither be imported nor built (offload/extension.py).
"""
from offload.fallback.adam import adam_simd_level, adam_step
from offload.fallback.aio import IoFile, IoPool, IoRequest
from offload.fallback.host_memory import allocate_host, cuda_host_register_unavailable_reason
from offload.raw_memory import IO_ALIGNMENT

__all__ = [
    "IO_ALIGNMENT",
    "IoFile",
    "IoPool",
    "IoRequest",
    "adam_simd_level",
    "adam_step",
    "allocate_host",
    "cuda_host_register_unavailable_reason",
]
