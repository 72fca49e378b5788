"""Nothing a block call stored outlives its iteration: after backward every record (with its
saved tensors, host copies and recomputed tensors) is freed, for every policy, the first
(calibrating) memo iteration included. A reference cycle through the autograd graph is invisible
to Python's garbage collector, so a leak here would keep whole iterations of activations alive;
a cycle it can see would keep them until it runs, and the swap space with them.""" 
from __future__ import annotations

import gc

import pytest
import torch

from tests.test_activations_parity import MODELS
from zerokit.activations import apply_activation_memory
from zerokit.activations.host_pool import PinnedHostPool
from zerokit.activations.record import BlockRecord


def _live_records() -> int:
    return sum(BlockRecord in type(o).__mro__ for o in gc.get_objects())


@pytest.fixture(autouse=True)
def no_cycle_collector():
    """Records must go by reference counting, as soon as their graph does: the pinned memory they
    hold is lent to the next iteration only then."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("policy", ["memo", "swap", "recompute"])
def test_records_are_freed_after_each_iteration(model_name: str, policy: str) -> None:
    torch.manual_seed(0)
    model, loss_fn = MODELS[model_name]()
    apply_activation_memory(model, {"policy": policy, "alpha": 0.5} if policy == "memo" else {"policy": policy})
    before = _live_records()
    for seed in range(3):  # memo: a calibrating iteration, then token-wise ones
        tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(seed))
        loss_fn(model, tokens).backward()
        assert _live_records() == before, f"iteration {seed} left block records alive"


class _Owner:
    pass


def test_host_pool_lends_each_tensor_to_one_live_owner() -> None:
    pool = PinnedHostPool(pin=False)
    like = torch.zeros(4, 6)
    first_owner, second_owner = _Owner(), _Owner()
    first = pool.take(like, first_owner)
    second = pool.take(like, second_owner)
    assert first.data_ptr() != second.data_ptr()  # both owners alive: two tensors
    assert pool.take(like.t(), _Owner()).stride() == (1, 6)  # another layout, its own tensor
    del first_owner
    assert pool.take(like, _Owner()).data_ptr() == first.data_ptr()  # the dead owner's tensor comes back


@pytest.mark.parametrize("policy", ["memo", "swap"])
def test_swap_space_is_reused_across_iterations(policy: str) -> None:
    torch.manual_seed(0)
    model, loss_fn = MODELS["llama"]()
    manager = apply_activation_memory(model, {"policy": policy, "alpha": 0.5} if policy == "memo" else {"policy": policy})
    sizes = []
    for seed in range(4):
        tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(seed))
        loss_fn(model, tokens).backward()
        sizes.append(manager.streams.host_pool.nbytes())
    assert sizes[-1] == sizes[-2] > 0  # the last iterations took only memory given back


def test_host_pool_lets_go_of_layouts_no_longer_used() -> None:
    pool = PinnedHostPool(pin=False)
    owners = [_Owner() for _ in range(3)]
    old = [pool.take(torch.zeros(64, 8), owner) for owner in owners]
    assert pool.nbytes() == 3 * old[0].untyped_storage().nbytes()
    del owners  # the last iteration's records are gone
    owner = _Owner()
    new = pool.take(torch.zeros(16, 8), owner)  # a new shape: the old free tensors go
    assert pool.nbytes() == new.untyped_storage().nbytes()
