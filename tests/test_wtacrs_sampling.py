"""WTA-CRS row sampling: unbiased in every branch, lower variance than plain CRS on heavy tails."""
import math

import pytest
import torch

from zerokit.nn.sampling import row_budget, sample_rows, sampling_mass

D_IN, D_OUT = 8, 6
CHUNKS = 16


def _estimates(H, G, mass, k, draws, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(draws, G.shape[1], H.shape[1], dtype=torch.float64)
    for t in range(draws):
        sample = sample_rows(mass, k, generator)
        assert sample.indices.numel() == k and sample.weights.numel() == k  # fixed size: no host sync
        out[t] = (G[sample.indices] * sample.weights.double().unsqueeze(1)).T @ H[sample.indices]
    return out


def _assert_unbiased(H, G, mass, k, draws_per_chunk=100):
    """Mean of n and of 16n estimates: errors shrink like 1/sqrt(n), and match the variance alone."""
    exact = G.T @ H
    estimates = _estimates(H, G, mass, k, CHUNKS * draws_per_chunk)
    total_error = (estimates.mean(0) - exact).norm()
    chunk_errors = (estimates.view(CHUNKS, draws_per_chunk, *exact.shape).mean(1) - exact).flatten(1).norm(dim=1)
    ratio = chunk_errors.pow(2).mean().sqrt() / total_error
    # A bias would hold the ratio near 1; luck can only push it above 4 = sqrt(16).
    assert ratio > 2.5, f"error of n draws / error of 16n draws = {ratio:.2f}, expected about 4"
    # Unbiased: E‖mean − exact‖² = MSE / draws; a bias would add to the left side only.
    mse = (estimates - exact).pow(2).flatten(1).sum(1).mean()
    assert total_error**2 <= 9 * mse / estimates.shape[0]
    return mse


def _assert_exact(H, G, mass, k):
    exact = G.T @ H
    estimates = _estimates(H, G, mass, k, 20)
    torch.testing.assert_close(estimates, exact.expand_as(estimates), rtol=1e-12, atol=1e-12)


def _data(n=64, seed=0, row_scale=None):
    generator = torch.Generator().manual_seed(seed)
    H = torch.randn(n, D_IN, generator=generator, dtype=torch.float64)
    G = torch.randn(n, D_OUT, generator=generator, dtype=torch.float64)
    if row_scale is not None:
        H = H * row_scale.unsqueeze(1)
    return H, G


def _true_mass(H, G):
    return sampling_mass(H.norm(dim=1), G.norm(dim=1))


def _heavy_tailed(n=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    pareto = (1 - torch.rand(n, generator=generator, dtype=torch.float64)) ** (-1 / 1.1)  # Pareto(α = 1.1)
    H, _ = _data(n, seed, pareto)
    student_t = torch.distributions.StudentT(2.0).sample((n, D_OUT)).double()
    return H, student_t


def test_gaussian_rows_are_unbiased():
    H, G = _data()
    _assert_unbiased(H, G, _true_mass(H, G), k=row_budget(0.3, 64))


def test_heavy_tailed_rows_are_unbiased():
    torch.manual_seed(0)
    H, G = _heavy_tailed()
    _assert_unbiased(H, G, _true_mass(H, G), k=row_budget(0.3, 64))


def test_without_cache_stale_or_zero_cache_stays_unbiased():
    torch.manual_seed(0)
    H, G = _heavy_tailed()
    _assert_unbiased(H, G, sampling_mass(H.norm(dim=1), None), k=10)  # first epoch: p ∝ ‖H_i‖
    stale = torch.rand(64, dtype=torch.float64)
    stale[::3] = 0  # rows not seen yet: must not get zero probability
    _assert_unbiased(H, G, sampling_mass(H.norm(dim=1), stale), k=10)
    _assert_unbiased(H, G, sampling_mass(H.norm(dim=1), torch.zeros(64)), k=10)


def test_zero_rows_are_never_kept_and_estimate_stays_unbiased():
    scale = torch.ones(64, dtype=torch.float64)
    scale[::2] = 0
    H, G = _data(row_scale=scale)
    mass = _true_mass(H, G)
    _assert_unbiased(H, G, mass, k=8)
    sample = sample_rows(mass, 8, torch.Generator().manual_seed(0))
    used = sample.indices[sample.weights > 0]
    assert bool((H[used].norm(dim=1) > 0).all())


def test_one_dominant_row_is_a_winner_and_rest_unbiased():
    scale = torch.ones(64, dtype=torch.float64)
    scale[5] = 1e4
    H, G = _data(row_scale=scale)
    mass = _true_mass(H, G)
    for seed in range(5):
        sample = sample_rows(mass, 6, torch.Generator().manual_seed(seed))
        assert 5 in sample.indices.tolist()
        assert sample.weights[sample.indices.tolist().index(5)] == 1.0
    _assert_unbiased(H, G, mass, k=6)


def test_all_equal_rows_and_ties_are_unbiased():
    H, G = _data()
    H = H / H.norm(dim=1, keepdim=True)
    G = G / G.norm(dim=1, keepdim=True)
    _assert_unbiased(H, G, _true_mass(H, G), k=10)  # uniform p: no winners, plain CRS
    tied = torch.tensor([1.0, 2.0, 3.0, 3.0], dtype=torch.float64).repeat(16)
    H, G = _data(row_scale=tied)
    _assert_unbiased(H, G, sampling_mass(tied, None), k=10)


def test_k_of_one_is_unbiased():
    H, G = _heavy_tailed()
    _assert_unbiased(H, G, _true_mass(H, G), k=1, draws_per_chunk=200)


def test_full_budget_and_few_nonzero_rows_are_exact():
    H, G = _heavy_tailed()
    mass = _true_mass(H, G)
    _assert_exact(H, G, mass, k=64)  # |C| = k = N
    scale = torch.zeros(64, dtype=torch.float64)
    scale[[3, 17, 40]] = torch.tensor([1.0, 5.0, 0.1], dtype=torch.float64)
    H, G = _data(row_scale=scale)
    _assert_exact(H, G, _true_mass(H, G), k=3)  # k_s = 0 only because the remaining mass is 0
    sample = sample_rows(_true_mass(H, G), 5, torch.Generator())
    used = sample.weights > 0
    assert sorted(sample.indices[used].tolist()) == [3, 17, 40] and sample.weights[used].tolist() == [1.0, 1.0, 1.0]
    assert not sample_rows(torch.zeros(64, dtype=torch.float64), 5).weights.any()  # ∇W = 0 exactly


def test_variance_below_plain_column_row_sampling_on_heavy_tails():
    torch.manual_seed(0)
    H, G = _heavy_tailed()
    mass = _true_mass(H, G)
    k = row_budget(0.3, 64)
    exact = G.T @ H
    wta = _estimates(H, G, mass, k, 2000)
    wta_mse = (wta - exact).pow(2).flatten(1).sum(1).mean()

    probabilities = mass / mass.sum()  # CRS: k i.i.d. draws, p ∝ ‖H_i‖‖∇Z_i‖, no winners
    draws = torch.multinomial(probabilities, 2000 * k, replacement=True).view(2000, k)
    weights = 1 / (k * probabilities[draws])
    crs = torch.einsum("tk,tko,tki->toi", weights, G[draws], H[draws])
    crs_mse = (crs - exact).pow(2).flatten(1).sum(1).mean()
    assert wta_mse < 0.5 * crs_mse, f"WTA-CRS MSE {wta_mse:.3g} vs CRS {crs_mse:.3g}"


def _brute_force_winners(mass, k):
    """The published rule, written out: argmin_c (1 − q_c)/(k − c) over c ≥ 1, or 0 if that exceeds 1/k."""
    p = sorted((m / sum(mass) for m in mass), reverse=True)
    best_c, best = 0, math.inf
    for c in range(1, k):
        value = (1 - sum(p[:c])) / (k - c)
        if value < best:
            best_c, best = c, value
    return 0 if best > 1 / k else best_c


@pytest.mark.parametrize("seed", range(6))
def test_winner_count_follows_the_anchor_rule(seed):
    generator = torch.Generator().manual_seed(seed)
    mass = ((1 - torch.rand(40, generator=generator, dtype=torch.float64)) ** (-1 / 0.8)).tolist()
    k = 4 + seed
    expected = _brute_force_winners(mass, k)
    sample = sample_rows(torch.tensor(mass, dtype=torch.float64), k, generator)
    top = sorted(range(40), key=lambda i: -mass[i])[:expected]
    kept = dict(zip(sample.indices.tolist(), sample.weights.tolist()))
    assert all(kept.get(i) == 1.0 for i in top)
    assert sum(1 for w in kept.values() if w == 1.0) == expected


def test_sampling_mass_fallbacks():
    input_norms = torch.tensor([1.0, 2.0, 0.0, 4.0])
    assert sampling_mass(input_norms, None).tolist() == [1.0, 2.0, 0.0, 4.0]
    grad = torch.tensor([3.0, 0.0, 5.0, float("nan")])  # unknown rows take the mean of the known (4)
    assert sampling_mass(input_norms, grad).tolist() == [3.0, 8.0, 0.0, 16.0]
    assert sampling_mass(input_norms, torch.zeros(4)).tolist() == [1.0, 2.0, 0.0, 4.0]
    overflowed = sampling_mass(torch.tensor([1.0, float("inf")]), None)
    assert overflowed[1] > 1e299  # kept as a winner, so the overflow reaches ∇W


def test_row_budget():
    assert row_budget(0.3, 10) == 3  # not 4: 0.3 × 10 is 3.0000000000000004 in floating point
    assert row_budget(0.3, 11) == 4
    assert row_budget(0.01, 5) == 1
    assert row_budget(1.0, 7) == 7
