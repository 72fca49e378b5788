"""Plan cache: round trips, key stability, atomic writes, corrupt files."""
import json
import os

import pytest
import torch
from torch import nn

from planner import (
    BlockPhase,
    DsaConfig,
    PlanCache,
    PlanCacheWarning,
    TensorLifetime,
    device_name,
    plan_iteration,
    plan_key,
    solve_dsa,
)


def offset_plan():
    tensors = [TensorLifetime("a", 1000, 0, 3), TensorLifetime("b", 2048, 1, 4), TensorLifetime("c", 512, 3, 5)]
    return solve_dsa(tensors, DsaConfig(time_limit_s=1))


def iteration_plan():
    inner = (TensorLifetime("x", 4096, 0, 2), TensorLifetime("y", 1024, 1, 3))
    phases = [BlockPhase("layer0.forward", 0, inner), BlockPhase("layer0.backward", 2, inner)]
    return plan_iteration(phases, [TensorLifetime("saved", 2048, 0, 3)], DsaConfig(time_limit_s=1))


def test_round_trip_is_identical(tmp_path):
    cache = PlanCache(tmp_path)
    for key, plan in (("offsets", offset_plan()), ("iteration", iteration_plan())):
        assert cache.load(key) is None
        path = cache.store(key, plan)
        assert path == tmp_path / f"{key}.json" and path.exists()
        loaded = cache.load(key)
        assert loaded == plan and type(loaded) is type(plan)
        assert json.loads(path.read_text())["schema_version"] == 1
    # no temporary files are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iteration.json", "offsets.json"]


def test_store_replaces_and_load_or_make_plans_once(tmp_path):
    cache = PlanCache(tmp_path / "nested" / "dir")
    calls = []

    def make():
        calls.append(1)
        return offset_plan()

    first = cache.load_or_make("k", make)
    second = cache.load_or_make("k", make)
    assert first == second and len(calls) == 1
    other = iteration_plan()
    cache.store("k", other)
    assert cache.load("k") == other


def test_key_is_stable_and_sensitive():
    def key(model=None, shapes=((4, 16, 8),), dtype=torch.bfloat16, device="NVIDIA H100 80GB HBM3", extra=None):
        model = model or nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        return plan_key(model, shapes, dtype, device, extra)

    torch.manual_seed(1)
    reference = key()
    torch.manual_seed(2)
    assert key() == reference  # weights do not matter, only classes and shapes
    # the same inputs give the same digest in every process and version
    assert reference == "34ee1275cc73afb7c53c1d22a12ca76fe09da5a3a382b413e2c8ee036cedd49c"
    changed = {
        key(shapes=((4, 32, 8),)),
        key(dtype=torch.float32),
        key(device="cpu"),
        key(model=nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))),
        key(model=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))),
        key(model=nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.Dropout())),
        key(extra={"alignment": 512}),
    }
    assert reference not in changed and len(changed) == 7
    assert device_name("cpu") == "cpu"


def test_corrupt_files_are_reported_and_ignored(tmp_path):
    cache = PlanCache(tmp_path)
    good = offset_plan()
    document = json.loads(cache.store("k", good).read_text())
    bad_documents = {
        "truncated": cache.path("k").read_text()[:40],
        "not json": "\x00\x01garbage",
        "wrong schema": json.dumps({**document, "schema_version": 999}),
        "wrong key": json.dumps({**document, "key": "other"}),
        "missing field": json.dumps({**document, "plan": {"offsets": {}}}),
        "overlapping offsets": json.dumps({**document, "plan": {**document["plan"], "offsets": dict.fromkeys("abc", 0)}}),
        "not an object": "[1, 2, 3]",
    }
    for reason, text in bad_documents.items():
        cache.path("k").write_text(text)
        with pytest.warns(PlanCacheWarning, match="ignoring plan cache file"):
            assert cache.load("k") is None, reason
    # the run goes on: a fresh plan replaces the corrupt file
    with pytest.warns(PlanCacheWarning):
        replanned = cache.load_or_make("k", offset_plan)
    assert replanned.offsets == good.offsets and cache.load("k") == replanned


def test_bad_keys_and_plans_are_rejected(tmp_path):
    cache = PlanCache(tmp_path)
    with pytest.raises(ValueError, match="cache key"):
        cache.path("../escape")
    with pytest.raises(TypeError, match="OffsetPlan or IterationPlan"):
        cache.store("k", {"not": "a plan"})


def test_default_directory_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROKIT_PLAN_CACHE", str(tmp_path / "plans"))
    assert PlanCache().directory == tmp_path / "plans"
    monkeypatch.delenv("ZEROKIT_PLAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert PlanCache().directory == tmp_path / "zerokit" / "plans"
    assert os.fspath(PlanCache(str(tmp_path)).directory) == str(tmp_path)
