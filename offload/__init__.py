"""CPU and NVMe offload engine used by zerokit's ZeRO engine."""
