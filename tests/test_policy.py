"""Tests of the selection policies (attent_scale/policy.py).

Expected values come from hand computation or from an independent enumeration (exact inclusion
probabilities of sampling without replacement), never from the code under test.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from attent_scale.policy import (PURPOSE_POOL, PURPOSE_REMAINDER, PURPOSE_SELECT, Selection,
                                 gumbel_inclusion, gumbel_noise, make_rng, noise_key,
                                 round_budget, select_gumbel_topk,
                                 select_random, select_topk, selection_checksum)


# ---- round_budget ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, ratio, multiple, expected", [
    (1000, 0.7, 16, 688),      # floor(700 / 16) * 16 = 43 * 16
    (1000, 0.7, 1, 700),
    (1000, 1.0, 16, 992),      # 62 * 16: the remainder rule of a full pass
    (1000, 1.0, 1, 1000),
    (1024, 1.0, 16, 1024),
    (999, 0.5, 1, 499),        # floor(499.5)
    (1000, 0.6999, 1, 699),    # 699.9 is not rounded up
    (3, 1 / 3, 1, 1),
    (20, 0.5, 16, 0),          # 10 samples: less than one global batch
    (100, 0.29, 1, 29),        # 0.29 * 100 == 28.999999999999996 in floats
    (100, 0.57, 1, 57),        # 0.57 * 100 == 56.99999999999999
    (100, 0.58, 1, 58),
    (10 ** 8, 0.29, 16, 29_000_000),  # 0.29 * 1e8 == 28999999.999999996; 29e6 = 1_812_500 * 16
    (10 ** 8, 0.57, 1, 57_000_000),
    (3 * 10 ** 9, 0.7, 1, 2_100_000_000),
])
def test_round_budget(n, ratio, multiple, expected):
    assert round_budget(n, ratio, multiple) == expected


def test_round_budget_float_edges_are_as_documented():
    # the float products really are below the integers (otherwise the cases above test nothing)
    assert 0.29 * 100 < 29
    assert 0.29 * 10 ** 8 < 29_000_000


def test_round_budget_rejects_bad_multiple():
    with pytest.raises(ValueError):
        round_budget(100, 0.5, 0)


# ---- make_rng / checksum ---------------------------------------------------------------------------

def test_make_rng_streams():
    def draw(*args):
        return make_rng(*args).random(8)

    base = draw(0, 1, PURPOSE_SELECT)
    assert np.array_equal(base, draw(0, 1, PURPOSE_SELECT))  # reproducible
    others = [draw(0, 2, PURPOSE_SELECT), draw(0, 1, PURPOSE_POOL), draw(0, 1, PURPOSE_REMAINDER),
              draw(1, 1, PURPOSE_SELECT), draw(0, 0, PURPOSE_SELECT)]
    for o in others:
        assert not np.array_equal(base, o)
    # all pairwise distinct
    for a, b in itertools.combinations(others, 2):
        assert not np.array_equal(a, b)
    assert len({PURPOSE_SELECT, PURPOSE_POOL, PURPOSE_REMAINDER}) == 3


def test_selection_checksum():
    ids = np.array([1, 5, 9, 12], dtype=np.int64)
    w = np.array([1.0, 0.5, 1.5, 1.0])
    c = selection_checksum(ids, w)
    assert c == selection_checksum(ids.copy(), w.copy())
    assert c == selection_checksum(ids.astype(np.int32), w)  # dtype of the input does not matter
    assert 0 <= c < 2 ** 63
    assert c != selection_checksum(np.array([1, 5, 9, 13]), w)
    assert c != selection_checksum(np.array([0, 5, 9, 12]), w)
    assert c != selection_checksum(ids, np.array([1.0, 0.5, 1.5, 1.0000001]))
    assert selection_checksum(ids) != selection_checksum(np.array([1, 5, 9, 13]))
    assert Selection(ids, w).checksum == c


# ---- select_topk -----------------------------------------------------------------------------------

def test_topk_picks_highest():
    scores = np.array([0.1, 5.0, 3.0, 4.0, -2.0, 2.0])
    ids = np.array([10, 11, 12, 13, 14, 15])
    sel = select_topk(scores, ids, 3)
    assert sel.ids.tolist() == [11, 12, 13]
    assert sel.weights.tolist() == [1.0, 1.0, 1.0]
    assert sel.ids.dtype == np.int64 and sel.weights.dtype == np.float64


def test_topk_ties_go_to_lower_id():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    ids = np.array([10, 4, 7, 2, 1])
    assert select_topk(scores, ids, 1).ids.tolist() == [1]
    assert select_topk(scores, ids, 2).ids.tolist() == [1, 4]
    assert select_topk(scores, ids, 3).ids.tolist() == [1, 4, 7]
    assert select_topk(scores, ids, 4).ids.tolist() == [1, 2, 4, 7]
    assert select_topk(scores, ids, 5).ids.tolist() == [1, 2, 4, 7, 10]
    assert select_topk(scores, ids, 0).ids.tolist() == []


def test_topk_all_equal_scores_takes_lowest_ids():
    ids = np.array([9, 3, 7, 1, 5, 0])
    assert select_topk(np.zeros(6), ids, 3).ids.tolist() == [0, 1, 3]


def test_topk_matches_brute_force_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        ids = rng.permutation(1000)[:n]
        scores = rng.integers(0, 5, n).astype(float)  # many ties
        k = int(rng.integers(0, n + 1))
        expected = sorted(sorted(zip(ids.tolist(), scores.tolist()), key=lambda t: (-t[1], t[0]))[:k])
        assert select_topk(scores, ids, k).ids.tolist() == [i for i, _ in expected]


def test_selections_are_sorted_distinct_exact_budget():
    rng = np.random.default_rng(1)
    for trial in range(10):
        n = 50
        ids = rng.permutation(500)[:n]
        scores = rng.normal(size=n)
        for k in (0, 1, 17, 50):
            for sel in (select_topk(scores, ids, k),
                        select_gumbel_topk(scores, ids, k, 0.5, np.random.default_rng(trial)),
                        select_gumbel_topk(scores, ids, k, 0.5, np.random.default_rng(trial),
                                           rescale=True),
                        select_random(ids, k, np.random.default_rng(trial))):
                assert len(sel.ids) == k == len(sel.weights)
                assert np.all(np.diff(sel.ids) > 0)  # ascending, no duplicates
                assert set(sel.ids.tolist()) <= set(ids.tolist())


# ---- select_gumbel_topk ----------------------------------------------------------------------------

def _exact_inclusion(weights: np.ndarray, k: int) -> np.ndarray:
    """P(i in S) for k successive draws without replacement, P(next = i) ~ weights[i]."""
    n = len(weights)
    p = np.zeros(n)
    total = weights.sum()
    for seq in itertools.permutations(range(n), k):
        prob, left = 1.0, total
        for i in seq:
            prob *= weights[i] / left
            left -= weights[i]
        for i in seq:
            p[i] += prob
    return p


def test_exact_inclusion_helper_by_hand():
    # weights 1, 1, 2; k = 1: 1/4, 1/4, 1/2; k = 2: complement of being the one left out
    assert np.allclose(_exact_inclusion(np.array([1.0, 1.0, 2.0]), 1), [0.25, 0.25, 0.5])
    # P(2 left out) = P(first two are 0, 1) = 1/4 * 1/3 + 1/4 * 1/3 = 1/6
    # P(0 left out) = P(1 then 2) + P(2 then 1) = 1/4 * 2/3 + 1/2 * 1/2 = 5/12 (= P(1 left out))
    assert np.allclose(_exact_inclusion(np.array([1.0, 1.0, 2.0]), 2), [7 / 12, 7 / 12, 5 / 6])
    assert np.isclose(_exact_inclusion(np.arange(1.0, 7.0), 2).sum(), 2.0)


def test_gumbel_deterministic_per_seed():
    scores = np.linspace(-1, 1, 40)
    ids = np.arange(100, 140)
    a = select_gumbel_topk(scores, ids, 10, 1.0, make_rng(3, 5, PURPOSE_SELECT))
    b = select_gumbel_topk(scores, ids, 10, 1.0, make_rng(3, 5, PURPOSE_SELECT))
    c = select_gumbel_topk(scores, ids, 10, 1.0, make_rng(4, 5, PURPOSE_SELECT))
    assert a.ids.tolist() == b.ids.tolist()
    assert a.ids.tolist() != c.ids.tolist()
    assert len(set(a.ids.tolist())) == 10


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gumbel_inclusion_frequencies_match_sampling_without_replacement(temperature):
    n, k, draws = 6, 2, 4000
    scores = np.array([0.0, 0.4, 0.8, 1.2, 1.6, 2.4])
    ids = np.arange(n)
    exact = _exact_inclusion(np.exp(scores / temperature), k)
    rng = np.random.default_rng(2024)
    counts = np.zeros(n)
    for _ in range(draws):
        counts[select_gumbel_topk(scores, ids, k, temperature, rng).ids] += 1
    freq = counts / draws
    # binomial standard error <= sqrt(0.25 / 4000) = 0.0079
    assert np.max(np.abs(freq - exact)) < 0.03, (freq, exact)
    # the check has power: the exact probabilities are far from uniform and from other temperatures
    assert np.max(np.abs(exact - k / n)) > 0.15
    other = _exact_inclusion(np.exp(scores / (3.0 - temperature)), k)
    assert np.max(np.abs(exact - other)) > 0.06


def test_gumbel_huge_temperature_is_uniform():
    n, k, draws = 6, 2, 3000
    scores = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    rng = np.random.default_rng(7)
    counts = np.zeros(n)
    for _ in range(draws):
        counts[select_gumbel_topk(scores, np.arange(n), k, 1e9, rng).ids] += 1
    assert np.max(np.abs(counts / draws - k / n)) < 0.035


def test_gumbel_tiny_temperature_is_topk():
    rng = np.random.default_rng(11)
    scores = rng.permutation(30) * 0.1  # distinct, gaps >= 0.1
    ids = np.arange(500, 530)
    hard = select_topk(scores, ids, 8).ids.tolist()
    for seed in range(20):
        assert select_gumbel_topk(scores, ids, 8, 1e-6, np.random.default_rng(seed)).ids.tolist() == hard


def test_gumbel_inclusion_formula():
    phi = np.array([-3.0, 0.0, 0.5, 2.0, 60.0])
    kappa = 0.5
    expected = [1 - math.exp(-math.exp(x - kappa)) for x in (-3.0, 0.0, 0.5)]
    got = gumbel_inclusion(phi, kappa)
    assert np.allclose(got[:3], expected, rtol=1e-12)
    assert got[2] == pytest.approx(1 - math.exp(-1))
    assert got[4] == 1.0
    assert np.all((got > 0) & (got <= 1))


def test_gumbel_rescale_weights_are_normalised_inverse_conditional_inclusion():
    n, k, temperature = 12, 4, 0.7
    scores = np.linspace(-1.0, 2.0, n)
    ids = np.arange(n) * 3
    for seed in range(5):
        sel = select_gumbel_topk(scores, ids, k, temperature, np.random.default_rng(seed),
                                 rescale=True)
        assert sel.weights.mean() == pytest.approx(1.0, rel=1e-12)
        # reproduce the perturbed keys from the same stream
        phi = scores / temperature
        keys = phi + gumbel_noise(noise_key(np.random.default_rng(seed)), ids)
        order = np.argsort(-keys, kind="stable")
        chosen = np.sort(order[:k])
        kappa = keys[order[k]]  # the (k+1)-th largest key
        assert sel.ids.tolist() == ids[chosen].tolist()
        q = 1.0 - np.exp(-np.exp(phi[chosen] - kappa))
        w = (1.0 / q) / np.mean(1.0 / q)
        assert np.allclose(sel.weights, w, rtol=1e-10)
        assert not np.allclose(sel.weights, 1.0)  # the inclusion probabilities really differ


def test_gumbel_conditional_inclusion_estimator_is_unbiased():
    # E[sum_{i in S} f_i / q_i(kappa)] = sum_i f_i for Gumbel-top-k with kappa the (k+1)-th key
    n, k, draws = 6, 2, 200_000
    phi = np.array([0.0, 0.4, 0.8, 1.2, 1.6, 2.4])
    f = np.array([3.0, -1.0, 2.0, 5.0, 0.5, 4.0])
    rng = np.random.default_rng(99)
    keys = phi + rng.gumbel(size=(draws, n))
    order = np.argsort(-keys, axis=1)
    chosen = order[:, :k]
    kappa = np.take_along_axis(keys, order[:, k:k + 1], axis=1)
    q = gumbel_inclusion(phi[chosen], kappa)
    est = (f[chosen] / q).sum(axis=1)
    se = est.std() / math.sqrt(draws)
    assert abs(est.mean() - f.sum()) < 5 * se + 1e-3, (est.mean(), f.sum(), se)
    assert se < 0.05  # the check is tight enough to mean something
    # the naive estimator with unconditional inclusion probabilities k/n is visibly biased here
    naive = (f[chosen] / (k / n)).sum(axis=1)
    assert abs(naive.mean() - f.sum()) > 20 * se


def test_gumbel_rescale_weights_trivial_cases():
    scores = np.array([0.3, -0.2, 1.0])
    ids = np.array([4, 8, 2])
    full = select_gumbel_topk(scores, ids, 3, 1.0, np.random.default_rng(0), rescale=True)
    assert full.ids.tolist() == [2, 4, 8] and full.weights.tolist() == [1.0, 1.0, 1.0]
    empty = select_gumbel_topk(scores, ids, 0, 1.0, np.random.default_rng(0), rescale=True)
    assert len(empty.ids) == 0


def test_gumbel_noise_is_keyed_by_id_and_standard_gumbel():
    ids = np.arange(200_000, dtype=np.int64)
    g = gumbel_noise(7, ids)
    # a shard of the ids gets exactly the noise the whole array gives them, in any order
    part = ids[123:4567][::-1].copy()
    assert np.array_equal(gumbel_noise(7, part), g[123:4567][::-1])
    assert not np.array_equal(gumbel_noise(8, ids[:100]), g[:100])
    # standard Gumbel: mean = Euler-Mascheroni, variance pi^2 / 6, CDF exp(-exp(-x))
    assert abs(g.mean() - 0.5772156649) < 0.01
    assert abs(g.var() - math.pi ** 2 / 6) < 0.03
    for x in (-1.0, 0.0, 1.0, 3.0):
        assert abs(np.mean(g <= x) - math.exp(-math.exp(-x))) < 0.005
    # neighbouring ids are uncorrelated
    assert abs(np.corrcoef(g[:-1], g[1:])[0, 1]) < 0.01
    assert np.all(np.isfinite(g))


# ---- select_random ---------------------------------------------------------------------------------

def test_random_uniform_frequencies():
    n, k, draws = 10, 3, 5000
    ids = np.arange(20, 30)
    rng = np.random.default_rng(5)
    counts = np.zeros(n)
    for _ in range(draws):
        sel = select_random(ids, k, rng)
        assert sel.weights.tolist() == [1.0] * k
        counts[sel.ids - 20] += 1
    # standard error sqrt(0.21 / 5000) = 0.0065
    assert np.max(np.abs(counts / draws - 0.3)) < 0.03


def test_random_deterministic_per_seed():
    ids = np.arange(100)
    a = select_random(ids, 10, make_rng(0, 1, PURPOSE_SELECT)).ids
    b = select_random(ids, 10, make_rng(0, 1, PURPOSE_SELECT)).ids
    c = select_random(ids, 10, make_rng(0, 2, PURPOSE_SELECT)).ids
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


# ---- bad inputs ------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    ids = np.arange(5)
    good = np.arange(5, dtype=float)
    rng = np.random.default_rng(0)
    for bad in (np.array([0.0, np.nan, 1.0, 2.0, 3.0]), np.array([0.0, np.inf, 1.0, 2.0, 3.0]),
                np.array([0.0, -np.inf, 1.0, 2.0, 3.0])):
        with pytest.raises(ValueError):
            select_topk(bad, ids, 2)
        with pytest.raises(ValueError):
            select_gumbel_topk(bad, ids, 2, 1.0, rng)
    for k in (6, -1):
        with pytest.raises(ValueError):
            select_topk(good, ids, k)
        with pytest.raises(ValueError):
            select_gumbel_topk(good, ids, k, 1.0, rng)
        with pytest.raises(ValueError):
            select_random(ids, k, rng)
    with pytest.raises(ValueError):
        select_topk(np.arange(4.0), ids, 2)  # mismatched lengths
    with pytest.raises(ValueError):
        select_gumbel_topk(np.arange(6.0), ids, 2, 1.0, rng)
    with pytest.raises(ValueError):
        select_topk(good.reshape(5, 1), ids.reshape(5, 1), 2)  # not 1-D
    for t in (0.0, -1.0):
        with pytest.raises(ValueError):
            select_gumbel_topk(good, ids, 2, t, rng)
