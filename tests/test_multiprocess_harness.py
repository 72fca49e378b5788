"""The test harness's process worlds: a rank that fails stops the world at once, with its error,
instead of leaving the others waiting in a collective until their timeout (as a world of two on a
machine with one GPU does: rank 1 refuses to start, rank 0 waits in NCCL's rendezvous)."""
import time

import pytest

from tests.multiprocess import run_world


def _fails_on_rank_1(rank):
    if rank == 1:
        raise RuntimeError("rank one cannot start")
    time.sleep(120)  # stands for a collective that waits for rank 1
    return rank


def test_a_failing_rank_stops_the_world_at_once():
    start = time.monotonic()
    with pytest.raises(AssertionError) as error:
        run_world(_fails_on_rank_1, 2)
    assert time.monotonic() - start < 60
    assert "rank one cannot start" in str(error.value) and "rank 0 stopped: another rank failed" in str(error.value)


def _rank(rank):
    return rank


def test_results_come_back_in_rank_order():
    assert run_world(_rank, 2) == [0, 1]
