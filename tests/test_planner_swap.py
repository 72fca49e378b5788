"""The swap fraction alpha: closed form and LP, each regime, and their agreement."""
import random

import pytest

from planner import SwapInputs, swap_fraction, swap_fraction_lp

GB = 1e9
MB = 1e6


def inputs(**changes):
    # 10 GB/s for 10 ms moves 100 MB per layer; the mandatory swaps take 40 MB of it
    base = dict(
        bandwidth_bytes_per_s=10 * GB,
        layer_forward_s=0.01,
        input_bytes=20 * MB,
        attention_bytes=20 * MB,
        other_bytes=100 * MB,
        host_memory_bytes=1000 * GB,
        num_layers=10,
    )
    return SwapInputs(**{**base, **changes})


def both(case):
    return swap_fraction(case), swap_fraction_lp(case)


def test_limited_by_bandwidth():
    for result in both(inputs()):
        assert result.alpha == pytest.approx((100 - 40) / 100)
        assert result.limited_by == "bandwidth" and result.mandatory_fits


def test_limited_by_host_memory():
    # 8 swapped layers, each may keep 65 MB on the host: 40 MB mandatory + 25% of 100 MB
    for result in both(inputs(host_memory_bytes=8 * 65 * MB)):
        assert result.alpha == pytest.approx(0.25)
        assert result.limited_by == "host_memory" and result.mandatory_fits


def test_clipped_at_one_when_everything_fits():
    for result in both(inputs(bandwidth_bytes_per_s=100 * GB)):
        assert result.alpha == 1.0 and result.limited_by == "none" and result.mandatory_fits


def test_clipped_at_zero_when_mandatory_swaps_overrun():
    for result in both(inputs(layer_forward_s=0.003)):  # 30 MB window < 40 MB mandatory
        assert result.alpha == 0.0 and result.limited_by == "bandwidth" and not result.mandatory_fits
    for result in both(inputs(host_memory_bytes=8 * 30 * MB)):
        assert result.alpha == 0.0 and result.limited_by == "host_memory" and not result.mandatory_fits


def test_kept_layers_are_not_swapped():
    # 6 of 10 layers swapped (4 kept) may hold 8/6 as much each: 40 MB mandatory + 47% of 100 MB
    for result in both(inputs(host_memory_bytes=8 * 65 * MB, kept_layers=4)):
        assert result.alpha == pytest.approx((8 * 65 / 6 - 40) / 100)
    for result in both(inputs(num_layers=8, kept_layers=0, host_memory_bytes=8 * 65 * MB)):
        assert result.alpha == pytest.approx(0.25)  # the same 8 swapped layers as 10 with the default 2 kept
    with pytest.raises(ValueError, match="kept_layers"):
        inputs(kept_layers=-1)


def test_no_swappable_layers():
    for layers in (1, 2):
        for result in both(inputs(num_layers=layers)):
            assert result.alpha == 0.0 and result.limited_by == "no_swappable_layers"


def test_no_other_activations():
    for result in both(inputs(other_bytes=0)):
        assert result.alpha == 1.0 and result.mandatory_fits and result.limited_by == "none"
    for result in both(inputs(other_bytes=0, layer_forward_s=0.001)):
        assert result.alpha == 0.0 and not result.mandatory_fits and result.limited_by == "bandwidth"


def test_closed_form_equals_lp_on_random_grid():
    rng = random.Random(0)
    regimes = set()
    for _ in range(150):
        case = SwapInputs(
            bandwidth_bytes_per_s=rng.uniform(1, 60) * GB,
            layer_forward_s=rng.uniform(0.001, 0.05),
            input_bytes=rng.uniform(0, 400) * MB,
            attention_bytes=rng.uniform(0, 400) * MB,
            other_bytes=rng.uniform(1, 3000) * MB,
            host_memory_bytes=rng.uniform(1, 500) * GB,
            num_layers=rng.randint(1, 64),
        )
        closed, linear = both(case)
        assert closed.alpha == pytest.approx(linear.alpha, abs=1e-7)
        assert (closed.limited_by, closed.mandatory_fits) == (linear.limited_by, linear.mandatory_fits)
        regimes.add((closed.limited_by, closed.alpha == 0.0, closed.alpha == 1.0))
        if closed.mandatory_fits and case.num_layers > 2:
            # alpha is feasible and maximal: at 1, or with a constraint tight
            used = case.input_bytes + case.attention_bytes + closed.alpha * case.other_bytes
            window = case.bandwidth_bytes_per_s * case.layer_forward_s
            per_layer_host = case.host_memory_bytes / (case.num_layers - 2)
            assert used <= window * (1 + 1e-9) and used <= per_layer_host * (1 + 1e-9)
            assert closed.alpha == 1.0 or min(window, per_layer_host) == pytest.approx(used, rel=1e-9)
    # the grid covers interior, clipped-at-0 and clipped-at-1 answers of both constraints
    assert {("bandwidth", False, False), ("host_memory", False, False), ("none", False, True)} <= regimes
    assert ("bandwidth", True, False) in regimes and ("no_swappable_layers", True, False) in regimes


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s"):
        inputs(bandwidth_bytes_per_s=-1)
    with pytest.raises(ValueError, match="num_layers"):
        inputs(num_layers=0)
    with pytest.raises(ValueError, match="other_bytes"):
        inputs(other_bytes=float("nan"))
