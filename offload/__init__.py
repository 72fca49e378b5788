"""CPU and NVMe offload engine used by zerokit's ZeRO engine.

Building blocks (one concern per module):
- extension: loads the native ops (prebuilt zerokit._C, JIT build of csrc/, or pure Python).
- cpu_adam: fused CPU Adam/AdamW, per tile (adam_step_tile) and as an Optimizer (CPUAdam).
- host_memory, pinned_pool: aligned, pinned host buffers and a budgeted pool of them.
- copy_engine: asynchronous host<->device copies on dedicated streams.
- aio, nvme: asynchronous O_DIRECT file I/O and the NVMe tensor swapper built on it.
"""
