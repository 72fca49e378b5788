"""`zerokit estimate` on the command line: the table, the versioned JSON schema, and clear errors."""
from __future__ import annotations

import json

import pytest

from zerokit.cli import main
from zerokit.profiler.presets import PRESETS

HAND = "tests.test_profiler_estimate:hand_model"
ARGS = ["--gpus", "2", "--gpu-memory", "80GB", "--host-memory", "512GB", "--micro-batch", "2", "--seq", "16"]

# The schema's key set: removing or renaming a key, or changing what a row means, is a new schema
# version (2: assumptions' staging_buffers became offload_buffers; 3: workload.offload_ratio, with
# which the offload rows may offload only part of the optimizer); other keys were added within a
# version (workload.wtacrs_keep_ratio; workload.chunked_loss_tokens, keep_last and alpha;
# workload.restore_buffers; the
# offloads "nvme_optimizer" and "nvme_optimizer_cpu_params" added rows, not keys).
TOP = {"schema", "model", "workload", "hardware", "assumptions", "activations", "configurations", "recommended"}
MODEL = {"name", "parameters", "trainable_parameters", "blocks", "sharding_units"}
WORKLOAD = {
    "micro_batch", "seq", "dtype", "attention_kernels", "wtacrs_keep_ratio", "chunked_loss_tokens", "keep_last", "alpha",
    "offload_ratio", "restore_buffers",
}  # fmt: skip
HARDWARE = {"nodes", "gpus_per_node", "world_size", "gpu_memory_bytes", "host_memory_bytes", "nvme_bytes"}
# offload_buffers: the engine's offload buffer settings, which the offload rows follow
ASSUMPTIONS = {
    "gradient_accumulation_steps", "reduce_dtype", "optimizer", "allocator_overhead_fraction", "gpu_runtime_bytes",
    "host_runtime_bytes_per_rank", "reductions_in_flight", "offload_buffers", "costs",
}  # fmt: skip
ACTIVATIONS = {"largest_block", "outside_blocks_saved_bytes"}
BLOCK = {
    "saved_bytes", "private_bytes", "swappable_bytes", "attention_bytes", "input_bytes", "recompute_transient_bytes",
}  # fmt: skip
CONFIGURATION = {
    "stage", "offload", "activations", "supported", "note", "gpu", "host", "nvme", "peak_allocated_bytes", "fits",
    "relative_cost", "memo_alpha",
}  # fmt: skip
GPU = {"parameters", "master_weights", "gradients", "optimizer_states", "activations", "communication",
       "allocator_overhead", "runtime", "total"}  # fmt: skip
HOST = {"parameters", "master_weights", "gradients", "optimizer_states", "activations", "staging", "runtime", "total"}
NVME = {"parameters", "master_weights", "optimizer_states", "total"}
FITS = {"gpu", "host", "nvme", "all"}


def not_a_module() -> int:
    return 3


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["estimate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_schema_is_stable(capsys) -> None:
    code, out, _ = _run(capsys, "--model", HAND, *ARGS, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["schema"] == "zerokit.estimate/3"
    assert set(data) == TOP
    assert set(data["model"]) == MODEL and set(data["workload"]) == WORKLOAD and set(data["hardware"]) == HARDWARE
    assert set(data["assumptions"]) == ASSUMPTIONS and set(data["activations"]) == ACTIVATIONS
    assert set(data["activations"]["largest_block"]) == BLOCK
    assert len(data["configurations"]) == 4 * 6 * 4  # stages x offloads x activation policies
    for config in data["configurations"]:
        assert set(config) == CONFIGURATION
        assert set(config["gpu"]) == GPU and set(config["host"]) == HOST and set(config["nvme"]) == NVME
        assert set(config["fits"]) == FITS
        assert config["gpu"]["total"] == sum(v for k, v in config["gpu"].items() if k != "total")
    assert set(data["recommended"]) == {"stage", "offload", "activations"}
    assert data["hardware"]["gpu_memory_bytes"] == 80 * 10**9 and data["workload"]["dtype"] == "bf16"


def test_json_has_the_optimizer_on_nvme(capsys) -> None:
    code, out, _ = _run(capsys, "--model", HAND, *ARGS, "--nvme", "1TB", "--json")
    assert code == 0
    data = json.loads(out)
    rows = {(c["stage"], c["activations"]): c for c in data["configurations"] if c["offload"] == "nvme_optimizer"}
    assert len(rows) == 16 and not rows[(0, "none")]["supported"]
    row = rows[(2, "none")]
    assert row["supported"] and row["fits"]["all"]
    assert row["gpu"]["master_weights"] == row["gpu"]["optimizer_states"] == 0
    assert row["nvme"]["master_weights"] > 0 and row["nvme"]["optimizer_states"] == 2 * row["nvme"]["master_weights"]
    assert row["host"]["staging"] > 0 and row["host"]["gradients"] > 0
    costs = data["assumptions"]["costs"]["offload"]
    assert costs["cpu_optimizer"] < costs["cpu_optimizer_params"] < costs["nvme_optimizer"] < costs["nvme"]


def test_offload_ratio_reaches_the_workload(capsys) -> None:
    code, out, _ = _run(capsys, "--model", HAND, *ARGS, "--offload-ratio", "0.5", "--json")
    assert code == 0 and json.loads(out)["workload"]["offload_ratio"] == 0.5
    code, out, err = _run(capsys, "--model", HAND, *ARGS, "--offload-ratio", "0")
    assert code == 2 and out == "" and "offload_ratio" in err


def test_table_marks_the_recommendation(capsys) -> None:
    code, out, _ = _run(capsys, "--model", HAND, *ARGS)
    assert code == 0
    assert "stage  offload" in out and "GPU alloc" in out
    assert "* recommended: stage 1, offload none, activations none" in out
    assert "\n*1     none" in out
    assert "not listed:" in out and "its breakdown" in out


def test_nothing_fits_says_what_to_do(capsys) -> None:
    code, out, _ = _run(capsys, "--model", HAND, *ARGS, "--gpu-memory", "1MiB")
    assert code == 0 and "nothing fits" in out and "use more GPUs" in out


def test_hugging_face_config_path(capsys, tmp_path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=300).save_pretrained(tmp_path)  # fmt: skip
    for model in (tmp_path / "config.json", tmp_path):
        code, out, err = _run(capsys, "--model", str(model), *ARGS, "--json")
        assert code == 0, err
        data = json.loads(out)
        assert data["model"]["blocks"] == 2
        assert data["model"]["parameters"] == 2 * 300 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 176 + 2 * 64) + 64


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("llama-1t", "not a preset (" + ", ".join(PRESETS)),
        ("nowhere/config.json", "not an existing config.json"),
        ("tests.no_such_module:build", "cannot import 'tests.no_such_module'"),
        ("tests.test_profiler_estimate:no_such_function", "has no callable 'no_such_function'"),
        ("tests.test_profiler_estimate:HAND", "has no callable 'HAND'"),
        ("tests.test_cli_estimate:not_a_module", "returned int, not a torch.nn.Module"),
    ],
)
def test_bad_models_give_clear_errors(capsys, model: str, message: str) -> None:
    code, out, err = _run(capsys, "--model", model, *ARGS)
    assert code == 2 and out == ""
    assert message in err and err.startswith("zerokit estimate: ")


def test_bad_paths_and_sizes_give_clear_errors(capsys, tmp_path) -> None:
    code, _, err = _run(capsys, "--model", str(tmp_path), *ARGS)
    assert code == 2 and "has no config.json" in err
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    code, _, err = _run(capsys, "--model", str(tmp_path / "config.json"), *ARGS)
    assert code == 2 and "is not a Hugging Face model config" in err
    code, _, err = _run(capsys, "--model", HAND, *ARGS, "--gpu-memory", "lots")
    assert code == 2 and "cannot read size 'lots'" in err and "80GiB" in err
