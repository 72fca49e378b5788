"""Config: DeepSpeed JSON loads, zerokit keys work, and bad keys or values fail clearly."""
from __future__ import annotations

import json

import pytest
import torch

from zerokit import Config, ConfigError

DEEPSPEED_JSON = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 8,
    "gradient_clipping": 1.0,
    "steps_per_print": 100,
    "wall_clock_breakdown": False,
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 100, "total_num_steps": 1000,
                                                       "warmup_max_lr": 3e-4}},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
        "stage3_prefetch_bucket_size": 5e7,
        "stage3_param_persistence_threshold": 1e5,
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def test_deepspeed_json_file_loads(tmp_path) -> None:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(DEEPSPEED_JSON))
    config = Config.load(str(path))
    assert config.zero_optimization.stage == 3
    assert config.zero_optimization.reduce_bucket_size == 500_000_000  # 5e8 from JSON is an integer count
    assert config.compute_dtype is torch.bfloat16
    assert config.reduce_dtype is torch.float32  # fp32 reduction by default
    assert config.optimizer.params["betas"] == [0.9, 0.95]
    assert config.resolve_batch(world_size=2).train_batch_size == 64
    assert Config.load(config.to_dict()) == config  # round trip through plain data


def test_config_is_frozen_and_typed() -> None:
    config = Config.load({"zero_optimization": {"stage": 2}})
    with pytest.raises(Exception):
        config.gradient_clipping = 2.0
    assert Config.load(config) is config
    assert Config.load(None) == Config()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"zero_optimization": {"stag": 2}}, "did you mean 'zero_optimization.stage'"),
        ({"gradient_clip": 1.0}, "did you mean 'gradient_clipping'"),
        ({"bf16": {"enable": True}}, "did you mean 'bf16.enabled'"),
        # offload needs sharded states: optimizer offload stage >= 1, parameter offload stage 3
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "set zero_optimization.stage to 1, 2 or 3"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "needs stage 3"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}, "no nvme_path is set"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "expected none, cpu or nvme"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"delayed_parameter_update_after": 2}}},
         "offload_optimizer.device is none"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 1.3}}},
         "expected a fraction in (0, 1]"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "buffer_count": 1}}},
         "buffer_count=1"),
        ({"zero_optimization": {"stage": 2, "cpu_offload": True}}, "use offload_optimizer"),
        ({"zero_optimization": {"stage": 2, "host_memory_budget": 0}}, "host_memory_budget=0"),
        ({"zero_optimization": {"stage": 4}}, "expected 0, 1, 2 or 3"),
        ({"zero_optimization": {"stage": "3"}}, "expected an integer"),
        ({"zero_optimization": {"overlap_comm": 1}}, "expected true or false"),
        ({"train_micro_batch_size_per_gpu": "auto"}, "Hugging Face Trainer"),
        ({"gradient_clipping": -1}, "gradient_clipping=-1"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "enable at most one"),
        ({"communication_data_type": "fp8"}, "one of fp32, bf16, fp16"),
        ({"zero_optimization": 3}, "must be a section"),
    ],
)
def test_bad_config_fails_clearly(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        Config.load(raw)
    assert message.lower() in str(error.value).lower()


def test_deepspeed_offload_sections_load() -> None:
    config = Config.load({"zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True, "buffer_count": 4,
                              "fast_init": False, "pipeline_read": True, "pipeline_write": True},
        "offload_param": {"device": "cpu", "pin_memory": True, "buffer_count": 5, "buffer_size": 1e8,
                          "max_in_cpu": 1e9},
        "host_memory_budget": 64 * 2**30,
    }})  # fmt: skip
    zero = config.zero_optimization
    assert (zero.offload_optimizer.device, zero.offload_optimizer.nvme_path) == ("nvme", "/local_nvme")
    assert (zero.offload_param.device, zero.offload_param.buffer_size, zero.offload_param.max_in_cpu) == (
        "cpu", 100_000_000, 1_000_000_000)
    assert zero.host_memory_budget == 64 * 2**30
    assert Config.load(config.to_dict()) == config


def test_missing_or_broken_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.load(str(broken))


@pytest.mark.parametrize(
    "raw, world, expected",
    [
        ({"train_micro_batch_size_per_gpu": 4}, 2, (8, 4, 1)),
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),
        ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
    ],
)
def test_batch_triple_resolution(raw: dict, world: int, expected: tuple) -> None:
    config = Config.load(raw).resolve_batch(world)
    assert (config.train_batch_size, config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == expected


def test_inconsistent_batch_sizes() -> None:
    with pytest.raises(ConfigError, match="make them agree"):
        Config.load({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}).resolve_batch(2)
    with pytest.raises(ConfigError, match="not a multiple"):
        Config.load({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}).resolve_batch(2)
