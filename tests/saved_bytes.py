"""What a model really saves for backward in one forward on the CPU, the figure the estimator's
meta-device trace is checked against."""
from __future__ import annotations

import torch

from zerokit.profiler.models import training_loss
from zerokit.zero.units import plan_units


def saved_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[list[int], int]:
    """Bytes saved for backward in one real forward (training_loss), per block and outside
    blocks: saved-tensor hooks, one count per storage, parameters and the token ids left out (the
    estimate counts neither as activations)."""
    blocks = [spec.module for spec in plan_units(model) if spec.name]
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()} | {tokens.untyped_storage().data_ptr()}
    current: list = [None]
    saved: dict = {}
    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=index: current.__setitem__(0, i)))
        handles.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved.setdefault(current[0], {})[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        training_loss(model, tokens)
    for handle in handles:
        handle.remove()
    return [sum(saved[i].values()) for i in range(len(blocks))], sum(saved.get(None, {}).values())
