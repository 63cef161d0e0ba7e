"""The sharded selection (attent_scale/sharded_select.py) equals the whole-array one, bit for bit.

References are policy.py's whole-array functions (themselves tested against brute force in
test_policy.py). The algorithm is unit-tested on simulated shards (one thread per rank, a barrier
as the all-reduce); multi-rank behaviour runs real gloo processes (tests/sharded_worker.py).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from attent_scale.comm import LocalComm
from attent_scale.config import ConfigError, parse_attent
from attent_scale.policy import (PURPOSE_SELECT, SelectionError, exact_mean, make_rng,
                                 select_gumbel_topk, select_infobatch, select_random, select_topk,
                                 selection_checksum)
from attent_scale.sharded_select import (ShardedScoreTable, kth_largest, order_key, quantiles,
                                         shard_range, sharded_exact_mean, sharded_gumbel_topk,
                                         sharded_infobatch, sharded_topk)
from attent_scale.teacher import Teacher, use_sharding
from sharded_worker import (N, TEACHER_METHODS, case_scores, cases, teacher_records,
                            teacher_section)

WORKER = Path(__file__).with_name("sharded_worker.py")


class ThreadComm:
    """Simulated ranks in threads: all_reduce/gather meet at a barrier (pure-algorithm tests)."""

    def __init__(self, rank: int, world: int, shared: dict):
        self.rank, self.world, self.shared = rank, world, shared

    def _meet(self, value):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = value
        barrier.wait()
        seen = list(slots)
        barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return seen

    def all_reduce(self, array, op="sum"):
        parts = self._meet(np.array(array, copy=True))
        return {"sum": np.sum, "max": np.max}[op](np.stack(parts), axis=0)

    def gather(self, *arrays):
        parts = self._meet(arrays)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))

    def exchange(self, dest, *arrays):
        """All-to-all as comm.DistComm: what each rank sent here, in source-rank order."""
        parts = self._meet((np.asarray(dest), [np.asarray(a) for a in arrays]))
        return tuple(np.concatenate([a[i][d == self.rank] for d, a in parts])
                     for i in range(len(arrays)))

    def agree(self, value, what):
        seen = self._meet(int(value))
        if len(set(seen)) != 1:
            raise RuntimeError(f"ranks disagree on {what}: {seen}")


def run_threads(world: int, fn):
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world)}
    out, errors = [None] * world, []

    def body(r):
        try:
            out[r] = fn(ThreadComm(r, world, shared))
        except Exception as e:  # surfaced below; an exception in one rank would hang the others
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


# ---- pure algorithm ----------------------------------------------------------------------------

def test_order_key_is_monotone_and_zeros_tie():
    x = np.array([-np.inf, -1e308, -2.5, -1e-300, -0.0, 0.0, 1e-300, 3.0, 1e308, np.inf])
    k = order_key(x)
    assert np.all(np.diff(k[[0, 1, 2, 3, 4]].astype(object)) > 0)
    assert k[4] == k[5]  # -0.0 == 0.0
    assert np.all(np.diff(k[5:].astype(object)) > 0)
    rng = np.random.default_rng(0)
    y = rng.normal(size=1000) * 10.0 ** rng.integers(-5, 5, 1000)
    assert np.array_equal(np.argsort(order_key(y), kind="stable"), np.argsort(y, kind="stable"))


@pytest.mark.parametrize("world", [1, 3, 4])
def test_kth_largest_matches_sort(world):
    rng = np.random.default_rng(world)
    x = np.concatenate([rng.integers(0, 4, 300) * 1.0, rng.normal(size=300)])
    rng.shuffle(x)
    desc = np.sort(x)[::-1]
    for k in (1, 2, 150, 599, 600):
        got = run_threads(world, lambda c: kth_largest(
            order_key(x[slice(*shard_range(len(x), c.rank, c.world))]), k, c))
        thr, above = got[0]
        assert all(g == got[0] for g in got)
        assert thr == order_key(np.array([desc[k - 1]]))[0]
        assert above == np.count_nonzero(x > desc[k - 1])


@pytest.mark.parametrize("world", [2, 3])
def test_simulated_shards_equal_whole_array(world):
    for name, seed, method, o in cases():
        if method == "random":
            continue
        full = case_scores(seed)
        ok = ~np.isnan(full)

        def one(c):
            lo, hi = shard_range(N, c.rank, c.world)
            rng = make_rng(seed, 3, PURPOSE_SELECT)
            if method == "hard":
                return sharded_topk(full[lo:hi], np.arange(lo, hi), o["k"], c)
            if method == "infobatch":
                return sharded_infobatch(full[lo:hi], np.arange(lo, hi), o["k"], rng, c,
                                         o["rescale"])
            s = np.log(np.maximum(np.abs(full[lo:hi]), 1e-12)) if o.get("log") else full[lo:hi]
            return sharded_gumbel_topk(s, np.arange(lo, hi), o["k"], o["t"], rng, c,
                                       o["rescale"])

        got = run_threads(world, one)
        exp = _reference(full, ok, method, o, seed)
        for sel in got:
            assert np.array_equal(sel.ids, exp.ids), name
            assert np.array_equal(sel.weights, exp.weights), name  # bit-identical, not close


def test_quantiles_match_numpy():
    x = case_scores(1)
    x = x[~np.isnan(x)]
    got = run_threads(3, lambda c: quantiles(x[slice(*shard_range(len(x), c.rank, 3))],
                                             [0.1, 0.5, 0.9], c))[0]
    assert np.allclose(got, np.quantile(x, [0.1, 0.5, 0.9]), rtol=0, atol=1e-12)


def test_bad_budget_and_ids_raise():
    with pytest.raises(ValueError, match="budget"):
        run_threads(2, lambda c: sharded_topk(np.array([1.0, np.nan]), np.arange(2) + 2 * c.rank,
                                              3, c))  # 2 valid ids, k = 3
    table = ShardedScoreTable(10, LocalComm())
    with pytest.raises(ValueError, match="outside"):
        table.merge(np.array([10]), np.array([1.0]), np.array([0]))


def test_sharding_config_and_auto_rule():
    cfg = parse_attent({"selection": {"sharding": "sharded", "sharding_threshold": 5}})
    assert cfg.selection.sharding == "sharded" and cfg.selection.sharding_threshold == 5
    assert parse_attent({}).selection.sharding == "auto"
    with pytest.raises(ConfigError, match="attent.selection.sharding"):
        parse_attent({"selection": {"sharding": "scatter"}})
    with pytest.raises(ConfigError, match="attent.selection.sharding_threshold"):
        parse_attent({"selection": {"sharding_threshold": -1}})
    assert use_sharding("auto", 100, 101, 2) and not use_sharding("auto", 100, 100, 2)
    assert not use_sharding("auto", 100, 10 ** 9, 1)  # one rank: nothing to shard over
    assert use_sharding("sharded", 100, 5, 1) and not use_sharding("gather", 0, 10 ** 9, 8)


# ---- real gloo ranks ---------------------------------------------------------------------------

def _reference(full, ok, method, o, seed):
    ids = np.flatnonzero(ok)
    rng = make_rng(seed, 3, PURPOSE_SELECT)
    if method == "hard":
        return select_topk(full[ok], ids, o["k"])
    if method == "random":
        return select_random(ids, o["k"], rng)
    if method == "infobatch":
        return select_infobatch(full[ok], ids, o["k"], rng, rescale=o["rescale"])
    s = np.log(np.maximum(np.abs(full[ok]), 1e-12)) if o.get("log") else full[ok]
    return select_gumbel_topk(s, ids, o["k"], o["t"], rng, rescale=o["rescale"])


def _teacher_cfg(method):
    return parse_attent(teacher_section(method, "gather"))


def _gather_teacher(method, world):
    t = Teacher(_teacher_cfg(method), N, 3, 4, LocalComm())
    for r in range(world):  # the gather path's record order: rank 0's records, then rank 1's...
        for stamp, ids, vals in teacher_records(N, world, r):
            t.record(ids, vals, stamp)
    return t


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ranks_equal_gather_path(world, tmp_path):
    # A whole-table checkpoint (world 1) for the ranks to re-shard and select from.
    base = _gather_teacher("soft", world)
    base.begin_pass(1)
    base.save(tmp_path / "whole")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), port,
                               str(tmp_path), str(tmp_path / "whole")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    res = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(world)]

    for name, seed, method, o in cases():
        full = case_scores(seed)
        exp = _reference(full, ~np.isnan(full), method, o, seed)
        for r in range(world):
            assert np.array_equal(res[r][f"{name}/ids"], exp.ids), (name, r)
            assert np.array_equal(res[r][f"{name}/weights"], exp.weights), (name, r)
            assert selection_checksum(res[r][f"{name}/ids"], res[r][f"{name}/weights"]) == \
                exp.checksum
    x = case_scores(1)
    for r in range(world):
        assert res[r]["exact_mean"][0] == exact_mean(x[~np.isnan(x)])
    assert np.allclose(res[0]["quantiles"], np.quantile(x[~np.isnan(x)], [0.1, 0.5, 0.9]),
                       rtol=0, atol=1e-12)

    # collectives
    tri = world * (world + 1) // 2
    for r in range(world):
        assert res[r]["sum"].tolist() == [0, tri, 2 * tri, 3 * tri]
        assert res[r]["max"].tolist() == [(world - 1) * 1.5, 0.0]
        mine = np.arange(10)[np.arange(10) % world == r]
        assert res[r]["got_ids"].tolist() == [i + 100 * s for s in range(world) for i in mine]
        assert res[r]["got_src"].tolist() == [float(s) for s in range(world) for _ in mine]

    # the teacher: same ids, weights and summary as the gather path fed the same records
    for method in TEACHER_METHODS:
        ref = _gather_teacher(method, world)
        sel, summary = ref.begin_pass(1)
        for r in range(world):
            assert np.array_equal(res[r][f"teacher-{method}/ids"], sel.ids), (method, r)
            assert np.array_equal(res[r][f"teacher-{method}/weights"], sel.weights), (method, r)
            got = res[r][f"teacher-{method}/summary"]
            assert got[:2].tolist() == [summary.invalid, summary.unscored]
            assert np.allclose(got[2:], [summary.selected_mean_score, *summary.score_quantiles],
                               rtol=1e-12, atol=1e-12)
        # a checkpoint written by `world` ranks loads into one whole-table teacher
        one = Teacher(_teacher_cfg(method), N, 3, 4, LocalComm())
        one.load_state_dict(*Teacher.read(tmp_path / f"ckpt-{method}"))
        assert np.array_equal(one.scored, ref.scored)
        assert np.array_equal(one.scores[ref.scored], ref.scores[ref.scored], equal_nan=True)
        assert np.array_equal(one.selection.ids, sel.ids)
        if method == "infobatch":  # score 'drop': the previous scores travel through shards too
            assert np.array_equal(one.prev_scored, ref.prev_scored) and ref.prev_scored.any()
            assert np.array_equal(one.prev_scores, ref.prev_scores, equal_nan=True)
    # ... and a whole-table checkpoint re-shards over `world` ranks
    for r in range(world):
        assert np.array_equal(res[r]["resumed/ids"], base.begin_pass(2)[0].ids)
    assert len(sel.ids) > 0 and not np.all(sel.weights == 1.0)  # the cases are not trivial


# ---- exact mean, InfoBatch and the sharded teacher on simulated ranks ------------------------------

@pytest.mark.parametrize("world", [2, 3, 5])
def test_sharded_exact_mean_is_bit_identical(world):
    rng = np.random.default_rng(world)
    x = rng.normal(size=1001) * 10.0 ** rng.integers(-200, 200, 1001)
    x[:3] = [1e308, 1e308, -1e308]  # the float sum would overflow
    got = run_threads(world, lambda c: sharded_exact_mean(
        x[slice(*shard_range(len(x), c.rank, c.world))], c))
    assert all(g == exact_mean(x) for g in got)
    # an empty shard is fine; no values at all is an error
    got = run_threads(3, lambda c: sharded_exact_mean(x[:2] if c.rank == 1 else x[:0], c))
    assert all(g == exact_mean(x[:2]) for g in got)
    with pytest.raises(ValueError):
        run_threads(2, lambda c: sharded_exact_mean(np.zeros(0), c))
    # an inf on one rank only: every rank raises (none waits in the all-reduce)
    errors = run_threads(2, lambda c: _raises(lambda: sharded_exact_mean(
        np.array([1.0, np.inf if c.rank else 2.0]), c)))
    assert all(isinstance(e, ValueError) and "finite" in str(e) for e in errors), errors


def _raises(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - returned to the test
        return exc
    return None


def test_infobatch_mean_ties_are_split_the_same_on_any_partition():
    # values whose float sum depends on the order: a naive per-shard mean could move ids across
    # the threshold, the exact one cannot
    x = np.array([1e16, 1.0, -1e16, 1.0, 0.5, 0.5, 0.25, 0.75] * 5)
    ids = np.arange(len(x))
    ref = select_infobatch(x, ids, 13, make_rng(1, 1, PURPOSE_SELECT), rescale=True)
    for world in (2, 3, 4):
        got = run_threads(world, lambda c: sharded_infobatch(
            x[slice(*shard_range(len(x), c.rank, c.world))],
            ids[slice(*shard_range(len(x), c.rank, c.world))], 13,
            make_rng(1, 1, PURPOSE_SELECT), c, rescale=True))
        for sel in got:
            assert np.array_equal(sel.ids, ref.ids) and np.array_equal(sel.weights, ref.weights)


def _records(n, world, rank):
    """Scores over two syncs: repeats within a sync (runner-up = previous) and across syncs."""
    rng = np.random.default_rng(11)
    out = []
    for stamp in range(4):
        ids = rng.choice(n, n // 2 + 7, replace=True)
        vals = np.round(rng.normal(size=len(ids)), 1) + 2.0
        vals[rng.choice(len(ids), 2, replace=False)] = np.nan
        out.append((stamp, ids[rank::world], vals[rank::world]))
    return out


@pytest.mark.parametrize("method, score", [("hard", "raw"), ("soft", "drop"),
                                           ("infobatch", "drop"), ("infobatch", "reducible"),
                                           ("random", "reducible")])
def test_threaded_sharded_teacher_equals_the_gathered_teacher(method, score):
    n, g, world = 97, 4, 3
    reference = np.linspace(0.0, 1.0, n)
    reference[::10] = np.nan
    section = {"seed": 9, "warmup_passes": 1, "score": score, "ratio": {"value": 0.5},
               "interval": {"schedule": "fixed", "every": 1},
               "selection": {"method": method, "rescale": method != "hard", "skip_top": 0.05}}

    def run(sharding, comm, rank, w):
        t = Teacher(parse_attent({**section, "selection": {**section["selection"],
                                                           "sharding": sharding}}),
                    n, 4, g, comm, reference=reference)
        out = []
        t.begin_pass(0)
        for stamp, ids, vals in _records(n, w, rank)[:2]:
            t.record(ids, vals, stamp)
        out.append(t.begin_pass(1))
        for stamp, ids, vals in _records(n, w, rank)[2:]:
            t.record(ids, vals, stamp)
        out.append(t.begin_pass(2))
        return out

    gathered = Teacher(parse_attent({**section, "selection": {**section["selection"],
                                                              "sharding": "gather"}}),
                       n, 4, g, LocalComm(), reference=reference)
    expected = []
    gathered.begin_pass(0)
    recs = [_records(n, world, r) for r in range(world)]
    for phase in (slice(0, 2), slice(2, 4)):
        for r in range(world):
            for stamp, ids, vals in recs[r][phase]:
                gathered.record(ids, vals, stamp)
        expected.append(gathered.begin_pass(1 if phase.start == 0 else 2))
    got = run_threads(world, lambda c: run("sharded", c, c.rank, c.world))
    for rank_out in got:
        for (sel, summary), (ref_sel, ref_summary) in zip(rank_out, expected):
            assert np.array_equal(sel.ids, ref_sel.ids)
            assert np.array_equal(sel.weights, ref_sel.weights)
            assert (summary.invalid, summary.unscored) == (ref_summary.invalid,
                                                           ref_summary.unscored)
            assert summary.selected_mean_score == pytest.approx(ref_summary.selected_mean_score,
                                                                rel=1e-12)
    assert len(expected[1][0].ids) > 0 and expected[0][0].checksum != expected[1][0].checksum


def test_sharded_temperature_guard_raises_on_every_rank():
    section = {"preset": "attent-soft", "selection": {"temperature": 0.001,
                                                      "sharding": "sharded"}}

    def rank(c):
        t = Teacher(parse_attent(section), 64, 3, 16, c)
        t.begin_pass(0)
        mine = np.arange(32 * c.rank, 32 * (c.rank + 1))  # the ids this rank owns
        # only rank 1's shard holds the huge scores; rank 0 must still raise, not wait
        t.record(mine, np.full(32, 1e306 if c.rank else 1.0), stamp=0)
        try:
            t.begin_pass(1)
        except SelectionError as exc:
            return str(exc)
        return None

    msgs = run_threads(2, rank)
    assert all(m is not None and m.startswith("attent.selection.temperature: got 0.001;")
               for m in msgs), msgs
