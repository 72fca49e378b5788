"""Bad offload input fails in zerokit.initialize, before anything is allocated or written, with a
message that says what is wrong, the bytes involved and what to change."""
from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

import zerokit
from offload.nvme import NVMePathError
from tests.models import AwkwardLM
from zerokit.config import Config, ConfigError
from zerokit.zero.memory import HostMemoryError, model_state_bytes
from zerokit.zero.policy import OffloadPolicy, ShardingPolicy
from zerokit.zero.units import plan_units


def _initialize(zero: dict, optimizer: type = torch.optim.AdamW, **options) -> zerokit.Engine:
    torch.manual_seed(0)
    model = AwkwardLM()
    return zerokit.initialize(model, optimizer(model.parameters(), lr=1e-3, **options), {"zero_optimization": zero})


def _nvme(path, **extra) -> dict:
    return {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": str(path), **extra}}


def _plan(zero: dict):
    config = Config.load({"zero_optimization": zero}).zero_optimization
    return model_state_bytes(plan_units(AwkwardLM()), ShardingPolicy.from_config(config), torch.float32, 1, 0,
                             offload=OffloadPolicy.from_config(config), pin=False)  # fmt: skip


def test_missing_nvme_path(tmp_path) -> None:
    with pytest.raises(NVMePathError, match=r"offload_optimizer\.nvme_path .* does not exist; create it"):
        _initialize(_nvme(tmp_path / "missing"))


def test_nvme_path_that_is_a_file(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NVMePathError, match="is not a directory"):
        _initialize(_nvme(tmp_path / "file"))


def test_unwritable_nvme_path(tmp_path, monkeypatch) -> None:
    # os.access stands in for permissions, which do not stop root
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: False)
    with pytest.raises(NVMePathError, match="is not writable"):
        _initialize(_nvme(tmp_path))
    assert os.listdir(tmp_path) == []


def test_nvme_path_too_small(tmp_path, monkeypatch) -> None:
    zero = _nvme(tmp_path)
    needed = _plan(zero).offload.optimizer_nvme_bytes
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=needed - 1))
    with pytest.raises(NVMePathError, match=rf"has {needed - 1} bytes .* free, but {needed} bytes"):
        _initialize(zero)
    assert os.listdir(tmp_path) == []


def test_one_directory_for_both_is_checked_for_the_sum(tmp_path, monkeypatch) -> None:
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0,
            "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)},
            "offload_param": {"device": "nvme", "nvme_path": str(tmp_path), "max_in_cpu": 0}}  # fmt: skip
    plan = _plan(zero).offload
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=plan.optimizer_nvme_bytes))
    with pytest.raises(NVMePathError, match=f"{plan.optimizer_nvme_bytes + plan.param_nvme_bytes} bytes"):
        _initialize(zero)


def test_host_budget_too_small(tmp_path) -> None:
    zero = {**_nvme(tmp_path), "host_memory_budget": 4096}
    needed = _plan(zero).offload.host_total
    with pytest.raises(HostMemoryError) as error:
        _initialize(zero)
    message = str(error.value)
    assert f"needs {needed} bytes" in message and f"raise it to at least {needed}" in message
    assert "host_memory_budget is 4096 bytes" in message
    assert os.listdir(tmp_path) == []  # no swap file was created


def test_budget_that_holds_the_plan_exactly_is_enough() -> None:
    zero = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    engine = _initialize({**zero, "host_memory_budget": _plan(zero).offload.host_total})
    assert engine.memory_breakdown()["host_master_weights"] > 0


def test_staging_buffer_smaller_than_a_shard(tmp_path) -> None:
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0,
            "offload_param": {"device": "nvme", "nvme_path": str(tmp_path), "max_in_cpu": 0, "buffer_size": 100}}
    largest = _plan(zero).offload.largest_nvme_shard
    with pytest.raises(ValueError, match=f"raise buffer_size to at least {largest}"):
        _initialize(zero)


def test_parameter_offload_needs_stage_3() -> None:
    with pytest.raises(ConfigError, match="needs stage 3"):
        _initialize({"stage": 2, "offload_param": {"device": "cpu"}})


@pytest.mark.parametrize("optimizer, options, message", [
    (torch.optim.SGD, {}, "optimizer is SGD: use torch.optim.AdamW"),
    (torch.optim.RMSprop, {}, "optimizer is RMSprop"),
    (torch.optim.AdamW, {"amsgrad": True}, "amsgrad=True"),
])  # fmt: skip
def test_optimizer_offload_needs_adam(optimizer, options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _initialize({"stage": 2, "offload_optimizer": {"device": "cpu"}}, optimizer, **options)


def test_config_optimizer_must_be_adam() -> None:
    config = {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape("optimizer.type is 'SGD'")):
        zerokit.initialize(AwkwardLM(), None, config)
