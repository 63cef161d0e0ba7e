"""Tests of the teacher (attent_scale/teacher.py) with LocalComm and a two-rank thread comm.

Expected selections are computed independently with Python's sorted() on (-score, id).
"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from attent_scale.comm import LocalComm
from attent_scale.config import parse_attent
from attent_scale.policy import round_budget, selection_checksum
from attent_scale.teacher import SelectionError, Teacher

N, G = 1000, 16


def _teacher(section, n=N, passes=4, g=G, comm=None, data_seed=0, **kw):
    cfg = parse_attent(section) if section is not None else None
    return Teacher(cfg, n, passes, g, comm or LocalComm(), data_seed=data_seed, **kw)


def _top(scores: dict[int, float], k: int) -> list[int]:
    return sorted(sorted(scores, key=lambda i: (-scores[i], i))[:k])


def _record_in_batches(t: Teacher, ids, scores, g=G, stamp0=0):
    ids = np.asarray(ids)
    scores = np.asarray(scores, dtype=float)
    for j, s in enumerate(range(0, len(ids), g)):
        t.record(ids[s:s + g], scores[s:s + g], stamp=stamp0 + j)


def _tied_scores(n=N):
    # integer-valued with many ties (101 distinct values for 1000 ids)
    return np.array([(i * 37) % 101 for i in range(n)], dtype=float)


# ---- two simulated ranks -------------------------------------------------------------------------

class _Hub:
    def __init__(self, world: int = 2):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=20)
        self.slots: list = [None] * world


class ThreadComm:
    """Collectives between threads: each thread is one data-parallel rank."""

    def __init__(self, hub: _Hub, rank: int):
        self.hub, self.rank, self.world = hub, rank, hub.world

    def _exchange(self, value):
        self.hub.slots[self.rank] = value
        self.hub.barrier.wait()
        seen = list(self.hub.slots)
        self.hub.barrier.wait()
        return seen

    def gather(self, *arrays):
        seen = self._exchange([np.asarray(a) for a in arrays])
        return tuple(np.concatenate([seen[r][i] for r in range(self.world)])
                     for i in range(len(arrays)))

    def agree(self, value: int, what: str) -> None:
        seen = self._exchange(int(value))
        if len(set(seen)) != 1:
            raise RuntimeError(f"ranks disagree on {what}: {seen}")


def _on_ranks(*fns):
    results, errors = [None] * len(fns), [None] * len(fns)

    def run(r):
        try:
            results[r] = fns[r]()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors[r] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(fns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads)
    return results, errors


# ---- no teacher ----------------------------------------------------------------------------------

def test_no_teacher_full_passes_with_remainder_rule():
    t = _teacher(None, passes=3)
    assert not t.enabled
    assert t.pool_ids(0) is None
    dropped = []
    for p in range(3):
        sel, summary = t.begin_pass(p)
        assert summary is None
        assert len(sel.ids) == 992  # 62 global batches of 16
        assert np.all(np.diff(sel.ids) > 0) and sel.ids[0] >= 0 and sel.ids[-1] < N
        assert np.all(sel.weights == 1.0)
        assert t.weights_for(sel.ids[:5]) is None
        dropped.append(frozenset(set(range(N)) - set(sel.ids.tolist())))
        assert len(dropped[-1]) == 8
    assert len(set(dropped)) == 3  # a different draw each pass
    # same on a re-run; different with another data seed
    again = _teacher(None, passes=3)
    other = _teacher(None, passes=3, data_seed=1)
    for p in range(3):
        assert set(range(N)) - set(again.begin_pass(p)[0].ids.tolist()) == dropped[p]
    assert set(range(N)) - set(other.begin_pass(0)[0].ids.tolist()) != dropped[0]
    assert t.planned_samples() == 3 * 992
    assert t.planned_steps() == 3 * 62


def test_no_teacher_ignores_records_and_divisible_dataset_is_complete():
    t = _teacher(None, n=1024, passes=2)
    t.record(np.arange(10), np.ones(10), stamp=0)
    t.sync()
    assert not t.scored.any()
    assert t.begin_pass(0)[0].ids.tolist() == list(range(1024))


def test_dataset_smaller_than_global_batch_rejected():
    with pytest.raises(SelectionError, match="fewer than one global batch"):
        _teacher(None, n=15, g=16)


# ---- attent-simple -------------------------------------------------------------------------------

def test_attent_simple_selects_top_k_with_ties_by_id():
    t = _teacher({"preset": "attent-simple"})
    assert t.wants_free_scores()
    sel0, s0 = t.begin_pass(0)
    assert s0 is None and len(sel0.ids) == 992
    scores = _tied_scores()
    _record_in_batches(t, np.arange(N), scores)  # every id scored
    sel1, s1 = t.begin_pass(1)
    k = round_budget(N, 0.7, G)
    assert k == 688
    expected = _top(dict(enumerate(scores.tolist())), k)
    assert sel1.ids.tolist() == expected
    assert np.all(sel1.weights == 1.0)
    # the tie at the cut really is broken by id (the cut falls inside a group of equal scores)
    cut = sorted(scores, reverse=True)[k - 1]
    assert (scores == cut).sum() > sum(scores[expected] == cut)
    assert s1.pass_index == 1 and s1.kind == "subset" and s1.round == 0
    assert s1.ratio == 0.7 and s1.selected == 688 and s1.skipped == 312
    assert s1.invalid == 0 and s1.unscored == 0
    assert s1.checksum == selection_checksum(np.array(expected), np.ones(k)) == sel1.checksum
    assert s1.selected_mean_score == pytest.approx(np.mean(scores[expected]))
    assert s1.score_quantiles == pytest.approx(list(np.quantile(scores, [0.1, 0.5, 0.9])))
    assert "pass 1 subset" in s1.line() and "kept 688" in s1.line()
    # passes 2 and 3 keep the selection even though new (reversed) scores arrive
    _record_in_batches(t, np.arange(N), -scores, stamp0=1000)
    for p in (2, 3):
        sel, summary = t.begin_pass(p)
        assert summary is None
        assert sel.ids.tolist() == expected


def test_attent_simple_unscored_ids_compete_with_best_score():
    # only the 992 ids of pass 0 get scores; the 8 dropped ones take the best known score
    t = _teacher({"preset": "attent-simple"})
    sel0, _ = t.begin_pass(0)
    scores = _tied_scores()
    _record_in_batches(t, sel0.ids, scores[sel0.ids])
    sel1, s1 = t.begin_pass(1)
    best = scores[sel0.ids].max()
    effective = {i: (scores[i] if i in set(sel0.ids.tolist()) else best) for i in range(N)}
    assert sel1.ids.tolist() == _top(effective, 688)
    assert s1.unscored == 8
    dropped = set(range(N)) - set(sel0.ids.tolist())
    assert dropped <= set(sel1.ids.tolist())


def test_latest_stamp_wins_on_one_rank():
    t = _teacher({"preset": "attent-simple"}, n=64)
    t.record(np.array([5, 6]), np.array([1.0, 2.0]), stamp=10)
    t.record(np.array([5]), np.array([100.0]), stamp=3)  # older, recorded later
    t.record(np.array([6]), np.array([-7.0]), stamp=11)
    t.sync()
    assert t.scores[5] == 1.0
    assert t.scores[6] == -7.0
    assert t.scored.sum() == 2
    # a later sync overwrites
    t.record(np.array([5]), np.array([3.0]), stamp=0)
    t.sync()
    assert t.scores[5] == 3.0


def test_sync_rejects_out_of_range_ids():
    t = _teacher({"preset": "attent-simple"}, n=64)
    t.record(np.array([64]), np.array([1.0]), stamp=0)
    with pytest.raises(ValueError, match="outside"):
        t.sync()


def test_invalid_scores_never_selected_and_counted():
    n = 64
    t = _teacher({"preset": "attent-simple"}, n=n)
    scores = np.arange(n, dtype=float)
    scores[63], scores[62], scores[61] = np.inf, np.nan, -np.inf
    t.begin_pass(0)
    _record_in_batches(t, np.arange(n), scores)
    sel, summary = t.begin_pass(1)
    # budget floor(44.8) -> 32; the 32 best finite scores are ids 29..60
    assert sel.ids.tolist() == list(range(29, 61))
    assert summary.invalid == 3 and summary.unscored == 0
    assert summary.selected == 32
    assert summary.score_quantiles == pytest.approx(list(np.quantile(np.arange(61.0),
                                                                     [0.1, 0.5, 0.9])))


def test_many_invalid_scores_shrink_budget_to_whole_batches():
    n = 64
    t = _teacher({"preset": "attent-simple"}, n=n)
    scores = np.arange(n, dtype=float)
    scores[:40] = np.nan  # 24 selectable -> one global batch of 16
    t.begin_pass(0)
    _record_in_batches(t, np.arange(n), scores)
    sel, summary = t.begin_pass(1)
    assert sel.ids.tolist() == list(range(48, 64))
    assert summary.invalid == 40 and summary.selected == 16


def test_all_invalid_raises_selection_error():
    t = _teacher({"preset": "attent-simple"}, n=64)
    t.begin_pass(0)
    _record_in_batches(t, np.arange(64), np.full(64, np.nan))
    with pytest.raises(SelectionError, match="64 with NaN/inf"):
        t.begin_pass(1)


def test_budget_rounding_to_zero_raises_helpful_error():
    t = _teacher({"preset": "attent-simple"}, n=20)  # 0.7 * 20 = 14 < 16
    assert len(t.begin_pass(0)[0].ids) == 16
    _record_in_batches(t, np.arange(20), np.arange(20.0))
    with pytest.raises(SelectionError) as ei:
        t.begin_pass(1)
    msg = str(ei.value)
    assert "rounds to zero" in msg
    assert "pass 1" in msg and "0.7000" in msg and "20 samples" in msg
    assert "global batch of 16" in msg
    assert "attent.ratio" in msg


def test_skip_top_excludes_highest_scores():
    n = 64
    t = _teacher({"preset": "attent-simple", "selection": {"skip_top": 0.25}}, n=n)
    t.begin_pass(0)
    _record_in_batches(t, np.arange(n), np.arange(n, dtype=float))
    sel, _ = t.begin_pass(1)
    # ids 48..63 are skipped (floor(0.25 * 64) = 16); top 32 of the rest: 16..47
    assert sel.ids.tolist() == list(range(16, 48))


# ---- planned samples -----------------------------------------------------------------------------

def test_planned_samples_attent_simple():
    t = _teacher({"preset": "attent-simple"})
    assert [t.pass_size(p) for p in range(4)] == [992, 688, 688, 688]
    assert t.planned_samples() == 992 + 3 * 688 == 3056
    assert t.planned_steps() == 3056 // 16
    # and it is what the passes actually train
    scores = _tied_scores()
    total = 0
    for p in range(4):
        sel, _ = t.begin_pass(p)
        assert len(sel.ids) == t.pass_size(p)
        total += len(sel.ids)
        _record_in_batches(t, sel.ids, scores[sel.ids], stamp0=100 * p)
    assert total == t.planned_samples()


def test_planned_samples_attent_complex():
    t = _teacher({"preset": "attent-complex"}, passes=10)
    # full passes 0, 2, 5, 9: 992; ratios 0.2 -> 192, 0.35 -> 336 (x2), 0.575 -> 560 (x3)
    assert [t.pass_size(p) for p in range(10)] == [992, 192, 992, 336, 336, 992, 560, 560, 560,
                                                   992]
    assert t.planned_samples() == 4 * 992 + 192 + 2 * 336 + 3 * 560 == 6512
    total = 0
    rng = np.random.default_rng(0)
    for p in range(10):
        pool = t.pool_ids(p)
        if pool is not None:
            t.record(pool, rng.normal(size=len(pool)), stamp=p)
        sel, summary = t.begin_pass(p)
        assert (summary is not None) == t.plan[p].select
        total += len(sel.ids)
    assert total == 6512


# ---- soft selection and weights ------------------------------------------------------------------

def test_soft_rescale_weights_mean_one_and_weights_for():
    t = _teacher({"preset": "attent-simple",
                  "selection": {"method": "soft", "rescale": True, "temperature": 0.5}})
    t.begin_pass(0)
    scores = np.linspace(-2.0, 2.0, N)
    _record_in_batches(t, np.arange(N), scores)
    sel, summary = t.begin_pass(1)
    assert len(sel.ids) == 688 and len(set(sel.ids.tolist())) == 688
    assert np.all(np.diff(sel.ids) > 0)
    assert sel.weights.mean() == pytest.approx(1.0, rel=1e-12)
    assert np.all(sel.weights > 0) and sel.weights.std() > 1e-3
    assert summary.checksum == selection_checksum(sel.ids, sel.weights)
    # per id, in any order
    perm = np.random.default_rng(1).permutation(len(sel.ids))
    w = t.weights_for(sel.ids[perm])
    assert np.array_equal(w, sel.weights[perm])
    lookup = dict(zip(sel.ids.tolist(), sel.weights.tolist()))
    some = sel.ids[[5, 0, 100]]
    assert t.weights_for(some).tolist() == [lookup[int(i)] for i in some]
    # soft selection prefers high scores: its mean score is above the overall mean
    assert summary.selected_mean_score > 0.3
    # deterministic for the seed: a second teacher fed the same scores selects the same
    t2 = _teacher({"preset": "attent-simple",
                   "selection": {"method": "soft", "rescale": True, "temperature": 0.5}})
    t2.begin_pass(0)
    _record_in_batches(t2, np.arange(N), scores)
    assert t2.begin_pass(1)[0].checksum == sel.checksum


def test_hard_selection_has_no_weights():
    t = _teacher({"preset": "attent-simple"}, n=64)
    t.begin_pass(0)
    _record_in_batches(t, np.arange(64), np.arange(64.0))
    sel, _ = t.begin_pass(1)
    assert t.weights_for(sel.ids) is None


def test_random_preset_selects_each_pass_independently_of_scores():
    t = _teacher({"preset": "random"}, n=160, passes=3)
    t.begin_pass(0)
    _record_in_batches(t, np.arange(160), np.arange(160.0))
    a, sa = t.begin_pass(1)
    b, sb = t.begin_pass(2)
    assert len(a.ids) == len(b.ids) == 112  # floor(0.7 * 160) = 112 = 7 * 16
    assert sa is not None and sb is not None
    assert a.ids.tolist() != b.ids.tolist()
    assert a.ids.tolist() != list(range(48, 160))  # not the top scores
    assert t.weights_for(a.ids) is None


# ---- state ---------------------------------------------------------------------------------------

SOFT = {"preset": "attent-simple", "seed": 3,
        "selection": {"method": "soft", "rescale": True}}


def test_state_round_trip_and_resume(tmp_path):
    t = _teacher(SOFT, n=160)
    t.begin_pass(0)
    scores = np.linspace(0.0, 3.0, 150)
    _record_in_batches(t, np.arange(150), scores)  # ids 150..159 never scored
    sel, _ = t.begin_pass(1)
    t.save(tmp_path, extra={"global_step": 17})
    assert (tmp_path / "attent_state.json").exists() and (tmp_path / "attent_state.npz").exists()
    meta, arrays = Teacher.read(tmp_path)
    assert meta["global_step"] == 17 and meta["num_samples"] == 160 and meta["selection_pass"] == 1
    assert json.loads((tmp_path / "attent_state.json").read_text())["version"] == meta["version"]

    r = _teacher(SOFT, n=160)
    r.load_state_dict(meta, arrays)
    assert np.array_equal(r.scores, t.scores, equal_nan=True)
    assert np.isnan(r.scores[150:]).all()
    assert np.array_equal(r.scored, t.scored) and r.scored.sum() == 150
    assert np.array_equal(r.selection.ids, sel.ids)
    assert np.array_equal(r.selection.weights, sel.weights)
    # resumed inside pass 1: the same ids and weights, no new selection even with new scores
    r.record(np.arange(160), np.arange(160.0)[::-1], stamp=99)
    again, summary = r.begin_pass(1)
    assert summary is None
    assert again.ids.tolist() == sel.ids.tolist()
    assert np.array_equal(again.weights, sel.weights)
    assert again.checksum == sel.checksum
    assert np.array_equal(r.weights_for(sel.ids), sel.weights)
    # and the next pass of the round keeps it too
    assert r.begin_pass(2)[0].checksum == sel.checksum


def test_resumed_teacher_at_later_pass_keeps_selection(tmp_path):
    t = _teacher({"preset": "attent-simple"}, n=64)
    t.begin_pass(0)
    _record_in_batches(t, np.arange(64), np.arange(64.0))
    sel, _ = t.begin_pass(1)
    t.save(tmp_path)
    r = _teacher({"preset": "attent-simple"}, n=64)
    r.load_state_dict(*Teacher.read(tmp_path))
    sel2, summary = r.begin_pass(2)  # not a selection pass
    assert summary is None and sel2.ids.tolist() == sel.ids.tolist() == list(range(32, 64))


def test_state_before_any_selection(tmp_path):
    t = _teacher({"preset": "attent-simple"}, n=64)
    t.record(np.arange(10), np.arange(10.0), stamp=0)
    with pytest.raises(RuntimeError, match="unsynced"):
        t.state_dict()
    t.sync()
    t.save(tmp_path)
    meta, arrays = Teacher.read(tmp_path)
    assert "selection_ids" not in arrays and meta["selection_pass"] == -1
    r = _teacher({"preset": "attent-simple"}, n=64)
    r.load_state_dict(meta, arrays)
    assert r.selection is None
    assert np.array_equal(r.scores[:10], np.arange(10.0)) and r.scored.sum() == 10


def test_load_state_for_other_dataset_or_version_rejected(tmp_path):
    t = _teacher({"preset": "attent-simple"}, n=64)
    t.save(tmp_path)
    meta, arrays = Teacher.read(tmp_path)
    other = _teacher({"preset": "attent-simple"}, n=80)
    with pytest.raises(ValueError, match="64 samples"):
        other.load_state_dict(meta, arrays)
    same = _teacher({"preset": "attent-simple"}, n=64)
    with pytest.raises(ValueError, match="version"):
        same.load_state_dict({**meta, "version": 999}, arrays)


# ---- pool source ---------------------------------------------------------------------------------

def test_pool_ids():
    cfg = {"preset": "attent-complex", "pool_size": 100}
    t = _teacher(cfg, passes=10)
    assert not t.wants_free_scores()
    assert t.pool_ids(0) is None  # warm-up full pass
    assert t.pool_ids(2) is None  # between-round full pass
    p1 = t.pool_ids(1)
    assert len(p1) == 100 and len(set(p1.tolist())) == 100
    assert np.all(np.diff(p1) > 0) and p1.min() >= 0 and p1.max() < N
    assert p1.dtype == np.int64
    assert np.array_equal(p1, _teacher(cfg, passes=10).pool_ids(1))  # deterministic
    assert not np.array_equal(p1, t.pool_ids(3))  # a fresh pool per selection
    assert not np.array_equal(p1, _teacher({**cfg, "seed": 1}, passes=10).pool_ids(1))
    whole = _teacher({"preset": "attent-complex"}, passes=10).pool_ids(1)
    assert whole.tolist() == list(range(N))
    assert _teacher({**cfg, "pool_size": 5000}, passes=10).pool_ids(1).tolist() == list(range(N))
    assert _teacher({"preset": "attent-simple"}).pool_ids(1) is None  # free source
    no_resample = _teacher({**cfg, "selection": {"resample_each_pass": False}}, passes=10)
    assert no_resample.pool_ids(3) is not None and no_resample.pool_ids(4) is None


def test_pool_source_unscored_ids_get_best_score():
    n = 64
    t = _teacher({"source": "pool", "warmup_passes": 0, "ratio": {"value": 0.5}}, n=n, passes=2)
    t.record(np.arange(10), np.arange(10.0), stamp=0)
    sel, summary = t.begin_pass(0)
    # 54 unscored ids take the best score 9 and tie with id 9: the 32 lowest ids of {9, 10..63}
    assert sel.ids.tolist() == list(range(9, 41))
    assert summary.unscored == 54


# ---- two ranks -----------------------------------------------------------------------------------

def test_two_ranks_merge_scores_and_agree():
    n, g = 64, 16
    hub = _Hub()
    ts = [_teacher({"preset": "attent-simple"}, n=n, g=g, comm=ThreadComm(hub, r)) for r in range(2)]
    scores = (np.arange(n) * 7 % 64).astype(float)  # a permutation of 0..63

    def rank(r):
        t = ts[r]
        t.begin_pass(0)
        mine = np.arange(r, n, 2)  # rank r scored the ids of its shard
        t.record(mine, scores[mine], stamp=1)
        # id 3 was scored by both ranks: rank 1's record is newer and wins everywhere
        if r == 0:
            t.record(np.array([3]), np.array([1000.0]), stamp=5)
        else:
            t.record(np.array([3]), np.array([-1000.0]), stamp=9)
        return t.begin_pass(1)

    results, errors = _on_ranks(lambda: rank(0), lambda: rank(1))
    assert errors == [None, None]
    (s0, _), (s1, _) = results
    effective = dict(enumerate(scores.tolist()))
    effective[3] = -1000.0
    expected = _top(effective, 32)
    assert s0.ids.tolist() == s1.ids.tolist() == expected
    assert 3 not in expected
    assert np.array_equal(ts[0].scores, ts[1].scores)
    assert ts[0].scores[3] == ts[1].scores[3] == -1000.0


def test_two_ranks_disagreeing_raise():
    n = 64
    hub = _Hub()
    ts = [_teacher({**SOFT, "seed": r}, n=n, comm=ThreadComm(hub, r)) for r in range(2)]

    def rank(r):
        t = ts[r]
        t.begin_pass(0)
        t.record(np.arange(r, n, 2), np.linspace(0, 1, 32), stamp=0)
        return t.begin_pass(1)

    _, errors = _on_ranks(lambda: rank(0), lambda: rank(1))
    assert all(isinstance(e, RuntimeError) and "disagree" in str(e) for e in errors), errors


def test_soft_log_transform_samples_proportional_to_the_score():
    section = {"warmup_passes": 1, "ratio": {"value": 0.5}, "interval": {"schedule": "once"},
               "selection": {"method": "soft", "transform": "log", "rescale": True}, "seed": 3}
    t = _teacher(section, passes=2)
    full, _ = t.begin_pass(0)
    scores = np.linspace(0.5, 4.0, N)
    _record_in_batches(t, np.arange(N), scores)
    sel, _ = t.begin_pass(1)
    # Independently: Gumbel-top-k on log(score) with the teacher's generator for pass 1.
    from attent_scale.policy import PURPOSE_SELECT, make_rng, select_gumbel_topk
    k = round_budget(N, 0.5, G)
    expected = select_gumbel_topk(np.log(scores), np.arange(N), k, 1.0,
                                  make_rng(3, 1, PURPOSE_SELECT), rescale=True)
    assert np.array_equal(sel.ids, expected.ids)
    assert np.allclose(sel.weights, expected.weights)
    # The log transform keeps low scores in play: identity softmax over [0.5, 4] would not.
    assert sel.ids.min() < N // 4


# ---- reliability: NaN scores across a checkpoint, resume on another world size -----------------

def test_nan_scores_stay_invalid_across_a_checkpoint_and_are_reported(tmp_path):
    t = _teacher({"preset": "attent-simple"}, n=64)
    scores = np.arange(64, dtype=float)
    scores[[5, 60]] = [np.nan, np.inf]
    t.begin_pass(0)
    _record_in_batches(t, np.arange(64), scores)
    t.sync()
    t.save(tmp_path)
    r = _teacher({"preset": "attent-simple"}, n=64)
    r.load_state_dict(*Teacher.read(tmp_path))
    sel, summary = r.begin_pass(1)
    assert summary.invalid == 2 and "invalid 2" in summary.line()
    assert 5 not in sel.ids and 60 not in sel.ids


def test_resume_on_a_larger_global_batch_cuts_the_kept_selection(tmp_path):
    """A selection of 5 batches of 8 resumed where a global batch is 16: 32 of its ids stay, the
    same ones on every rank (seeded by the selection's pass), still sorted, weights kept."""
    t = _teacher(SOFT, n=64, g=8)
    t.begin_pass(0)
    _record_in_batches(t, np.arange(64), np.linspace(0.0, 2.0, 64), g=8)
    sel, _ = t.begin_pass(1)
    assert len(sel.ids) == 40
    t.save(tmp_path)
    cuts = []
    for _ in range(2):
        r = _teacher(SOFT, n=64, g=16)
        r.load_state_dict(*Teacher.read(tmp_path))
        cuts.append(r.selection)
        assert r.selection_resized == (40, 32)
    a, b = cuts
    assert len(a.ids) == 32 and a.checksum == b.checksum
    assert np.all(np.diff(a.ids) > 0) and np.isin(a.ids, sel.ids).all()
    assert np.array_equal(a.weights, sel.weights[np.isin(sel.ids, a.ids)])
    # The same state on a smaller global batch needs no cut.
    s = _teacher(SOFT, n=64, g=8)
    s.load_state_dict(*Teacher.read(tmp_path))
    assert s.selection_resized is None and s.selection.checksum == sel.checksum
    # Fewer ids than one global batch: a clear error.
    with pytest.raises(SelectionError, match="fewer than one global batch of 48"):
        _teacher(SOFT, n=64, g=48).load_state_dict(*Teacher.read(tmp_path))


# ---- InfoBatch, final full passes ----------------------------------------------------------------

def _noise_of(seed, p, ids, source=None):
    from attent_scale.policy import PURPOSE_SELECT, gumbel_noise, make_rng, noise_key
    key = noise_key(make_rng(seed, p, PURPOSE_SELECT, source))
    return dict(zip(ids, gumbel_noise(key, np.array(ids)).tolist()))


def test_infobatch_preset_plan_and_selection():
    t = _teacher({"preset": "infobatch", "seed": 4}, n=64, passes=4)
    assert [(q.kind, q.select) for q in t.plan] == [("full", False), ("subset", True),
                                                    ("subset", True), ("full", False)]
    # 0.7 x 64 = 44.8 -> 32 (two global batches of 16); full passes 64
    assert [t.pass_size(p) for p in range(4)] == [64, 32, 32, 64]
    assert t.planned_steps() == (64 + 32 + 32 + 64) // 16 == 12
    t.begin_pass(0)
    scores = np.where(np.arange(64) < 20, 10.0, 0.0)  # mean 3.125: ids 0..19 are hard
    _record_in_batches(t, np.arange(64), scores)
    sel, summary = t.begin_pass(1)
    noise = _noise_of(4, 1, list(range(64)))
    easy = _top({i: noise[i] for i in range(20, 64)}, 12)
    assert sel.ids.tolist() == list(range(20)) + easy
    # raw weights: hard 1, easy 44 / 12; mean (20 + 44) / 32 = 2 -> 0.5 and 11/6
    w = dict(zip(sel.ids.tolist(), sel.weights.tolist()))
    assert all(w[i] == pytest.approx(0.5, rel=1e-15) for i in range(20))
    assert all(w[i] == pytest.approx(11 / 6, rel=1e-15) for i in easy)
    assert t.weights_for(np.array([easy[0], 3])).tolist() == [w[easy[0]], w[3]]
    assert summary.selected == 32 and summary.selected_mean_score == pytest.approx(200 / 32)
    # the last pass is full, whatever the scores
    t.begin_pass(2)
    last, s3 = t.begin_pass(3)
    assert s3 is None and last.ids.tolist() == list(range(64)) and t.weights_for(last.ids) is None


def test_final_full_passes_counted_in_the_plan():
    t = _teacher({"preset": "attent-simple", "final_full_passes": 2}, passes=6)
    assert [t.pass_size(p) for p in range(6)] == [992, 688, 688, 688, 992, 992]
    assert t.planned_steps() == (3 * 992 + 3 * 688) // 16
    scores = _tied_scores()
    total = 0
    for p in range(6):
        sel, _ = t.begin_pass(p)
        assert len(sel.ids) == t.pass_size(p)
        total += len(sel.ids)
        _record_in_batches(t, sel.ids, scores[sel.ids], stamp0=100 * p)
    assert total == t.planned_samples()


# ---- learnability scores -------------------------------------------------------------------------

DROP = {"warmup_passes": 2, "score": "drop", "ratio": {"value": 0.5},
        "interval": {"schedule": "fixed", "every": 1}}


def test_drop_score_is_previous_minus_newest_and_once_scored_ids_compete_with_the_best(tmp_path):
    n = 64
    t = _teacher(DROP, n=n, passes=4)
    d = (np.arange(n) * 23 % 64).astype(float)  # the drop of each id: a permutation of 0..63
    t.begin_pass(0)
    t.record(np.arange(4, n), np.full(n - 4, 100.0), stamp=0)  # ids 0..3 miss the first score
    t.begin_pass(1)
    t.record(np.arange(n), 100.0 - d, stamp=1)
    sel, summary = t.begin_pass(2)  # one sync: two records per id, the runner-up is "previous"
    assert np.array_equal(t.scores, 100.0 - d)  # the table keeps the raw signal
    assert t.prev_scored.tolist() == [False] * 4 + [True] * (n - 4)
    effective = {i: (63.0 if i < 4 else d[i]) for i in range(n)}  # scored once: best known (63)
    assert sel.ids.tolist() == _top(effective, 32)
    assert {0, 1, 2, 3} <= set(sel.ids.tolist())
    assert summary.unscored == 4 and summary.invalid == 0
    # the summary describes the raw signal
    assert summary.score_quantiles == pytest.approx(
        list(np.quantile(100.0 - d, [0.1, 0.5, 0.9])))
    assert summary.selected_mean_score == pytest.approx(np.mean(100.0 - d[sel.ids]))
    # pass 2 re-scores its selection: their previous score is the table's (100 - d), newest 50
    t.record(sel.ids, np.full(32, 50.0), stamp=2)
    t.sync()
    t.save(tmp_path)
    r = _teacher(DROP, n=n, passes=4)
    r.load_state_dict(*Teacher.read(tmp_path), pass_index=3)
    assert np.array_equal(r.prev_scores, t.prev_scores, equal_nan=True)
    assert np.array_equal(r.prev_scored, t.prev_scored)
    nxt, _ = t.begin_pass(3)
    again, _ = r.begin_pass(3)
    assert nxt.checksum == again.checksum
    effective = {i: d[i] for i in range(4, n)}
    for i in sel.ids.tolist():
        effective[i] = (100.0 - d[i]) - 50.0
    for i in range(4):  # now scored twice: 100 - d_i, then 50
        effective[i] = 50.0 - d[i]
    assert nxt.ids.tolist() == _top(effective, 32)


def test_drop_ignores_nan_previous_and_keeps_nan_newest_invalid():
    n = 32
    t = _teacher({**DROP, "ratio": {"value": 0.5}}, n=n, passes=3)
    first = np.ones(n)
    first[5] = np.nan
    t.begin_pass(0)
    t.record(np.arange(n), first, stamp=0)
    t.begin_pass(1)
    second = np.zeros(n)
    second[7] = np.nan
    t.record(np.arange(n), second, stamp=1)
    sel, summary = t.begin_pass(2)
    # drops: 1 everywhere; id 5 has a NaN previous (unscored, fill = 1); id 7 NaN newest: invalid
    assert summary.invalid == 1 and summary.unscored == 1
    assert 7 not in sel.ids and sel.ids.tolist() == [i for i in range(17) if i != 7]


def test_reducible_score_subtracts_the_reference():
    n = 64
    signal = (np.arange(n) * 7 % 64).astype(float)
    reference = (np.arange(n) % 8).astype(float) * 10.0
    reference[[3, 9]] = np.nan  # unknown: unscored, they compete with the best known
    t = _teacher({"preset": "attent-simple", "score": "reducible"}, n=n, reference=reference)
    t.begin_pass(0)
    _record_in_batches(t, np.arange(n), signal)
    sel, summary = t.begin_pass(1)
    eff = signal - np.nan_to_num(reference)
    best = max(eff[i] for i in range(n) if i not in (3, 9))
    effective = {i: (best if i in (3, 9) else eff[i]) for i in range(n)}
    assert sel.ids.tolist() == _top(effective, 32)
    assert summary.unscored == 2
    assert sel.ids.tolist() != _top(dict(enumerate(signal.tolist())), 32)  # raw would differ


# ---- per source ------------------------------------------------------------------------------------

def test_per_source_teacher_keeps_each_sources_share():
    n = 64
    sources = np.where(np.arange(n) < 16, 1, 0)  # prose: ids 0..15; code: ids 16..63
    scores = np.where(sources == 0, 5.0, 1.0) + np.arange(n) * 1e-3  # code losses are higher
    plain = _teacher({"preset": "attent-simple", "ratio": {"value": 0.5}}, n=n)
    per = _teacher({"preset": "attent-simple", "ratio": {"value": 0.5},
                    "selection": {"per_source": True}}, n=n, sources=sources)
    out = []
    for t in (plain, per):
        t.begin_pass(0)
        _record_in_batches(t, np.arange(n), scores)
        out.append(t.begin_pass(1)[0].ids.tolist())
    assert out[0] == list(range(32, 64))  # plain: only code
    # per source: 32 x 48/64 = 24 code (its top: 40..63), 32 x 16/64 = 8 prose (its top: 8..15)
    assert out[1] == list(range(8, 16)) + list(range(40, 64))


class _TwoRanks:
    rank, world = 0, 2


def test_missing_inputs_are_refused_at_construction_with_their_keys():
    from attent_scale.config import ConfigError
    with pytest.raises(ConfigError) as ei:
        _teacher({"selection": {"per_source": True, "method": "soft"}, "score": "reducible"})
    lines = str(ei.value).splitlines()
    assert lines[0] == "invalid 'attent' section (1 problem):"
    assert lines[1].strip().startswith("attent.score: got 'reducible' but the job gave the "
                                       "teacher no reference scores;")
    assert "fix: pass the reference model's per-sample loss" in lines[1]
    with pytest.raises(ConfigError, match=r"attent\.selection\.sharding: got 'sharded' but "
                                          r"selection\.per_source needs"):
        _teacher({"selection": {"per_source": True, "sharding": "sharded"}},
                 sources=np.zeros(N, np.int64))
    with pytest.raises(ConfigError, match=r"got 'auto', sharded here \(1000 samples > "
                                          r"sharding_threshold 10 on 2 ranks\)"):
        Teacher(parse_attent({"selection": {"per_source": True, "sharding_threshold": 10}}), N,
                4, G, _TwoRanks(), sources=np.zeros(N, np.int64))
    with pytest.raises(ValueError, match="sources: got an array of shape"):
        _teacher({"selection": {"per_source": True}}, sources=np.zeros(10, np.int64))
    # per_source without source ids: one source holding every sample
    one = _teacher({"selection": {"per_source": True, "method": "soft"}})
    assert one.sources is not None and not one.sources.any()
    # given but unused inputs are fine (recorded in the identity)
    t = _teacher({"preset": "attent-simple"}, sources=np.zeros(N, np.int64),
                 reference=np.zeros(N))
    assert t.identity["sources"] is not None and t.identity["reference"] is not None


def test_soft_temperature_guard_through_the_teacher():
    t = _teacher({"preset": "attent-soft", "selection": {"temperature": 0.001}}, n=64)
    t.begin_pass(0)
    _record_in_batches(t, np.arange(64), np.full(64, 1e306))
    with pytest.raises(SelectionError, match=r"^attent\.selection\.temperature: got 0\.001;"):
        t.begin_pass(1)
