"""Importing DeepSpeed ZeRO checkpoints (stages 1, 2, 3) into an engine.

The checkpoints here are synthetic, laid out as DeepSpeed's save code lays them out
(DeepSpeedEngine._save_checkpoint / _save_zero_checkpoint, the ZeRO-1/2 optimizer's state_dict
with its partitioning and paddings, ZeRO-3's rigid state_dict with per-parameter partitions
and sub-groups), and pickled with DeepSpeed's classes (stand-ins registered under DeepSpeed's
module names) so the importer must read them without DeepSpeed installed.
"""
from __future__ import annotations

import collections
import enum
import math
import os
import sys
import types

import pytest
import torch

import zerokit
from tests.models import AwkwardLM
from zerokit.checkpoint import CheckpointError
from zerokit.checkpoint.deepspeed import DeepSpeedSource
from zerokit.checkpoint.full_state import import_deepspeed_checkpoint

WORLD = 2
DS_VERSION = "0.19.8"


class ZeroStageEnum(int, enum.Enum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class DynamicLossScaler:
    def __init__(self):
        self.cur_scale = 65536.0
        self.cur_iter = 7


@pytest.fixture
def deepspeed_classes(monkeypatch):
    """DeepSpeed's module names, for pickling only; removed again before anything is imported."""
    modules = {name: types.ModuleType(name) for name in (
        "deepspeed", "deepspeed.runtime", "deepspeed.runtime.zero", "deepspeed.runtime.zero.config",
        "deepspeed.runtime.fp16", "deepspeed.runtime.fp16.loss_scaler")}
    homes = ((ZeroStageEnum, "deepspeed.runtime.zero.config"), (DynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler"))
    for cls, module in homes:
        monkeypatch.setattr(cls, "__module__", module)
        setattr(modules[module], cls.__name__, cls)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield
    monkeypatch.undo()


def _model() -> AwkwardLM:
    torch.manual_seed(3)
    return AwkwardLM()


def _trainable_and_frozen(model: torch.nn.Module):
    named = list(model.named_parameters())  # deduplicated, as DeepSpeed's param_names
    return [(n, p) for n, p in named if p.requires_grad], [(n, p) for n, p in named if not p.requires_grad]


def _shared_params(model: torch.nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    shared = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            shared[name] = first[id(param)]
        else:
            first[id(param)] = name
    return shared


def _buffers(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_buffers()]


def _model_states(model, compute_dtype, param_shapes, frozen_shapes, frozen_fragments, shared, stage3: bool) -> dict:
    module = {k: v.to(compute_dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    if stage3:  # ZeRO-3 modules hold empty placeholders instead of parameters
        buffers = set(_buffers(model))
        module = {k: v if k in buffers else torch.empty(0, dtype=compute_dtype) for k, v in module.items()}
    return dict(module=module, buffer_names=_buffers(model), optimizer=None, param_shapes=param_shapes,
                frozen_param_shapes=frozen_shapes, shared_params=shared, frozen_param_fragments=frozen_fragments,
                lr_scheduler=None, data_sampler=None, random_ltd=None, skipped_steps=0, global_steps=10,
                global_samples=80, dp_world_size=WORLD, mp_world_size=1, ds_config={"train_batch_size": 8},
                ds_version=DS_VERSION)


def save_stage12(directory: str, model: torch.nn.Module, stage: int, compute_dtype: torch.dtype,
                 parameter_alignment: bool) -> None:
    """DeepSpeedZeroOptimizer: one parameter group, flattened with per-parameter paddings and
    aligned to 2 x world size, split evenly; each rank saves its fp32 partition without padding."""
    trainable, frozen = _trainable_and_frozen(model)
    element_size = torch.tensor([], dtype=compute_dtype).element_size()
    param_alignment = 16 // math.gcd(16, element_size) if parameter_alignment else 1
    paddings, offset, pieces = [], 0, []
    for index, (_, param) in enumerate(trainable):
        offset += param.numel()
        padding = 0 if index == len(trainable) - 1 else (-offset) % param_alignment
        paddings.append(padding)
        offset += padding
        pieces += [param.detach().reshape(-1).float(), torch.zeros(padding)]
    padded_group_numel = offset
    alignment = 2 * WORLD
    flat = torch.cat(pieces)
    flat = torch.cat([flat, torch.zeros((-flat.numel()) % alignment)])
    part = flat.numel() // WORLD
    prefix = "bf16_" if compute_dtype == torch.bfloat16 else ""
    for rank in range(WORLD):
        left = rank * part
        if padded_group_numel <= left:
            group_padding = part
        elif padded_group_numel < left + part:
            group_padding = left + part - padded_group_numel
        else:
            group_padding = 0
        partition = flat[left : left + part]
        state = {
            "loss_scaler": DynamicLossScaler(), "dynamic_loss_scale": True, "overflow": False, "clip_grad": 1.0,
            "base_optimizer_state": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(part)}},
                                     "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "single_partition_of_fp32_groups": [partition[: part - group_padding].clone()],
            "zero_stage": ZeroStageEnum(stage), "group_paddings": [group_padding],
            "param_alignment_paddings": [paddings], "partition_count": [WORLD], "ds_version": DS_VERSION,
            "param_slice_mappings": [{}],
        }
        torch.save({"optimizer_state_dict": state, "ds_config": {"train_batch_size": 8}, "ds_version": DS_VERSION},
                   os.path.join(directory, f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    param_shapes = [collections.OrderedDict((name, param.shape) for name, param in trainable)]
    frozen_shapes = frozen_fragments = None
    if stage == 2:  # frozen parameters are saved from ZeRO-2 on, whole
        frozen_shapes = collections.OrderedDict((name, param.shape) for name, param in frozen)
        frozen_fragments = collections.OrderedDict((name, param.detach().to(compute_dtype)) for name, param in frozen)
    states = _model_states(model, compute_dtype, param_shapes, frozen_shapes, frozen_fragments, _shared_params(model), False)
    torch.save(states, os.path.join(directory, "mp_rank_00_model_states.pt"))


def save_stage3(directory: str, model: torch.nn.Module, compute_dtype: torch.dtype, sub_group_size: int) -> None:
    """DeepSpeedZeroOptimizer_Stage3: every parameter split into ceil(numel / world) elements per
    rank (the last zero-padded); sub-groups of parameters, each one fp32 flat tensor per rank."""
    trainable, frozen = _trainable_and_frozen(model)

    def partitions(param: torch.Tensor) -> list[torch.Tensor]:
        size = -(-param.numel() // WORLD)
        flat = param.detach().reshape(-1).float()
        flat = torch.cat([flat, torch.zeros(size * WORLD - flat.numel())])
        return [flat[r * size : (r + 1) * size] for r in range(WORLD)]

    sub_groups, current, numel = [], [], 0
    for name, param in trainable:  # _create_fp16_sub_groups
        current.append((name, param))
        numel += -(-param.numel() // WORLD)
        if numel >= sub_group_size:
            sub_groups.append(current)
            current, numel = [], 0
    if current:
        sub_groups.append(current)
    param_shapes = [collections.OrderedDict((n, p.shape) for n, p in group) for group in sub_groups]
    frozen_shapes = collections.OrderedDict((name, param.shape) for name, param in frozen)
    shared = _shared_params(model)
    for rank in range(WORLD):
        flats = [torch.cat([partitions(p)[rank] for _, p in group]) for group in sub_groups]
        state = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": DynamicLossScaler(), "dynamic_loss_scale": True,
                 "overflow": False, "partition_count": WORLD,
                 "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-3, "params": []}]},
                 "fp32_flat_groups": flats}
        torch.save({"optimizer_state_dict": state, "ds_config": {}, "ds_version": DS_VERSION},
                   os.path.join(directory, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        fragments = collections.OrderedDict((n, partitions(p)[rank].to(compute_dtype)) for n, p in frozen)
        states = _model_states(model, compute_dtype, param_shapes, frozen_shapes, fragments,
                               shared if rank == 0 else {}, True)
        torch.save(states, os.path.join(directory, f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"))


def _engine(stage: int = 3) -> zerokit.Engine:
    torch.manual_seed(11)  # other initial weights than the checkpoint's
    model = AwkwardLM()
    return zerokit.initialize(model, torch.optim.AdamW(model.parameters()), {"zero_optimization": {"stage": stage}})


def _expected(model: torch.nn.Module, frozen_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if frozen_dtype is not None:  # DeepSpeed keeps frozen parameters in the compute dtype only
        for name, param in model.named_parameters():
            if not param.requires_grad:
                state[name] = param.detach().to(frozen_dtype).float()
    return state


CASES = {
    # name: (save function, dtype of saved frozen values)
    "stage1": (lambda d, m: save_stage12(d, m, 1, torch.bfloat16, parameter_alignment=False), torch.bfloat16),
    "stage2_aligned": (lambda d, m: save_stage12(d, m, 2, torch.bfloat16, parameter_alignment=True), torch.bfloat16),
    "stage3_sub_groups": (lambda d, m: save_stage3(d, m, torch.float16, sub_group_size=600), torch.float16),
}


@pytest.mark.parametrize("case", CASES)
def test_import_deepspeed_checkpoint(deepspeed_classes, tmp_path, case: str) -> None:
    save, frozen_dtype = CASES[case]
    model = _model()
    tag_dir = tmp_path / "global_step10"
    tag_dir.mkdir()
    save(str(tag_dir), model)
    (tmp_path / "latest").write_text("global_step10")
    for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
        del sys.modules[name]  # the importer must not need DeepSpeed

    source = DeepSpeedSource(tmp_path)
    expected = _expected(model, frozen_dtype)
    assert source.aliases == {"head.weight": "embed.weight"}
    for name in source.names():  # ranged reads across partitions, groups and ranks
        full = expected[name].reshape(-1)
        for start, stop in ((0, full.numel()), (1, full.numel() - 1), (full.numel() // 3, full.numel() // 2 + 1)):
            assert torch.equal(source.read(name, start, stop).float(), full[start:stop].float()), (name, start, stop)

    engine = _engine()
    import_deepspeed_checkpoint(engine, tmp_path)
    loaded = engine.full_state_dict()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_missing_deepspeed_rank_file(deepspeed_classes, tmp_path) -> None:
    save_stage3(str(tmp_path), _model(), torch.float16, sub_group_size=10**9)
    os.remove(tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"should hold 2 '\*_optim_states.pt' files \(one per rank\) but holds 1"):
        import_deepspeed_checkpoint(_engine(), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no '\\*_optim_states.pt' files and no 'latest' file"):
        import_deepspeed_checkpoint(_engine(), tmp_path / "empty")
