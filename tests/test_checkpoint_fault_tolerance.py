"""A rank dies mid-run under `torchrun --max-restarts=1`; the restarted job resumes from the last
complete checkpoint (data position included) and ends exactly where an uninterrupted run ends:
the same final loss and bit-identical final weights."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from zerokit.checkpoint.reader import CheckpointReader
from zerokit.checkpoint.sources import CheckpointSource, read_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--steps", "16", "--layers", "2", "--dim", "64", "--seq-len", "32", "--micro-batch", "4", "--log-every", "8",
         "--save-every", "4"]


def torchrun(*extra: str, restarts: int = 0) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(restarts), os.path.join(ROOT, "examples", "train_gpt.py"), *TRAIN, *extra]
    # torchrun's workers otherwise share its rendezvous store, whose keys a restarted job may read
    # stale (pytorch/pytorch#135712): the restarted ranks then connect to dead addresses.
    environment = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=environment)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def final_loss(output: str) -> str:
    return re.findall(r"step +16/16 \(100%\)  loss (\d+\.\d+)", output)[-1]


def final_weights(directory) -> dict[str, torch.Tensor]:
    return read_state_dict(CheckpointSource(CheckpointReader(os.path.join(directory, "global_step16"))))


def test_killed_rank_resumes_from_the_last_checkpoint(tmp_path) -> None:
    uninterrupted = torchrun("--checkpoint-dir", str(tmp_path / "uninterrupted"))
    restarted = torchrun("--checkpoint-dir", str(tmp_path / "restarted"), "--resume", "--async-save",
                         "--simulate-failure", "10", restarts=1)
    assert "resumed from" not in uninterrupted
    assert f"resumed from {tmp_path / 'restarted'} at step 8" in restarted  # rank 1 died after step 10
    assert final_loss(restarted) == final_loss(uninterrupted)
    expected, resumed = final_weights(tmp_path / "uninterrupted"), final_weights(tmp_path / "restarted")
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
