"""The README's main job: the example GPT trains on two CPU ranks and its loss falls."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("extra", [[], ["--stage", "2", "--meta-init", "--grad-accum", "2", "--checkpoint-activations"]])
def test_train_gpt_two_ranks(extra: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               os.path.join(ROOT, "examples", "train_gpt.py"), "--steps", "40", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", done.stdout)]
    assert len(losses) == 4 and "done: 40 steps" in done.stdout
    assert losses[-1] < 0.8 * losses[0], done.stdout
    assert re.search(r"mem MiB r0:\d+ r1:\d+", done.stdout)  # memory of every rank
