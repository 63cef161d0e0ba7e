"""Tests of InfoBatch, the exact mean, learnability scores and per-source selection
(attent_scale/policy.py, attent_scale/selection_rules.py).

Expected ids and weights are worked out by hand in the comments, or re-derived from the rule in
plain Python (sorted() on (-key, id)); the counter noise itself is tested in test_policy.py.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from attent_scale.config import parse_attent
from attent_scale.policy import (PURPOSE_SELECT, SelectionError, exact_mean, exact_sum,
                                 gumbel_noise, make_rng, noise_key, select_gumbel_topk,
                                 select_infobatch, select_random, select_topk)
from attent_scale.selection_rules import (candidates, check_reference, check_sources,
                                          effective_scores, select_candidates, source_budgets,
                                          zscore)


def _noise(seed, p, ids, source=None):
    return dict(zip(ids, gumbel_noise(noise_key(make_rng(seed, p, PURPOSE_SELECT, source)),
                                      np.array(ids)).tolist()))


def _top(keys: dict, k: int) -> list:
    return sorted(sorted(keys, key=lambda i: (-keys[i], i))[:k])


# ---- exact mean ---------------------------------------------------------------------------------

def test_exact_mean_is_the_correctly_rounded_mean():
    cases = [
        [1e16, 1.0, -1e16, 1.0],                  # np.mean: 0.25 (1e16 + 1 rounds); exact 0.5
        [5e-324, 5e-324, 1e-300],                 # subnormals
        [1.7e308, 1.7e308, -1.7e308],             # the float sum overflows midway
        [0.1] * 10,
        [-0.0, 0.0, -2.5, 3.25, 1e-10, -1e10],
        list(np.random.default_rng(0).normal(size=1000) * 10.0 ** np.random.default_rng(1)
             .integers(-30, 30, 1000)),
    ]
    for values in cases:
        exact = Fraction(0)
        for v in values:
            exact += Fraction(v)
        expected = float(exact / len(values))  # Fraction -> float is correctly rounded
        arr = np.array(values)
        assert exact_mean(arr) == expected, values[:4]
        assert exact_sum(arr) == exact * 2 ** 1126  # the integer is the exact sum
        # order-independent: a reversed or shuffled array gives the same bits
        assert exact_mean(arr[::-1]) == expected
        assert exact_mean(np.random.default_rng(2).permutation(arr)) == expected
    # the first case is why: the float mean is wrong there
    assert np.mean(np.array(cases[0])) == 0.25 and exact_mean(np.array(cases[0])) == 0.5


def test_exact_mean_over_chunks(monkeypatch):
    import attent_scale.policy as policy
    monkeypatch.setattr(policy, "_SUM_CHUNK", 7)  # many chunks: the per-chunk sums add exactly
    values = np.random.default_rng(3).normal(size=100) * 1e5
    expected = float(sum(Fraction(v) for v in values) / 100)
    assert policy.exact_mean(values) == expected
    with pytest.raises(ValueError):
        policy.exact_mean(np.zeros(0))
    for bad in (np.inf, -np.inf, np.nan):
        with pytest.raises(ValueError, match="finite"):
            policy.exact_sum(np.array([1.0, bad]))


# ---- InfoBatch ----------------------------------------------------------------------------------
# scores 0..9 on ids 10..19: mean 4.5, hard (> mean) = ids 15..19, easy = ids 10..14.

SCORES, IDS = np.arange(10.0), np.arange(10, 20)


def test_infobatch_keeps_every_hard_example_and_fills_uniformly_from_the_easy():
    sel = select_infobatch(SCORES, IDS, 7, make_rng(0, 1, PURPOSE_SELECT), rescale=True)
    noise = _noise(0, 1, list(range(10, 20)))
    easy = _top({i: noise[i] for i in range(10, 15)}, 2)
    assert sel.ids.tolist() == sorted(easy + [15, 16, 17, 18, 19])
    # raw weights: hard 1, easy 5 / 2 = 2.5; mean (5 + 5) / 7 = 10/7 -> hard 0.7, easy 1.75
    expected = [1.75 if i in easy else 0.7 for i in sel.ids.tolist()]
    assert np.allclose(sel.weights, expected, rtol=1e-15)
    assert sel.weights.mean() == pytest.approx(1.0, rel=1e-15)
    # without rescale: the same ids, weight 1
    plain = select_infobatch(SCORES, IDS, 7, make_rng(0, 1, PURPOSE_SELECT))
    assert plain.ids.tolist() == sel.ids.tolist() and plain.weights.tolist() == [1.0] * 7


def test_infobatch_more_hard_than_budget_draws_uniformly_among_them_with_unit_weights():
    for seed in range(4):
        sel = select_infobatch(SCORES, IDS, 3, make_rng(seed, 1, PURPOSE_SELECT), rescale=True)
        noise = _noise(seed, 1, list(range(10, 20)))
        assert sel.ids.tolist() == _top({i: noise[i] for i in range(15, 20)}, 3)
        assert sel.weights.tolist() == [1.0, 1.0, 1.0]  # exactly 1, not 1 +- an ulp
    draws = {tuple(select_infobatch(SCORES, IDS, 3, make_rng(s, 1, PURPOSE_SELECT)).ids)
             for s in range(10)}
    assert len(draws) > 3  # different seeds differ


def test_infobatch_budget_edges():
    rng = lambda: make_rng(0, 1, PURPOSE_SELECT)  # noqa: E731
    exact = select_infobatch(SCORES, IDS, 5, rng(), rescale=True)
    assert exact.ids.tolist() == [15, 16, 17, 18, 19] and exact.weights.tolist() == [1.0] * 5
    full = select_infobatch(SCORES, IDS, 10, rng(), rescale=True)
    assert full.ids.tolist() == list(range(10, 20)) and full.weights.tolist() == [1.0] * 10
    assert len(select_infobatch(SCORES, IDS, 0, rng(), rescale=True).ids) == 0
    with pytest.raises(ValueError):
        select_infobatch(SCORES, IDS, 11, rng())
    with pytest.raises(ValueError):
        select_infobatch(np.array([0.0, np.nan]), np.arange(2), 1, rng())


def test_infobatch_scores_equal_to_the_mean_are_not_hard():
    # all equal: nobody is above the mean, so the whole budget is a uniform draw (= random)
    sel = select_infobatch(np.ones(10), IDS, 4, make_rng(5, 2, PURPOSE_SELECT))
    assert sel.ids.tolist() == select_random(IDS, 4, make_rng(5, 2, PURPOSE_SELECT)).ids.tolist()
    # [0, 1, 2] has mean 1: only id 2 is hard
    sel = select_infobatch(np.array([0.0, 1.0, 2.0]), np.array([7, 8, 9]), 1,
                           make_rng(0, 0, PURPOSE_SELECT))
    assert sel.ids.tolist() == [9]


def test_infobatch_is_deterministic_and_seeded():
    a = select_infobatch(SCORES, IDS, 7, make_rng(3, 4, PURPOSE_SELECT))
    b = select_infobatch(SCORES, IDS, 7, make_rng(3, 4, PURPOSE_SELECT))
    assert a.checksum == b.checksum
    others = {select_infobatch(SCORES, IDS, 7, make_rng(s, 4, PURPOSE_SELECT)).checksum
              for s in range(8)}
    assert len(others) > 4


def test_infobatch_fill_is_uniform_over_the_easy():
    counts = np.zeros(10)
    for seed in range(3000):
        counts[select_infobatch(SCORES, IDS, 7, make_rng(seed, 0, PURPOSE_SELECT)).ids - 10] += 1
    freq = counts / 3000
    assert np.all(freq[5:] == 1.0)
    # each easy id: 2/5; binomial standard error sqrt(0.24 / 3000) = 0.009
    assert np.max(np.abs(freq[:5] - 0.4)) < 0.04


def test_infobatch_rescaled_estimate_is_unbiased():
    # E[sum over kept of f_i * raw_weight_i] = sum f_i: hard always kept at weight 1, an easy id
    # kept with probability fill / n_easy at weight n_easy / fill. Exact, by enumerating draws.
    f = np.array([3.0, -1.0, 2.0, 5.0, 0.5, 4.0, 1.0, 2.5, -2.0, 7.0])
    hard = [5, 6, 7, 8, 9]
    total = 0.0
    subsets = list(itertools.combinations(range(5), 2))
    for easy in subsets:
        total += (f[hard].sum() + f[list(easy)].sum() * 5 / 2) / len(subsets)
    assert total == pytest.approx(f.sum(), rel=1e-12)


# ---- temperature guard ----------------------------------------------------------------------------

def test_overflowing_keys_raise_selection_error_naming_the_key():
    with pytest.raises(SelectionError) as ei:
        select_gumbel_topk(np.array([1e306, 0.0]), np.arange(2), 1, 1e-3,
                           make_rng(0, 0, PURPOSE_SELECT))
    msg = str(ei.value)
    assert msg.startswith("attent.selection.temperature: got 0.001;")
    assert "1e+306" in msg and "fix: raise attent.selection.temperature" in msg
    # the same scores at T = 1 are fine
    assert len(select_gumbel_topk(np.array([1e306, 0.0]), np.arange(2), 1, 1.0,
                                  make_rng(0, 0, PURPOSE_SELECT)).ids) == 1


def test_make_rng_keeps_old_streams_and_separates_sources():
    old = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, 2, 1]))).random(4)
    assert np.array_equal(make_rng(3, 2, 1).random(4), old)
    assert np.array_equal(make_rng(3, 2, 1, None).random(4), old)
    per = [make_rng(3, 2, 1, s).random(4) for s in range(3)]
    # source 0 too: SeedSequence zero-pads, so [3, 2, 1, 0] would be the sourceless stream
    assert all(not np.array_equal(a, old) for a in per)
    assert not np.array_equal(per[0], per[1]) and not np.array_equal(per[1], per[2])
    assert np.array_equal(make_rng(3, 2, 1, 1).random(4), per[1])
    with pytest.raises(ValueError):
        make_rng(3, 2, 1, -1)


# ---- learnability scores --------------------------------------------------------------------------

def test_effective_scores_raw_drop_reducible():
    nan, inf = np.nan, np.inf
    scores = np.array([2.0, 3.0, nan, 1.0, 4.0, nan])
    scored = np.array([True, True, True, True, True, False])
    prev = np.array([5.0, nan, 1.0, 1.5, 1e308, nan])
    prev_scored = np.array([True, False, True, True, True, False])
    eff, uns, inv = effective_scores("raw", scores, scored)
    assert uns.tolist() == [False] * 5 + [True] and inv.tolist() == [False, False, True] + \
        [False] * 3
    eff, uns, inv = effective_scores("drop", scores, scored, prev, prev_scored)
    # id 0: 5 - 2 = 3; id 1: no previous -> unscored; id 2: NaN newest -> invalid;
    # id 3: 1.5 - 1 = 0.5 (a rise would be negative); id 4: 1e308 - 4; id 5: never scored
    assert eff[[0, 3]].tolist() == [3.0, 0.5] and eff[4] == 1e308
    assert uns.tolist() == [False, True, False, False, False, True]
    assert inv.tolist() == [False, False, True, False, False, False]
    # a NaN previous score is no previous score
    eff, uns, _ = effective_scores("drop", np.array([1.0]), np.array([True]), np.array([nan]),
                                   np.array([True]))
    assert uns.tolist() == [True]
    ref = np.array([0.5, nan, 0.0, inf, -1e308, 1.0])
    eff, uns, inv = effective_scores("reducible", np.array([2.0, 3.0, nan, 1.0, 1e308, 1.0]),
                                     scored, reference=ref)
    # id 0: 1.5; id 1: unknown reference -> unscored; id 2: NaN signal -> invalid;
    # id 3: inf reference -> unknown; id 4: 1e308 + 1e308 overflows -> invalid; id 5: never scored
    assert eff[0] == 1.5
    assert uns.tolist() == [False, True, False, True, False, True]
    assert inv.tolist() == [False, False, True, False, True, False]
    with pytest.raises(ValueError):
        effective_scores("reducible", scores, scored)
    with pytest.raises(ValueError):
        effective_scores("drop", scores, scored)


# ---- per source -----------------------------------------------------------------------------------

def test_zscore():
    assert np.allclose(zscore(np.array([1.0, 2.0, 3.0])), [-math.sqrt(1.5), 0, math.sqrt(1.5)])
    assert zscore(np.array([0.1] * 7)).tolist() == [0.0] * 7  # no spurious spread
    assert zscore(np.zeros(0)).tolist() == []


@pytest.mark.parametrize("sources, counts, k, expected", [
    ([0, 1, 2], [5, 3, 2], 7, [4, 2, 1]),   # 3.5, 2.1, 1.4 -> floors 3, 2, 1; seat to rem .5
    ([0, 1, 2], [1, 1, 1], 2, [1, 1, 0]),   # equal remainders: the lower source ids
    ([5, 2, 9], [1, 1, 1], 1, [0, 1, 0]),   # ties by source id, not position
    ([0, 1], [6, 10], 8, [3, 5]),           # exact
    ([0, 1], [6, 10], 7, [3, 4]),           # 2.625, 4.375: the seat goes to .625
    ([0, 1], [6, 10], 16, [6, 10]),
    ([0, 1], [6, 10], 0, [0, 0]),
])
def test_source_budgets_largest_remainder(sources, counts, k, expected):
    assert source_budgets(np.array(sources), np.array(counts), k).tolist() == expected


def test_source_budgets_total_and_bounds_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(1, 50, int(rng.integers(1, 6)))
        k = int(rng.integers(0, counts.sum() + 1))
        b = source_budgets(np.arange(len(counts)), counts, k)
        assert b.sum() == k and np.all(b <= counts) and np.all(b >= 0)
        # within one seat of the exact share
        assert np.all(np.abs(b - k * counts / counts.sum()) < 1)
    with pytest.raises(ValueError):
        source_budgets(np.arange(2), np.array([1, 1]), 3)


def _cfg(**selection):
    return parse_attent({"seed": 2, "selection": selection})


# code (source 0): ids 0..7, losses 5.0..5.7; prose (source 1): ids 8..15, losses 1.0..1.7
CROWD_SCORES = np.r_[5.0 + 0.1 * np.arange(8), 1.0 + 0.1 * np.arange(8)]
CROWD_SOURCES = np.r_[np.zeros(8, np.int64), np.ones(8, np.int64)]


def _select(cfg, scores, sources=None, k=8, p=1, unscored=None, invalid=None):
    n = len(scores)
    unscored = np.zeros(n, bool) if unscored is None else unscored
    invalid = np.zeros(n, bool) if invalid is None else invalid
    ids, s, src = candidates(cfg, scores, unscored, invalid, sources)
    return select_candidates(cfg, p, ids, s, src, k)


def test_a_high_loss_source_cannot_crowd_out_the_rest():
    plain = _select(_cfg(method="hard"), CROWD_SCORES)
    assert plain.ids.tolist() == list(range(8))  # plain hard top-k: all code, no prose
    per = _select(_cfg(method="hard", per_source=True), CROWD_SCORES, CROWD_SOURCES)
    assert per.ids.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]  # 4 + 4, each source's top half


def test_per_source_budgets_follow_candidate_counts_and_skip_invalid():
    # 6 code (ids 0..5), 10 prose (ids 6..15); k = 7: budgets 3 and 4 (2.625 + 4.375)
    scores = np.arange(16.0)
    sources = np.r_[np.zeros(6, np.int64), np.ones(10, np.int64)]
    sel = _select(_cfg(method="hard", per_source=True), scores, sources, k=7)
    assert sel.ids.tolist() == [3, 4, 5, 12, 13, 14, 15]
    # two invalid code ids: 4 code candidates, 10 prose; k = 7 -> 2 (2.0) and 5 (5.0)
    invalid = np.zeros(16, bool)
    invalid[[4, 5]] = True
    sel = _select(_cfg(method="hard", per_source=True), scores, sources, k=7, invalid=invalid)
    assert sel.ids.tolist() == [2, 3, 11, 12, 13, 14, 15]


def test_per_source_scores_are_normalised_within_each_source():
    ids, z, src = candidates(_cfg(method="hard", per_source=True), CROWD_SCORES,
                             np.zeros(16, bool), np.zeros(16, bool), CROWD_SOURCES)
    assert ids.tolist() == list(range(16)) and src.tolist() == CROWD_SOURCES.tolist()
    assert np.allclose(z[:8], zscore(CROWD_SCORES[:8])) and np.allclose(z[8:], z[:8])
    # a source's scale and offset do not matter (they would without normalisation)
    shifted = CROWD_SCORES.copy()
    shifted[8:] = shifted[8:] * 40.0 - 300.0
    for method in ("hard", "soft", "infobatch", "random"):
        cfg = _cfg(method=method, per_source=True)
        assert _select(cfg, shifted, CROWD_SOURCES).ids.tolist() == \
            _select(cfg, CROWD_SCORES, CROWD_SOURCES).ids.tolist(), method
    # a source with zero spread scores 0 everywhere: ties go to the lower ids
    flat = CROWD_SCORES.copy()
    flat[8:] = 3.0
    _, z, _ = candidates(_cfg(method="hard", per_source=True), flat, np.zeros(16, bool),
                         np.zeros(16, bool), CROWD_SOURCES)
    assert z[8:].tolist() == [0.0] * 8
    assert _select(_cfg(method="hard", per_source=True), flat, CROWD_SOURCES).ids.tolist() == \
        [4, 5, 6, 7, 8, 9, 10, 11]


def test_per_source_unscored_ids_take_their_own_sources_best_score():
    scores = CROWD_SCORES.copy()
    unscored = np.zeros(16, bool)
    unscored[[0, 8]] = True  # one per source; their scores are not known
    scores[[0, 8]] = np.nan
    ids, z, _ = candidates(_cfg(method="hard", per_source=True), scores, unscored,
                           np.zeros(16, bool), CROWD_SOURCES)
    filled = CROWD_SCORES.copy()
    filled[0], filled[8] = 5.7, 1.7  # the best known score of code, of prose
    assert np.allclose(z[:8], zscore(filled[:8])) and np.allclose(z[8:], zscore(filled[8:]))
    # hard, 4 per source: the filled id ties with the best (5.7 / 1.7) and wins by lower id
    sel = _select(_cfg(method="hard", per_source=True), scores, CROWD_SOURCES, unscored=unscored)
    assert sel.ids.tolist() == [0, 5, 6, 7, 8, 13, 14, 15]


def test_per_source_soft_draws_each_source_with_its_own_generator():
    cfg = _cfg(method="soft", per_source=True, temperature=2.0, rescale=True)
    sel = _select(cfg, CROWD_SCORES, CROWD_SOURCES, k=6, p=3)
    parts, means = [], []
    for s, members in ((0, np.arange(8)), (1, np.arange(8, 16))):
        ref = select_gumbel_topk(zscore(CROWD_SCORES[members]), members, 3, 2.0,
                                 make_rng(2, 3, PURPOSE_SELECT, s), rescale=True)
        parts.append(ref)
    assert sel.ids.tolist() == sorted(parts[0].ids.tolist() + parts[1].ids.tolist())
    # per source the weights are proportional to that source's own rescaled weights
    w0, w1 = sel.weights[sel.ids < 8], sel.weights[sel.ids >= 8]
    assert np.allclose(w0 / w0.mean(), parts[0].weights) and \
        np.allclose(w1 / w1.mean(), parts[1].weights)
    assert sel.weights.mean() == pytest.approx(1.0, rel=1e-12)
    assert not np.allclose(sel.weights, 1.0)
    # deterministic; other passes and seeds differ
    assert _select(cfg, CROWD_SCORES, CROWD_SOURCES, k=6, p=3).checksum == sel.checksum
    draws = {tuple(_select(cfg, CROWD_SCORES, CROWD_SOURCES, k=6, p=q).ids) for q in range(8)}
    assert len(draws) > 3
    other = {tuple(_select(_cfg(method="soft", per_source=True, temperature=2.0), CROWD_SCORES,
                           CROWD_SOURCES, k=6, p=3).ids)}
    seeds = {tuple(_select(parse_attent({"seed": s, "selection": {
        "method": "soft", "per_source": True, "temperature": 2.0}}), CROWD_SCORES,
        CROWD_SOURCES, k=6, p=3).ids) for s in range(8)}
    assert other <= seeds and len(seeds) > 3


def test_per_source_infobatch_hand_example():
    # source 0: ids 0..3 scores [0, 0, 0, 4] (id 3 above its mean); source 1: ids 4..7 scores
    # [1, 2, 3, 10] (id 7 above). k = 4: 2 per source = its hard id + one uniform easy id.
    scores = np.array([0.0, 0.0, 0.0, 4.0, 1.0, 2.0, 3.0, 10.0])
    sources = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    cfg = _cfg(method="infobatch", per_source=True, rescale=True)
    sel = _select(cfg, scores, sources, k=4, p=2)
    n0, n1 = _noise(2, 2, [0, 1, 2, 3], 0), _noise(2, 2, [4, 5, 6, 7], 1)
    easy = _top({i: n0[i] for i in (0, 1, 2)}, 1) + _top({i: n1[i] for i in (4, 5, 6)}, 1)
    assert sel.ids.tolist() == sorted(easy + [3, 7])
    # raw: hard 1, easy 3 / 1 = 3 -> mean 2 -> 0.5 and 1.5
    assert sel.weights.tolist() == [1.5 if i in easy else 0.5 for i in sel.ids.tolist()]


def test_per_source_random_is_stratified_and_rescaled_across_sources():
    # 6 code, 10 prose, k = 7 -> 3 and 4 kept: raw weights 6/3 = 2 and 10/4 = 2.5, mean
    # (3 * 2 + 4 * 2.5) / 7 = 16/7 -> code 0.875, prose 1.09375
    scores = np.zeros(16)
    sources = np.r_[np.zeros(6, np.int64), np.ones(10, np.int64)]
    sel = _select(_cfg(method="random", per_source=True, rescale=True), scores, sources, k=7)
    assert np.sum(sel.ids < 6) == 3 and np.sum(sel.ids >= 6) == 4
    expected_code = select_random(np.arange(6), 3, make_rng(2, 1, PURPOSE_SELECT, 0)).ids
    expected_prose = select_random(np.arange(6, 16), 4, make_rng(2, 1, PURPOSE_SELECT, 1)).ids
    assert sel.ids.tolist() == sorted(expected_code.tolist() + expected_prose.tolist())
    assert np.allclose(sel.weights, [0.875] * 3 + [1.09375] * 4, rtol=1e-15)
    plain = _select(_cfg(method="random", per_source=True), scores, sources, k=7)
    assert plain.weights.tolist() == [1.0] * 7


def test_per_source_skip_top_is_within_each_source():
    # skip_top 0.25: the top 2 of each source of 8 are removed, then 3 per source (k = 6)
    cfg = _cfg(method="hard", per_source=True, skip_top=0.25)
    sel = _select(cfg, CROWD_SCORES, CROWD_SOURCES, k=6)
    assert sel.ids.tolist() == [3, 4, 5, 11, 12, 13]


def test_without_per_source_selection_matches_the_policy_functions():
    # the refactored path is the old one: same functions, same generator
    scores = np.linspace(0.5, 3.0, 16)
    for method, ref in (("hard", lambda: select_topk(scores, np.arange(16), 8)),
                        ("soft", lambda: select_gumbel_topk(scores, np.arange(16), 8, 1.0,
                                                            make_rng(2, 1, PURPOSE_SELECT))),
                        ("random", lambda: select_random(np.arange(16), 8,
                                                         make_rng(2, 1, PURPOSE_SELECT))),
                        ("infobatch", lambda: select_infobatch(scores, np.arange(16), 8,
                                                               make_rng(2, 1, PURPOSE_SELECT)))):
        assert _select(_cfg(method=method), scores).checksum == ref().checksum, method


def test_sources_and_reference_are_checked():
    assert check_sources(np.array([0, 1, 1], np.int32), 3).dtype == np.int64
    with pytest.raises(ValueError, match=r"sources: got an array of shape \(2,\)"):
        check_sources(np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="sources: got an array of shape .* dtype float64"):
        check_sources(np.array([0.0, 1.0, 1.0]), 3)
    with pytest.raises(ValueError, match="negative source id -1"):
        check_sources(np.array([0, -1, 1]), 3)
    assert np.isnan(check_reference(np.array([0.5, np.nan], np.float32), 2)[1])
    with pytest.raises(ValueError, match="reference: got an array"):
        check_reference(np.array([1, 2]), 2)


def test_new_modules_are_pure():
    from test_purity import FORBIDDEN, PKG, imported_modules
    for name in ("selection_rules.py", "teacher_state.py"):
        bad = sorted(m for m in imported_modules(PKG / name)
                     if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
        assert not bad, (name, bad)
        assert not any(m == "torch" or m.startswith("torch.")
                       for m in imported_modules(PKG / name)), name
