"""Export writes consolidated weights that a plain model loads with strict=True and Hugging Face
`from_pretrained` loads as it loads its own files (tied weights once); importing them, or a
`save_pretrained` folder, puts each value back into the engine's shards."""
from __future__ import annotations

import json
import os

import pytest
import torch

import zerokit
from tests.models import AwkwardLM, batches, lm_loss
from zerokit.checkpoint import save_checkpoint
from zerokit.checkpoint.export import export_checkpoint, parse_size
from zerokit.checkpoint.full_state import load_full_state_dict
from zerokit.checkpoint.sources import read_state_dict
from zerokit.cli import main as cli


def trained_engine(model: torch.nn.Module, steps: int = 2, **inputs) -> zerokit.Engine:
    engine = zerokit.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                                {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    for tokens, targets in batches(steps, 4, vocab=50):
        output = engine(tokens, **inputs)
        loss = lm_loss(output if isinstance(output, torch.Tensor) else output.logits, targets)
        engine.backward(loss)
        engine.step()
    return engine


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> tuple[zerokit.Engine, str]:
    torch.manual_seed(0)
    engine = trained_engine(AwkwardLM())
    directory = str(tmp_path_factory.mktemp("awkward"))
    save_checkpoint(engine, directory)
    return engine, directory


@pytest.mark.parametrize("format", ["safetensors", "torch"])
def test_export_loads_into_a_plain_model(awkward, tmp_path, format: str) -> None:
    engine, directory = awkward
    written = export_checkpoint(directory, tmp_path, max_shard_size="6KB", format=format)
    stem = "model" if format == "safetensors" else "pytorch_model"
    index = json.loads((tmp_path / f"{stem}.{'safetensors' if format == 'safetensors' else 'bin'}.index.json").read_text())
    assert len(written) == len(set(index["weight_map"].values())) + 1 > 2  # sharded by size, plus the index
    expected = engine.full_state_dict()
    per_file: dict[str, int] = {}
    for name, file in index["weight_map"].items():
        if name != "head.weight":  # the tied alias shares embed.weight's bytes
            per_file[file] = per_file.get(file, 0) + expected[name].numel() * 4
    assert max(per_file.values()) <= 6000 and sum(per_file.values()) == index["metadata"]["total_size"]
    if format == "safetensors":
        assert "head.weight" not in index["weight_map"]  # tied: stored once, as save_pretrained does
    plain = AwkwardLM()
    plain.load_state_dict(read_state_dict(tmp_path), strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, expected[key]), key
    tokens = batches(1, 3)[0][0]
    engine.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), engine(tokens), rtol=0, atol=1e-6)
    engine.train()


def test_cli_export_in_bf16_to_one_torch_file(awkward, tmp_path, capsys) -> None:
    engine, directory = awkward
    tag_dir = os.path.join(directory, "global_step2")
    assert cli(["export", tag_dir, str(tmp_path), "--dtype", "bf16", "--format", "torch"]) == 0
    assert "pytorch_model.bin" in capsys.readouterr().out
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert state["head.weight"] is state["embed.weight"]  # torch files keep both names of a tied weight
    plain = AwkwardLM().to(torch.bfloat16)
    plain.load_state_dict(state, strict=True)
    for key, value in engine.full_state_dict().items():
        assert torch.equal(plain.state_dict()[key], value.to(torch.bfloat16)), key


def test_cli_export_reports_bad_input(tmp_path, capsys) -> None:
    assert cli(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "neither a checkpoint tag directory" in capsys.readouterr().err
    with pytest.raises(zerokit.checkpoint.CheckpointError, match="not a size"):
        parse_size("5 parsecs")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1024) == 1024


def test_imported_weights_land_in_the_shards(awkward, tmp_path) -> None:
    engine, directory = awkward
    export_checkpoint(directory, tmp_path, max_shard_size="6KB")
    torch.manual_seed(7)
    model = AwkwardLM()
    fresh = zerokit.initialize(model, torch.optim.AdamW(model.parameters()), {"zero_optimization": {"stage": 2}})
    load_full_state_dict(fresh, tmp_path)
    expected, loaded = engine.full_state_dict(), fresh.full_state_dict()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)
    shapes = r"with different shapes: embed\.weight: source \(50, 24\), model \(50, 16\)"
    with pytest.raises(zerokit.checkpoint.CheckpointError, match=shapes):
        model = AwkwardLM(dim=16)
        load_full_state_dict(zerokit.initialize(model, torch.optim.AdamW(model.parameters())), tmp_path)


def test_hugging_face_from_pretrained_of_an_export(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50, tie_word_embeddings=True)
    torch.manual_seed(0)
    engine = trained_engine(transformers.LlamaForCausalLM(config))
    save_checkpoint(engine, tmp_path / "checkpoint")
    config.save_pretrained(tmp_path / "config")
    assert cli(["export", str(tmp_path / "checkpoint"), str(tmp_path / "export"), "--config",
                str(tmp_path / "config" / "config.json")]) == 0

    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export")
    tokens = batches(1, 2, vocab=50)[0][0]
    engine.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, engine(tokens).logits, rtol=0, atol=1e-5)

    # the same tensors, under the same names, as Hugging Face's own save_pretrained
    loaded.save_pretrained(tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as theirs, \
            safe_open(tmp_path / "export" / "model.safetensors", "pt") as ours:
        assert set(theirs.keys()) == set(ours.keys())
        for key in theirs.keys():
            assert torch.equal(theirs.get_tensor(key), ours.get_tensor(key)), key

    # and a save_pretrained folder imports into an engine
    model = transformers.LlamaForCausalLM(config)
    fresh = zerokit.initialize(model, torch.optim.AdamW(model.parameters()), {"zero_optimization": {"stage": 3}})
    load_full_state_dict(fresh, tmp_path / "hf")
    expected, imported = engine.full_state_dict(), fresh.full_state_dict()
    assert all(torch.equal(expected[k], imported[k]) for k in expected)
