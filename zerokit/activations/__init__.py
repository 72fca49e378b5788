"""Activation memory: where the tensors that transformer blocks save for backward are kept.

``apply_activation_memory(model, config, device)`` attaches hooks to the blocks of a model (the
repeated blocks of a ModuleList, or the classes named in the config) and returns an
``ActivationManager``; ``manager.remove()`` detaches them. Per block the policy is keep,
recompute (activation checkpointing), swap (to host memory) or memo (MEMO's token-wise swapping
and recomputation), chosen by ``ActivationMemoryConfig``.
"""
from zerokit.activations.config import ActivationMemoryConfig
from zerokit.activations.manager import ActivationManager, apply_activation_memory
from zerokit.activations.record import BlockReport

__all__ = ["ActivationManager", "ActivationMemoryConfig", "BlockReport", "apply_activation_memory"]
