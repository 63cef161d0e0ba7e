"""The time-to-quality harness (tools/bench_ttq.py) and its reference tool (reference_scores.py).

Its arithmetic on hand-made runs (exact values), its arms and corpora, the plan logic (deadline,
kill, resume, dependencies) with a fake job that starts in a second, the reference tool on a
real corpus, and one real run of the training job over two corpora.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from attent_scale.config import PRESETS, parse_attent
from conftest import ROOT, load_tool

bm = load_tool("bench_ttq")


# ---- time to target ------------------------------------------------------------------------

def test_time_to_target_interpolates_between_last_above_and_first_below():
    curve = [(0.0, 6.0), (10.0, 4.0), (20.0, 3.0), (30.0, 2.5)]
    assert bm.time_to_target(curve, 3.5) == pytest.approx(15.0)
    assert bm.time_to_target(curve, 3.8) == pytest.approx(12.0)
    assert bm.time_to_target(curve, 2.75) == pytest.approx(25.0)


def test_time_to_target_exact_hit_and_first_point():
    curve = [(0.0, 6.0), (10.0, 4.0), (20.0, 3.0)]
    assert bm.time_to_target(curve, 3.0) == 20.0      # a point exactly on the target
    assert bm.time_to_target(curve, 6.0) == 0.0       # already there at the first point
    assert bm.time_to_target([(5.0, 2.0), (9.0, 1.0)], 3.0) == 5.0


def test_time_to_target_first_crossing_of_a_non_monotone_curve():
    curve = [(0.0, 5.0), (10.0, 3.0), (20.0, 4.0), (30.0, 2.0)]
    assert bm.time_to_target(curve, 3.5) == pytest.approx(7.5)


def test_time_to_target_never_reached():
    assert bm.time_to_target([(0.0, 6.0), (10.0, 4.0), (20.0, 3.0)], 2.9) is None
    assert bm.time_to_target([], 3.0) is None


# ---- frontier ------------------------------------------------------------------------------

def test_frontier_orders_by_time_and_enforces_monotone_loss():
    # The longest budget ended worse than the middle one (noise): the frontier keeps 3.0.
    pts = [(30.0, 3.2), (10.0, 4.0), (20.0, 3.0)]
    assert bm.build_frontier(pts) == [(10.0, 4.0), (20.0, 3.0), (30.0, 3.0)]


def test_frontier_time_interpolates_and_uses_the_monotone_points():
    f = bm.build_frontier([(10.0, 4.0), (20.0, 3.0), (30.0, 3.2)])
    assert bm.frontier_time(f, 3.5) == pytest.approx(15.0)
    assert bm.frontier_time(f, 4.0) == 10.0
    # Flat at 3.0 from 20 s on: the earliest time counts.
    assert bm.frontier_time(f, 3.0) == 20.0
    # Without the running minimum the best point would be 3.2 and 3.1 out of range.
    assert bm.frontier_time(f, 3.1) == pytest.approx(19.0)


def test_frontier_time_out_of_range_is_none():
    f = bm.build_frontier([(10.0, 4.0), (20.0, 3.0)])
    assert bm.frontier_time(f, 4.01) is None   # above the worst baseline
    assert bm.frontier_time(f, 2.99) is None   # below the best baseline
    assert bm.frontier_time([], 3.0) is None
    assert bm.frontier_time(f, float("nan")) is None


# ---- saving and spread ---------------------------------------------------------------------

def test_saving_sign():
    assert bm.saving(80.0, 100.0) == pytest.approx(0.2)    # faster than the frontier: positive
    assert bm.saving(120.0, 100.0) == pytest.approx(-0.2)  # slower: negative
    assert bm.saving(100.0, 100.0) == 0.0
    assert bm.saving(None, 100.0) is None
    assert bm.saving(80.0, None) is None
    assert bm.saving(80.0, 0.0) is None


def test_spread():
    s = bm.spread([1.0, 2.0, None, 3.0])
    assert s == {"n": 3, "missing": 1, "mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert bm.spread([5.0]) == {"n": 1, "missing": 0, "mean": 5.0, "std": None, "min": 5.0,
                                "max": 5.0}
    assert bm.spread([None, None]) == {"n": 0, "missing": 2, "mean": None, "std": None,
                                       "min": None, "max": None}
    assert bm.spread([0.1, 0.3])["std"] == pytest.approx(0.1414213562)


def test_seed_mean_curve_on_common_steps():
    a = [(0.0, 6.0, 0), (10.0, 4.0, 20), (20.0, 3.0, 40)]
    b = [(0.0, 5.0, 0), (12.0, 3.0, 20)]
    assert bm.seed_mean_curve([a, b]) == [(0.0, 5.5), (11.0, 3.5)]


def test_frontier_loss_interpolates_and_refuses_to_extrapolate():
    f = [(100.0, 4.0), (200.0, 3.0)]
    assert bm.frontier_loss(f, 150) == pytest.approx(3.5)
    assert bm.frontier_loss(f, 100) == 4.0 and bm.frontier_loss(f, 200) == 3.0
    # Within 1% of an end: the same budget up to the rounding of steps per pass.
    assert bm.frontier_loss(f, 99.5) == 4.0 and bm.frontier_loss(f, 201.0) == 3.0
    assert bm.frontier_loss(f, 98.0) is None and bm.frontier_loss(f, 203.0) is None
    assert bm.frontier_loss([(170.0, 3.6)], 170) == 3.6
    assert bm.frontier_loss([], 10) is None


# ---- a policy's own frontier: steps to target ------------------------------------------------

def test_steps_to_target_from_three_budgets():
    pts = [(180.0, 3.2), (100.0, 4.0), (140.0, 3.5)]   # any order
    tt = bm.steps_to_target(pts, 3.3, 200.0)
    assert tt["status"] == "reached" and not tt["bound"]
    # Between (140, 3.5) and (180, 3.2): 140 + 0.2 / 0.3 * 40.
    assert tt["steps"] == pytest.approx(140 + 80 / 3)
    assert tt["saving"] == pytest.approx(1 - (140 + 80 / 3) / 200)
    assert tt["frontier"] == [[100.0, 4.0], [140.0, 3.5], [180.0, 3.2]]
    assert bm.steps_to_target(pts, 3.5, 200.0)["steps"] == 140.0   # on a point


def test_steps_to_target_not_reached_names_the_best_point():
    tt = bm.steps_to_target([(100.0, 4.0), (140.0, 3.5), (180.0, 3.2)], 3.1, 200.0)
    assert tt["status"] == "not reached"
    assert tt["steps"] is None and tt["saving"] is None and tt["cost_saving"] is None
    assert (tt["best_loss"], tt["best_steps"]) == (3.2, 180.0)
    # It needs more than its longest budget's 180 steps: a saving below 1 - 180 / 200.
    assert tt["saving_below"] == pytest.approx(0.1)
    assert bm._to_target_cell(tt) == "not reached (saving < +10.0%), best 3.2000 at 180 steps"
    # A reference model's 10 steps lower the bound to 1 - 190 / 200.
    counted = bm.steps_to_target([(100.0, 4.0), (180.0, 3.2)], 3.1, 200.0, extra_steps=10.0)
    assert counted["cost_saving_below"] == pytest.approx(0.05)
    assert bm._to_target_cell(counted, cost=True).startswith("not reached (saving < +5.0%)")
    # The bound is the longest budget's, even when a shorter one ended lower (running minimum).
    noisy = bm.steps_to_target([(100.0, 4.0), (140.0, 3.2), (180.0, 3.3)], 3.1, 200.0)
    assert noisy["best_steps"] == 140.0 and noisy["saving_below"] == pytest.approx(0.1)
    assert bm.steps_to_target([], 3.0, 100.0)["status"] == "no runs"
    assert bm.steps_to_target([(1.0, 2.0)], None, 100.0)["status"] == "no runs"


def test_steps_to_target_non_monotone_points_use_the_running_minimum():
    # The longest budget ended worse than the middle one (noise): it counts as the middle's loss.
    tt = bm.steps_to_target([(100.0, 4.0), (140.0, 3.2), (180.0, 3.3)], 3.25, 200.0)
    assert tt["frontier"] == [[100.0, 4.0], [140.0, 3.2], [180.0, 3.2]]
    assert tt["steps"] == pytest.approx(137.5)
    assert (tt["best_loss"], tt["best_steps"]) == (3.2, 140.0)   # the earliest at the best loss


def test_steps_to_target_reached_by_the_smallest_budget_is_a_bound():
    tt = bm.steps_to_target([(100.0, 4.0), (140.0, 3.5)], 4.5, 200.0)
    assert tt["status"] == "reached by the smallest budget" and tt["bound"]
    assert tt["steps"] == 100.0 and tt["saving"] == pytest.approx(0.5)
    assert bm._to_target_cell(tt) == "≤ 100 (smallest budget), ≥ +50.0%"


def test_steps_to_target_counts_an_outside_cost():
    tt = bm.steps_to_target([(100.0, 4.0), (140.0, 3.5), (180.0, 3.2)], 3.3, 200.0,
                            extra_steps=10.0)
    assert tt["steps"] == pytest.approx(140 + 80 / 3)
    assert tt["cost_steps"] == pytest.approx(150 + 80 / 3)
    assert tt["cost_saving"] == pytest.approx(1 - (150 + 80 / 3) / 200)
    assert tt["saving"] == pytest.approx(1 - (140 + 80 / 3) / 200)


# ---- paired against the random control -------------------------------------------------------

def test_paired_difference_reads_the_control_at_the_policys_steps():
    policy = {0: (170.0, 3.55), 1: (170.0, 3.62), 2: (150.0, 3.70)}
    control = {0: [(170.0, 3.60)], 1: [(170.0, 3.60)], 2: [(170.0, 3.60)]}
    d = bm.paired_difference(policy, control)
    assert d["per_seed"][0] == pytest.approx(-0.05) and d["per_seed"][1] == pytest.approx(0.02)
    assert d["per_seed"][2] is None and d["uncovered"] == {2: 150.0}  # 150 steps: not covered
    assert d["better"] == 1 and d["n"] == 2
    assert d["diff"]["mean"] == pytest.approx(-0.015) and d["diff"]["missing"] == 1
    # A random@X budget below it covers seed 2: 3.8 + (150 - 140) / 30 * (3.6 - 3.8).
    control[2] = [(140.0, 3.8), (170.0, 3.6)]
    d = bm.paired_difference(policy, control)
    assert d["per_seed"][2] == pytest.approx(3.70 - (3.8 - 0.2 / 3))
    assert d["better"] == 2 and d["n"] == 3 and not d["uncovered"]
    # Cost-counted: compared where random has spent as much compute (the policy's + 15 steps).
    d = bm.paired_difference({0: (140.0, 3.7)}, {0: [(140.0, 3.8), (170.0, 3.6)]},
                             extra_steps=15.0)
    assert d["per_seed"][0] == pytest.approx(3.7 - 3.7)
    assert "seeds better" in bm._diff_cell(d)
    assert "add random@X" in bm._diff_cell(bm.paired_difference({0: (50.0, 3.0)},
                                                                {0: [(170.0, 3.6)]}))


# ---- the whole analysis on synthetic runs --------------------------------------------------

def _run(points, teacher_time=0.0):
    """load_run-shaped data from (time, loss) points (steps 0, 10, ...)."""
    curve = [[t, loss, 10 * i, 100 * i] for i, (t, loss) in enumerate(points)]
    return {"curve": curve, "train_time": curve[-1][0], "final_loss": curve[-1][1],
            "teacher_time": teacher_time, "tokens_trained": curve[-1][3],
            "examples_trained": 10 * len(points), "examples_skipped": 0,
            "optimizer_steps": curve[-1][2], "peak_memory_gib": None}


def _final(steps, loss):
    """load_run-shaped data of a run that ended at ``loss`` after ``steps`` (0.1 s a step)."""
    curve = [[0.0, 6.0, 0, 0], [steps / 10, loss, steps, 100 * steps]]
    return {"curve": curve, "train_time": steps / 10, "final_loss": loss, "teacher_time": 0.0,
            "tokens_trained": 100 * steps, "examples_trained": steps, "examples_skipped": 0,
            "optimizer_steps": steps, "peak_memory_gib": None}


def _synthetic():
    arms = bm.parse_arms("full@0.5,full@1.0,random")
    runs = {
        "full@0.5": {0: _run([(0, 6.0), (25, 4.5), (50, 4.0)]),
                     1: _run([(0, 6.0), (25, 4.6), (50, 4.2)])},
        "full@1.0": {0: _run([(0, 6.0), (50, 4.0), (100, 3.0)]),
                     1: _run([(0, 6.0), (50, 4.1), (100, 3.2)])},
        # seed 0 reaches the target (3.1) at 72 s; seed 1 never does.
        "random": {0: _run([(0, 6.0), (40, 3.5), (80, 3.0)], teacher_time=1.5),
                   1: _run([(0, 6.0), (40, 3.6), (80, 3.2)], teacher_time=2.5)},
    }
    return arms, runs


def test_analyze_target_frontier_and_savings():
    arms, runs = _synthetic()
    res = bm.analyze(arms, runs)
    assert res["target"]["arm"] == "full@1.0"
    assert res["target"]["loss"] == pytest.approx(3.1)
    assert res["target"]["frontier_time"] == pytest.approx(100.0)
    assert [(p["time"], p["loss"]) for p in res["frontier"]["points"]] == \
        [(50.0, pytest.approx(4.1)), (100.0, pytest.approx(3.1))]

    r0, r1 = runs["random"][0], runs["random"][1]
    assert r0["time_to_target"] == pytest.approx(72.0)
    assert r0["saving"] == pytest.approx(0.28)
    assert r1["time_to_target"] is None and r1["saving"] is None
    assert r0["saving_at_final"] is None           # final 3.0 is below the best baseline
    assert r1["frontier_time_at_final"] == pytest.approx(95.0)
    assert r1["saving_at_final"] == pytest.approx(1 - 80 / 95)
    assert r0["tokens_to_target"] == pytest.approx(180.0)

    a = res["arms"]["random"]
    assert a["saving"]["n"] == 1 and a["saving"]["missing"] == 1
    assert a["teacher_time"]["mean"] == pytest.approx(2.0)
    # The baseline's seeds scatter around their own mean (the noise floor): seed 0 ends below
    # the target, reaching it at 95 s of the frontier's 100; seed 1 never does.
    full = res["arms"]["full@1.0"]["saving"]
    assert full["n"] == 1 and full["missing"] == 1 and full["mean"] == pytest.approx(0.05)

    md = bm.markdown(arms, res, epochs=3)
    assert "| random | 3 | 2 |" in md and "(1/2 seeds)" in md
    assert "| full@0.5 | 0.5 of 3 | 2 |" in md
    assert "3.1000" in md and "## Policies" in md


def test_analyze_saving_on_the_compute_clock():
    arms = bm.parse_arms("full@0.5,full@1.0,random")
    runs = {  # _run puts the points at steps 0, 10, 20, ...
        "full@0.5": {0: _run([(0, 6.0), (9, 5.0), (30, 4.1)])},              # 20 steps
        "full@1.0": {0: _run([(0, 6.0), (9, 5), (20, 4), (30, 3.5), (99, 3.1)])},  # 40 steps
        "random": {0: _run([(0, 6.0), (9, 4.5), (50, 3.6)])},                 # 20 steps
    }
    res = bm.analyze(arms, runs)
    assert res["frontier"]["steps"] == [{"steps": 20.0, "loss": 4.1}, {"steps": 40.0, "loss": 3.1}]
    # The frontier needs 30 steps for 3.6; random took 20: one third fewer, whatever the clock.
    assert runs["random"][0]["steps_saving_at_final"] == pytest.approx(1 / 3)
    assert "+33.3%" in bm.markdown(arms, res)


def test_analyze_target_falls_back_to_largest_budget():
    arms = bm.parse_arms("full@0.5,full@0.8")
    runs = {"full@0.5": {0: _run([(0, 6.0), (50, 4.0)])},
            "full@0.8": {0: _run([(0, 6.0), (80, 3.5)])}}
    res = bm.analyze(arms, runs)
    assert res["target"]["arm"] == "full@0.8" and res["target"]["loss"] == 3.5


ARMS_2C = "full@0.5,full@1.0,random,random@1.5,attent-soft,attent-soft@1.5"


def _two_corpora():
    """Two corpora x two seeds, final points only (numbers chosen to be checked by hand).

    code: target 3.5 at 200 steps; attent-soft beats random on both seeds and its frontier
    reaches the target. prose: target 4.5 at 200 steps; attent-soft ties random (one seed each
    way) and neither policy reaches the target.
    """
    both = lambda steps, loss: {0: _final(steps, loss), 1: _final(steps, loss)}  # noqa: E731
    code = {"full@0.5": both(100, 4.0), "full@1.0": both(200, 3.5),
            "random": both(170, 3.65), "random@1.5": both(240, 3.45),
            "attent-soft": {0: _final(170, 3.60), 1: _final(170, 3.62)},
            "attent-soft@1.5": {0: _final(240, 3.40), 1: _final(240, 3.44)}}
    prose = {"full@0.5": both(100, 5.0), "full@1.0": both(200, 4.5),
             "random": both(170, 4.62), "random@1.5": both(240, 4.52),
             "attent-soft": {0: _final(170, 4.60), 1: _final(170, 4.64)},
             "attent-soft@1.5": both(240, 4.55)}
    return bm.parse_arms(ARMS_2C, epochs=2), {"code": code, "prose": prose}


def test_policy_frontier_per_corpus_seed_means_and_per_seed():
    arms, corpora = _two_corpora()
    res = bm.analyze(arms, corpora["code"])
    soft = res["policies"]["attent-soft"]
    assert [b["arm"] for b in soft["budgets"]] == ["attent-soft", "attent-soft@1.5"]
    # Seed means (170, 3.61) and (240, 3.42): 170 + 0.11 / 0.19 * 70 steps to reach 3.5.
    steps = 170 + 0.11 / 0.19 * 70
    assert soft["to_target"]["steps"] == pytest.approx(steps)
    assert soft["to_target"]["saving"] == pytest.approx(1 - steps / 200)
    # Per seed, against that seed's full@1.0: 205 and 170 + 0.12 / 0.18 * 70 steps.
    assert soft["per_seed"][0]["steps"] == pytest.approx(205.0)
    assert soft["per_seed"][1]["steps"] == pytest.approx(170 + 0.12 / 0.18 * 70)
    assert soft["per_seed_saving"]["min"] == pytest.approx(1 - (170 + 0.12 / 0.18 * 70) / 200)
    assert soft["reached"] == 2
    # Step saving at final loss of the X = 1 arm: the frontier needs 180 and 176 steps.
    assert soft["saving_at_final"]["mean"] == pytest.approx(
        ((1 - 170 / 180) + (1 - 170 / 176)) / 2)
    vs = soft["vs_random"]
    assert vs["per_seed"] == {0: pytest.approx(-0.05), 1: pytest.approx(-0.03)}
    assert vs["better"] == 2 and vs["n"] == 2
    assert res["policies"]["random"]["to_target"]["steps"] == pytest.approx(222.5)
    assert "vs_random" not in res["policies"]["random"]
    full = res["policies"]["full"]
    assert full["to_target"]["steps"] == pytest.approx(200.0)
    assert full["to_target"]["saving"] == pytest.approx(0.0)

    prose = bm.analyze(arms, corpora["prose"])["policies"]
    assert prose["attent-soft"]["to_target"]["status"] == "not reached"
    assert prose["attent-soft"]["to_target"]["best_loss"] == pytest.approx(4.55)
    assert prose["random"]["to_target"]["status"] == "not reached"
    md = bm.markdown(arms, bm.analyze(arms, corpora["prose"]), "prose", epochs=2)
    assert "not reached (saving < -20.0%), best 4.5500 at 240 steps" in md   # 1 - 240 / 200
    assert "1/2 seeds better" in md and "| attent-soft@1.5 | 3 |" in md


def test_summary_worst_corpus_and_mean_over_corpora():
    arms, corpora = _two_corpora()
    results = {c: bm.analyze(arms, runs) for c, runs in corpora.items()}
    rows = bm.summarize(results, ["random", "attent-soft"])
    soft = rows["attent-soft"]
    a_code = ((1 - 170 / 180) + (1 - 170 / 176)) / 2
    a_prose = ((1 - 170 / 180) + (1 - 170 / 172)) / 2
    a = soft["saving_at_final"]
    assert a["per_corpus"] == {"code": pytest.approx(a_code), "prose": pytest.approx(a_prose)}
    assert a["worst_corpus"] == "prose" and a["worst"] == pytest.approx(a_prose)
    assert a["mean"] == pytest.approx((a_code + a_prose) / 2)
    # Not reaching the target on one corpus makes it the worst, and no mean is given.
    b = soft["saving_to_target"]
    assert soft["not_reached"] == ["prose"] and b["worst_corpus"] == "prose"
    assert b["mean"] is None and b["per_corpus"]["code"] == pytest.approx(
        1 - (170 + 0.11 / 0.19 * 70) / 200)
    c = soft["vs_random"]
    assert c["per_corpus"] == {"code": pytest.approx(-0.04), "prose": pytest.approx(0.0)}
    assert c["worst_corpus"] == "prose" and c["mean"] == pytest.approx(-0.02)
    assert (c["better"], c["n"]) == (3, 4)
    assert not c["beats_random"] and c["losing_corpora"] == ["prose"]
    assert "vs_random" not in rows["random"]
    md = bm.summary_markdown(rows, ["code", "prose"], [0, 1])
    line = next(x for x in md.splitlines() if x.startswith("| attent-soft |"))
    assert "not reached (prose < -20.0%)" in line and "3/4" in line and "no (prose)" in line
    assert f"{a_prose:+.1%} (prose) / {(a_code + a_prose) / 2:+.1%}" in line

    # On code alone it beats random (both seeds, negative mean).
    one = bm.summarize({"code": results["code"]}, ["attent-soft"])["attent-soft"]
    assert one["vs_random"]["beats_random"] and one["saving_to_target"]["mean"] is not None


def test_combine_needs_every_corpus_for_a_mean():
    m = bm.combine({"a": 0.1, "b": None, "c": -0.2})
    assert m["worst"] == -0.2 and m["worst_corpus"] == "c" and m["mean"] is None
    assert m["missing"] == ["b"]
    m = bm.combine({"a": 0.01, "b": -0.03}, higher_is_better=False)
    assert m["worst_corpus"] == "a" and m["mean"] == pytest.approx(-0.01)
    assert bm.combine({"a": None})["worst"] is None


# ---- RHO-LOSS reference cost ------------------------------------------------------------------

def test_reference_cost_in_steps_of_the_benchmarked_job():
    ref = {"params": {"total": 1500, "compute": 1000}, "model": "tiny",
           "train": {"tokens": 3000, "seconds": 2.0}, "score": {"tokens": 9000, "seconds": 1.0}}
    cost = bm.reference_cost(ref, main_compute_params=4000, tokens_per_step=100)
    # (6 * 1000 * 3000 + 2 * 1000 * 9000) / (6 * 4000 * 100) = 36e6 / 2.4e6.
    assert cost["steps"] == pytest.approx(15.0)
    assert cost["token_steps"] == pytest.approx(120.0) and cost["seconds"] == 3.0


def test_shape_params_count_the_llama_shape():
    # build_model("tiny", 512, 32, 0) has 139,584 parameters, 32,768 of them its input
    # embedding (the reference tool's test checks the same against a built model).
    assert bm.shape_params("tiny", 512) == {"total": 139_584, "compute": 106_816}
    # 100m at 8192: 95.2M, as BENCHMARKS reports for that model.
    assert round(bm.shape_params("100m", 8192)["total"] / 1e6, 1) == 95.2


def _rho_arm(scale=1.0):
    # Built directly: this checkout's config may not know "score" yet (parse_arms validates).
    section = dict(bm.POLICIES["rho-soft"])
    return bm.Arm(bm._arm_name("rho-soft", scale), section=section, source="POLICIES",
                  family="rho-soft", scale=scale)


def test_reference_cost_is_counted_against_rho_arms_only():
    arms, corpora = _two_corpora()
    arms = arms + [_rho_arm(), _rho_arm(1.5)]
    runs = dict(corpora["code"])
    runs["rho-soft"] = {0: _final(170, 3.55)}
    runs["rho-soft@1.5"] = {0: _final(240, 3.40)}
    ref = {"steps": 15.0, "token_steps": 40.0, "flops": 1.0, "seconds": 3.0,
           "reference_model": "tiny", "holdout": None}
    res = bm.analyze(arms, runs, ref)
    r = runs["rho-soft"][0]
    # The frontier needs 100 + 0.45 / 0.5 * 100 = 190 steps for 3.55.
    assert r["steps_saving_at_final"] == pytest.approx(1 - 170 / 190)
    assert r["cost_steps"] == 185.0
    assert r["cost_steps_saving_at_final"] == pytest.approx(1 - 185 / 190)
    assert runs["attent-soft"][0]["cost_steps"] == 170  # no reference: nothing added
    rho = res["policies"]["rho-soft"]
    steps = 170 + 0.05 / 0.15 * 70
    assert rho["to_target"]["steps"] == pytest.approx(steps)
    assert rho["to_target"]["cost_saving"] == pytest.approx(1 - (steps + 15) / 200)
    assert rho["cost_saving_at_final"]["mean"] == pytest.approx(1 - 185 / 190)
    assert rho["vs_random"]["per_seed"][0] == pytest.approx(3.55 - 3.65)
    # Cost-counted: random's loss at 185 steps, 3.65 - 15 / 70 * 0.2.
    assert rho["vs_random_cost_counted"]["per_seed"][0] == pytest.approx(
        3.55 - (3.65 - 15 / 70 * 0.2))
    rows = bm.summarize({"code": res}, ["rho-soft"])
    assert rows["rho-soft"]["saving_at_final"]["mean"] == pytest.approx(1 - 185 / 190)
    assert rows["rho-soft"]["reference"]
    md = bm.markdown(arms, res, "code", epochs=2)
    assert "optimizer-step equivalents" in md and "to target" in md
    assert "| rho-soft † |" in bm.summary_markdown(rows, ["code"], [0])


def test_plot_writes_png(tmp_path):
    arms, corpora = _two_corpora()
    res = bm.analyze(arms, corpora["code"])
    out = bm.plot(arms, corpora["code"], res, tmp_path / "ttq.png", title="synthetic")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- arms ------------------------------------------------------------------------------------

def test_arm_names(tmp_path):
    full = bm.parse_arm("full@0.65")
    assert full.baseline and full.budget == 0.65 and full.attent(1) is None
    assert full.family == "full" and full.passes(3) == 3
    preset = bm.parse_arm("attent-simple")
    assert preset.attent(3) == {"preset": "attent-simple", "seed": 3}
    section = tmp_path / "soft.json"
    section.write_text(json.dumps({"selection": {"method": "soft"}, "seed": 9}))
    arm = bm.parse_arm(f"mine={section}")
    assert arm.name == "mine" and arm.attent(1) == {"selection": {"method": "soft"}, "seed": 1}
    whole = tmp_path / "ds.json"
    whole.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8,
                                 "attent": {"preset": "random"}}))
    assert bm.parse_arm(f"ds={whole}").section == {"preset": "random"}
    scaled = bm.parse_arm(f"mine@1.5={section}")
    assert (scaled.name, scaled.family, scaled.scale) == ("mine@1.5", "mine", 1.5)


def test_policy_at_x_runs_its_own_number_of_passes():
    arm = bm.parse_arm("random@1.4")
    assert (arm.name, arm.family, arm.scale) == ("random@1.4", "random", 1.4)
    assert arm.section == {"preset": "random"}
    assert arm.passes(3) == 4 and arm.passes(5) == 7 and arm.passes(8) == 11
    # Half up: 1.25 x 2 = 2.5 passes is 3 (Python's round would give 2).
    assert bm.parse_arm("attent-soft@1.25").passes(2) == 3
    assert bm.parse_arm("attent-soft@1.2").passes(5) == 6   # 6.000000000000001 is 6
    assert bm.parse_arm("random@1").name == "random"
    assert bm.parse_arm("random@1.50").name == "random@1.5"
    assert bm.parse_arm("soft-T0.5@2").family == "soft-T0.5"
    assert bm.parse_arm("infobatch@1.2").section == {"preset": "infobatch"}
    assert not bm.parse_arm("random").needs_reference and _rho_arm().needs_reference


@pytest.mark.parametrize("spec", ["random@0", "random@-1", "random@x", "random@inf",
                                  "random@nan", "random@"])
def test_bad_policy_scales_say_what_x_is(spec):
    with pytest.raises(bm.ArmError, match="X in POLICY@X must be a number > 0"):
        bm.parse_arm(spec)


def test_policy_budgets_that_collide_or_vanish_are_refused():
    with pytest.raises(bm.ArmError, match="listed twice"):
        bm.parse_arms("random,random@1.0")
    with pytest.raises(bm.ArmError, match=r"random@1.1 both run 3 passes at --epochs 3"):
        bm.parse_arms("random,random@1.1", epochs=3)
    assert len(bm.parse_arms("random,random@1.1", epochs=10)) == 2   # 10 and 11 passes
    with pytest.raises(bm.ArmError, match=r"round\(0.1 x --epochs 3\) = 0 passes"):
        bm.parse_arms("random@0.1", epochs=3)
    with pytest.raises(bm.ArmError, match="unknown arm 'nope@1.2'"):
        bm.parse_arms("nope@1.2")


# Keys other engineers are adding to the config (preset infobatch, selection.per_source, score).
def _config_knows_new_keys() -> bool:
    from attent_scale.config import AttentConfig, SelectionConfig
    return ("infobatch" in PRESETS and "score" in AttentConfig.model_fields
            and "per_source" in SelectionConfig.model_fields)


def test_policies_are_valid_and_named_apart_from_presets():
    from attent_scale.config import ConfigError
    for name, section in bm.POLICIES.items():
        assert "@" not in name and not name.startswith("full"), name
        if name in PRESETS:
            assert section == {"preset": name}, name  # a policy may only name its preset
        try:
            parse_attent({**section, "seed": 0})
        except ConfigError as exc:
            # Before those keys land only policies using them may fail; after, none may.
            assert not _config_knows_new_keys(), f"{name}: {exc}"
            assert any(k in str(exc) for k in ("infobatch", "per_source", "score")), \
                f"{name}: {exc}"
    for name in ("infobatch", "mixture-soft", "mixture-infobatch", "learn-drop", "rho-soft",
                 "soft-fgrad", "soft-attn", "infobatch-fgrad"):
        assert name in bm.POLICIES
    assert bm.POLICIES["rho-soft"] == {"preset": "attent-soft", "score": "reducible"}
    # mild-rho is the shipped default's selection ranking the reducible loss: the same config
    # as {"preset": "attent-mild", "score": "reducible"}, which README recommends by that name.
    as_bench = parse_attent({**bm.POLICIES["mild-rho"], "seed": 0}).model_dump()
    as_readme = parse_attent({"preset": "attent-mild", "score": "reducible",
                              "seed": 0}).model_dump()
    assert {k: v for k, v in as_bench.items() if k != "preset"} == \
        {k: v for k, v in as_readme.items() if k != "preset"}


def test_policy_sections_validated_by_the_real_config(monkeypatch):
    # Validation goes through the module's parse_attent: whatever the config accepts, the
    # harness accepts (a stub here stands for a config that knows the new keys).
    seen = []
    monkeypatch.setattr(bm, "parse_attent", lambda section: seen.append(section) or None)
    arms = bm.parse_arms("rho-soft,mixture-infobatch@1.5", epochs=2)
    assert seen == [{"preset": "attent-soft", "score": "reducible", "seed": 0},
                    {"preset": "infobatch", "selection": {"per_source": True}, "seed": 0}]
    assert arms[0].needs_reference and not arms[1].needs_reference


@pytest.mark.parametrize("spec, words", [
    ("nope", "unknown arm 'nope'"), ("full@0", "(0, 1]"), ("full@1.5", "(0, 1]"),
    ("full@x", "(0, 1]"), ("random=x.json", "not a preset"), ("a b=x.json", "letters"),
    ("reference=x.json", "'reference'"),
])
def test_bad_arm_names_list_the_allowed_ones(spec, words):
    with pytest.raises(bm.ArmError) as exc:
        bm.parse_arm(spec)
    assert words in str(exc.value)
    if "unknown" in words:
        for name in ("full@0.5", "attent-simple", "attent-complex", "random", "soft-rescale",
                     "NAME=path", "POLICY@X", "rho-soft"):
            assert name in str(exc.value)


def test_bad_sections_and_duplicates_fail_before_any_run(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ratio": {"value": 2}}))
    with pytest.raises(bm.ArmError, match="attent.ratio.value"):
        bm.parse_arms(f"full@1.0,bad={bad}")
    with pytest.raises(bm.ArmError, match="cannot read"):
        bm.parse_arms(f"gone={tmp_path / 'missing.json'}")
    with pytest.raises(bm.ArmError, match="twice"):
        bm.parse_arms("random,random")
    with pytest.raises(bm.ArmError):
        bm.parse_seeds("0,0")


def test_cli_rejects_unknown_arm_with_allowed_names(capsys):
    with pytest.raises(SystemExit) as exc:
        bm.main(["--arms", "full@1.0,bogus", "--dry-run"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown arm 'bogus'" in err and "attent-simple" in err and "full@F" in err


def test_dry_run_commands(capsys, tmp_path):
    assert bm.main(["--out", str(tmp_path), "--arms", "full@0.5,random,random@1.4", "--seeds",
                    "3", "--model", "tiny", "--epochs", "3", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    # The control comes first in the plan, then the arms as given.
    assert "--epochs 3" in lines[0] and "--no-teacher" not in lines[0]
    assert "--epochs 3 --seed 3" in lines[1] and "--no-teacher --budget-fraction 0.5" in lines[1]
    assert "--epochs 4" in lines[2]
    assert not (tmp_path / "full@0.5").exists()


def _corpus_dir(root, name, **meta):
    d = root / name
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"num_train": 100, "num_val": 40, "seq_len": 32,
                                             "vocab_size": 512, **meta}))
    return d


def test_corpora_option(tmp_path, capsys):
    a, b = _corpus_dir(tmp_path, "a"), _corpus_dir(tmp_path, "b")
    out = tmp_path / "out"
    args = bm.parse_args(["--out", str(out), "--corpora", f"code={a},prose={b}", "--arms",
                          "random", "--seeds", "0"])
    assert [(c.name, c.path, c.out) for c in args.corpus_list] == \
        [("code", a, out / "code"), ("prose", b, out / "prose")]
    run = bm.make_run(args, args.corpus_list[1], args.arm_list[0], 0)
    assert run.dir == out / "prose" / "random" / "seed0" and run.label == "prose/random seed 0"
    assert run.command[run.command.index("--data") + 1] == str(b)
    for bad, words in [(f"code={a},code={b}", "name code is listed twice"),
                       (f"code={a},prose={a}", "listed twice"),
                       (f"code={tmp_path / 'none'}", "no prepared corpus there"),
                       ("code", "NAME=DIR"), (f"a b={a}", "NAME=DIR")]:
        with pytest.raises(SystemExit):
            bm.parse_args(["--out", str(out), "--corpora", bad, "--arms", "random"])
        assert words in capsys.readouterr().err, bad
    with pytest.raises(SystemExit):
        bm.parse_args(["--corpora", f"code={a}", "--data", str(a), "--arms", "random"])
    assert "--data and --corpora both given" in capsys.readouterr().err


def test_plan_is_seed_major_over_corpora_with_target_and_control_first(tmp_path):
    corpora = [bm.Corpus("a", tmp_path, tmp_path / "a"), bm.Corpus("b", tmp_path, tmp_path / "b")]
    arms = bm.parse_arms("attent-soft,full@0.5,random,full@1.0")
    plan = [(s, c.name, a.name) for s, c, a in bm.plan_order(corpora, arms, [0, 1])]
    order = ["full@1.0", "random", "attent-soft", "full@0.5"]
    assert plan == [(s, c, a) for s in (0, 1) for c in ("a", "b") for a in order]


def test_rho_arms_get_reference_scores_and_a_reference_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bm, "parse_attent", lambda section: None)  # a config knowing "score"
    a = _corpus_dir(tmp_path, "a", num_val=300)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--corpora", f"code={a}", "--arms", "random,rho-soft",
            "--seeds", "0", "--eval-samples", "256", "--micro", "16", "--model", "tiny"]
    args = bm.parse_args(argv)
    rho = args.arm_list[1]
    run = bm.make_run(args, args.corpus_list[0], rho, 0)
    ref_npy = out / "code" / "reference" / "reference.npy"
    assert run.command[run.command.index("--reference-scores") + 1] == str(ref_npy)
    assert run.needs == (("code", "reference", None),)
    assert "--reference-scores" not in bm.make_run(args, args.corpus_list[0],
                                                   args.arm_list[0], 0).command
    ref = bm.make_reference(args, args.corpus_list[0])
    assert ref.key == ("code", "reference", None) and ref.dir == ref_npy.parent
    assert ref.command[1].endswith("reference_scores.py")
    assert ref.command[ref.command.index("--holdout-skip") + 1] == "256"
    assert bm.main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "reference_scores.py" in lines[0]
    # Too few validation sequences beyond the evaluated ones for a disjoint holdout.
    with pytest.raises(SystemExit):
        bm.parse_args([*argv[:-6], "--eval-samples", "290", "--micro", "16"])
    err = capsys.readouterr().err
    assert "leaving 10 for the reference model" in err and "--reference-holdout all" in err
    args = bm.parse_args([*argv, "--reference-holdout", "all", "--eval-samples", "300"])
    ref = bm.make_reference(args, args.corpus_list[0])
    assert ref.command[ref.command.index("--holdout-skip") + 1] == "0"


@pytest.mark.parametrize("gpus,nproc,words", [("0,x", 1, "device numbers"),
                                               ("0,1", 2, "--nproc=2 devices")])
def test_bad_gpu_slots_are_refused(gpus, nproc, words, capsys):
    with pytest.raises(SystemExit):
        bm.parse_args(["--arms", "random", "--gpus", gpus, "--nproc", str(nproc)])
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("extra,words", [(["--deadline", "0"], "seconds > 0"),
                                         (["--deadline", "60", "--kill-after", "30"],
                                          "--kill-after >= --deadline"),
                                         (["--epochs", "0"], "integer >= 1")])
def test_bad_limits_are_refused(extra, words, capsys):
    with pytest.raises(SystemExit):
        bm.parse_args(["--arms", "random", *extra])
    assert words in capsys.readouterr().err


def test_gpu_slots_of_several_devices(tmp_path):
    args = bm.parse_args(["--out", str(tmp_path), "--arms", "random", "--gpus", "0+1,2+3",
                          "--nproc", "2"])
    assert args.gpu_slots == ["0,1", "2,3"]


def test_nproc_launches_through_torchrun(tmp_path):
    args = bm.parse_args(["--out", str(tmp_path), "--arms", "random", "--seeds", "0",
                          "--nproc", "2"])
    cmd = bm.make_run(args, args.corpus_list[0], args.arm_list[0], 0).command
    assert cmd[0].endswith("torchrun") and cmd[1:3] == ["--nproc_per_node", "2"]
    assert cmd[cmd.index("-m") + 1] == "attent_scale.pretrain"


def test_load_run_subtracts_evaluation_time(tmp_path):
    recs = [{"type": "eval", "step": 0, "time": 1.0, "val_loss": 6.0, "eval_time": 1.0,
             "tokens": 0},
            {"type": "train", "step": 10, "time": 5.0, "loss": 5.0},
            {"type": "eval", "step": 20, "time": 12.0, "val_loss": 4.0, "eval_time": 2.5,
             "tokens": 640},
            {"type": "summary", "teacher": "off", "optimizer_steps": 20, "tokens_trained": 640,
             "examples_trained": 160, "examples_skipped_by_the_teacher": 0,
             "wall_time_(s)": "12.0", "teacher_time_(s)": "0.25", "evaluation_time_(s)": "2.50",
             "training_tokens/s": "1,234", "peak_GPU_memory_(GiB)": "n/a (CPU)",
             "final_validation_loss": "4.0000"}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = bm.load_run(path)
    assert r["curve"] == [[0.0, 6.0, 0, 0], [9.5, 4.0, 20, 640]]
    assert r["train_time"] == 9.5 and r["final_loss"] == 4.0
    assert r["teacher_time"] == 0.25 and r["peak_memory_gib"] is None
    assert r["training_tokens_per_s"] == 1234.0
    path.write_text(json.dumps(recs[0]) + "\n")
    with pytest.raises(RuntimeError, match="did not finish"):
        bm.load_run(path)


def test_resume_reuses_only_identical_finished_runs(tmp_path, capsys):
    args = bm.parse_args(["--out", str(tmp_path), "--arms", "random", "--seeds", "0",
                          "--model", "tiny"])
    run = bm.make_run(args, args.corpus_list[0], args.arm_list[0], 0)
    assert run.dir == tmp_path / "random" / "seed0" and not run.finished()
    assert run.config["attent"] == {"preset": "random", "seed": 0}
    run.dir.mkdir(parents=True)
    (run.dir / "run.json").write_text(json.dumps(run.spec))
    assert not run.finished()  # no metrics yet
    recs = [{"type": "eval", "step": 0, "time": 1.0, "val_loss": 6.0, "eval_time": 1.0},
            {"type": "summary", "teacher": "on"}]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert run.finished()
    args2 = bm.parse_args(["--out", str(tmp_path), "--arms", "random", "--seeds", "0",
                           "--model", "tiny", "--lr", "0.01"])
    other = bm.make_run(args2, args2.corpus_list[0], args2.arm_list[0], 0)
    assert other.dir == run.dir and not other.finished()  # another config: run again
    # --dry-run --resume tells which runs a call would reuse, before any device time is spent
    argv = ["--out", str(tmp_path), "--arms", "random,full@0.5", "--seeds", "0", "--model",
            "tiny", "--dry-run"]
    assert bm.main([*argv, "--resume"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "# reused (--resume): random seed 0"
    assert "--budget-fraction 0.5" in lines[1] and lines[2] == "# 1 to run, 1 reused (--resume)"
    assert bm.main(argv) == 0 and "reused" not in capsys.readouterr().out


def test_resume_reuses_a_run_copied_from_another_machine(tmp_path):
    """A device call writes under its own output directory and reads the corpus where it lies
    there; the next call sees the same run elsewhere, maybe with --gpus: it is still the run."""
    data = _corpus_dir(tmp_path, "code", fingerprint="abc")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    data2 = _corpus_dir(moved, "code", fingerprint="abc")
    first = bm.parse_args(["--out", str(tmp_path / "call1"), "--data", str(data), "--arms",
                           "random", "--seeds", "0"])
    run = bm.make_run(first, first.corpus_list[0], first.arm_list[0], 0)
    run.dir.mkdir(parents=True)
    (run.dir / "run.json").write_text(json.dumps(run.spec))
    run.metrics.write_text(json.dumps({"type": "eval", "step": 0, "time": 0.0, "val_loss": 6.0})
                           + "\n" + json.dumps({"type": "summary"}) + "\n")
    assert "{run}" in " ".join(run.spec["command"]) and "{data}" in run.spec["command"]
    import shutil
    shutil.copytree(tmp_path / "call1", tmp_path / "call2")
    later = bm.parse_args(["--out", str(tmp_path / "call2"), "--data", str(data2), "--arms",
                           "random", "--seeds", "0", "--gpus", "0,1"])
    again = bm.make_run(later, later.corpus_list[0], later.arm_list[0], 0)
    assert again.command != run.command and again.finished()
    (data2 / "meta.json").write_text(json.dumps({"num_train": 1, "fingerprint": "other"}))
    assert not bm.make_run(later, later.corpus_list[0], later.arm_list[0], 0).finished()


def test_reanalyze_rebuilds_the_report_from_copied_runs_and_leaves_out_unfinished(tmp_path):
    def write(arm, seed, steps, loss, time_s):
        d = tmp_path / arm / f"seed{seed}"
        d.mkdir(parents=True)
        recs = [{"type": "eval", "step": 0, "time": 0.0, "val_loss": 6.0, "eval_time": 0.0},
                {"type": "eval", "step": steps, "time": time_s, "val_loss": loss,
                 "eval_time": 0.0},
                {"type": "summary", "teacher": "x", "optimizer_steps": steps}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    write("full@0.5", 0, 50, 5.0, 10.0)
    write("full@1.0", 0, 100, 4.0, 20.0)
    write("random", 0, 70, 4.5, 14.0)
    (tmp_path / "random" / "seed1").mkdir()  # copied before it finished: no metrics
    assert bm.main(["--out", str(tmp_path), "--arms", "full@0.5,full@1.0,random",
                    "--seeds", "0,1", "--reanalyze"]) == 0
    res = json.loads((tmp_path / "ttq.json").read_text())
    assert res["target"]["loss"] == 4.0
    assert set(res["runs"]["random"]) == {"0"}
    # 14 s where the frontier needs 15 s for loss 4.5: a saving of 1 - 14/15.
    assert res["arms"]["random"]["saving_at_final"]["mean"] == pytest.approx(1 - 14 / 15)
    assert res["arms"]["random"]["steps_saving_at_final"]["mean"] == pytest.approx(1 - 70 / 75)
    assert [m["run"] for m in res["missing"]] == ["full@1.0 seed 1", "random seed 1",
                                                  "full@0.5 seed 1"]
    assert (tmp_path / "summary.md").read_text().count("\n| random |") == 1


# ---- running a plan in time: a fake job stands in for the trainer ------------------------------

FAKE_JOB = r'''
import argparse, json, os, time
p = argparse.ArgumentParser()
for flag in ("--deepspeed_config", "--out", "--data", "--reference-scores"):
    p.add_argument(flag)
p.add_argument("--epochs", type=int)
p.add_argument("--seed", type=int)
p.add_argument("--budget-fraction", type=float, default=1.0)
p.add_argument("--no-teacher", action="store_true")
a, _ = p.parse_known_args()
teacher = None if a.no_teacher else json.load(open(a.deepspeed_config)).get("attent")
meta = json.load(open(os.path.join(a.data, "meta.json")))
passes = a.epochs if teacher is None else 1 + 0.7 * (a.epochs - 1)
steps = int(round(100 * passes * a.budget_fraction))
loss = meta.get("base", 3.0) + 100.0 / steps + 0.01 * a.seed
if teacher and teacher.get("preset") == "attent-soft":
    loss += meta.get("soft", -0.05)
if a.reference_scores and not os.path.isfile(a.reference_scores):
    raise SystemExit(f"no reference scores at {a.reference_scores}")
if meta.get("fail"):
    raise SystemExit(meta["fail"])
print(f"planned {steps} steps", flush=True)
time.sleep(meta.get("sleep", {}).get(str(a.seed), 0.0))
recs = [{"type": "eval", "step": 0, "time": 0.0, "val_loss": 6.0, "eval_time": 0.0,
         "tokens": 0},
        {"type": "eval", "step": steps, "time": steps / 100, "val_loss": loss, "eval_time": 0.0,
         "tokens": 64 * steps},
        {"type": "summary", "teacher": "on" if teacher else "off", "optimizer_steps": steps,
         "tokens_trained": 64 * steps, "examples_trained": 8 * steps,
         "examples_skipped_by_the_teacher": 0, "wall_time_(s)": "1.0"}]
with open(os.path.join(a.out, "metrics.jsonl"), "w") as fh:
    fh.write("".join(json.dumps(r) + "\n" for r in recs))
'''


@pytest.fixture
def fake_job(tmp_path, monkeypatch):
    """bench_ttq's runs start FAKE_JOB with the real job's flags (a second to start, not 20)."""
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB)
    real = bm.run_command
    monkeypatch.setattr(bm, "run_command",
                        lambda *a: [sys.executable, str(script), *real(*a)[3:]])
    return script


def test_fake_plan_over_two_corpora_writes_every_report(tmp_path, fake_job, capsys):
    code = _corpus_dir(tmp_path, "code", base=3.0, soft=-0.05)
    prose = _corpus_dir(tmp_path, "prose", base=4.0, soft=+0.02)
    out = tmp_path / "out"
    assert bm.main(["--out", str(out), "--corpora", f"code={code},prose={prose}", "--arms",
                    "full@0.5,full@1.0,random,random@1.5,attent-soft", "--epochs", "2",
                    "--seeds", "0,1", "--gpus", "0,1", "--start-gap", "0"]) == 0
    text = capsys.readouterr().out
    assert text.count(": done in ") == 20 and "ETA" in text
    for c in ("code", "prose"):
        res = json.loads((out / c / "ttq.json").read_text())
        assert res["corpus"]["name"] == c and not res["missing"]
        assert res["target"]["steps"] == 200
        # random: 170 steps; random@1.5 (3 passes): 240; both seeds' runs are there.
        assert [b["steps"] for b in res["policies"]["random"]["budgets"]] == [170, 240]
        assert (out / c / "ttq.png").is_file() and "## Policies" in (out / c / "ttq.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    soft = summary["policies"]["attent-soft"]["vs_random"]
    assert soft["per_corpus"] == {"code": pytest.approx(-0.05), "prose": pytest.approx(0.02)}
    assert soft["worst_corpus"] == "prose" and (soft["better"], soft["n"]) == (2, 4)
    assert "| attent-soft | 2 |" in (out / "summary.md").read_text()


def test_deadline_stops_new_runs_and_reports_what_finished_then_resume_completes(
        tmp_path, fake_job, capsys):
    # Seed 0's runs take no time, seed 1's 3 s each: the 2 s deadline passes during seed 1's
    # first run, which finishes; seed 1's other runs do not start.
    data = _corpus_dir(tmp_path, "code", base=3.0, soft=-0.05, sleep={"1": 3.0})
    out = tmp_path / "out"
    argv = ["--out", str(out), "--data", str(data), "--arms", "full@0.5,full@1.0,random",
            "--epochs", "2", "--seeds", "0,1"]
    assert bm.main([*argv, "--deadline", "2"]) == 0
    text = capsys.readouterr().out
    res = json.loads((out / "ttq.json").read_text())
    assert {a: sorted(r) for a, r in res["runs"].items()} == \
        {"full@0.5": ["0"], "full@1.0": ["0", "1"], "random": ["0"]}
    assert [(m["run"], m["why"]) for m in res["missing"]] == \
        [("random seed 1", "not started: --deadline 2 s passed"),
         ("full@0.5 seed 1", "not started: --deadline 2 s passed")]
    assert res["target"]["loss"] is not None  # analysed from what finished
    assert "Missing runs (2)" in (out / "ttq.md").read_text()
    assert "incomplete: 2 of 6 runs missing" in text and "--resume" in text

    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "sleep": {}}))  # not in a run's spec
    assert bm.main([*argv, "--resume"]) == 0
    text = capsys.readouterr().out
    assert text.count("reused (--resume)") == 4 and text.count(": done in ") == 2
    res = json.loads((out / "ttq.json").read_text())
    assert not res["missing"] and all(len(r) == 2 for r in res["runs"].values())


def test_kill_after_stops_a_long_run_and_skips_one_that_cannot_finish(tmp_path, fake_job):
    # Seed 0's runs end at once; seed 1's first would take a minute and is killed at 2.5 s;
    # seed 1's random is then not started (no time is left for what its seed-0 run took).
    data = _corpus_dir(tmp_path, "code", base=3.0, soft=-0.05, sleep={"1": 60.0})
    args = bm.parse_args(["--out", str(tmp_path / "out"), "--data", str(data), "--arms",
                          "full@1.0,random", "--epochs", "2", "--seeds", "0,1"])
    plan = [bm.make_run(args, c, a, s)
            for s, c, a in bm.plan_order(args.corpus_list, args.arm_list, args.seed_list)]
    finished = []
    start = time.monotonic()
    outcome = bm.execute_plan(plan, lambda run: finished.append(run.label) or "ok",
                              resume=False, limits=bm.Limits(start, kill_after=2.5))
    assert outcome.rc == 0 and time.monotonic() - start < 2.5 + bm.KILL_GRACE_S
    assert finished == ["full@1.0 seed 0", "random seed 0"]
    why = {m["run"]: m["why"] for m in outcome.missing}
    assert why["full@1.0 seed 1"] == "killed at --kill-after 2.5 s"
    assert why["random seed 1"].startswith("not started: its arm took")
    assert plan[2].killed and not (plan[2].dir / "run.json").exists()


def test_estimate_skips_a_run_that_would_not_finish(tmp_path, fake_job):
    data = _corpus_dir(tmp_path, "code", base=3.0, soft=-0.05, sleep={"0": 2.0, "1": 2.0})
    args = bm.parse_args(["--out", str(tmp_path / "out"), "--data", str(data), "--arms",
                          "random", "--epochs", "2", "--seeds", "0,1"])
    plan = [bm.make_run(args, c, a, s)
            for s, c, a in bm.plan_order(args.corpus_list, args.arm_list, args.seed_list)]
    outcome = bm.execute_plan(plan, lambda run: "ok", resume=False,
                              limits=bm.Limits(time.monotonic(), kill_after=3.5))
    # Seed 0 took about 2 s, leaving about 1.5 s: seed 1 would be killed, so it never starts.
    assert [m["run"] for m in outcome.missing] == ["random seed 1"]
    assert "s were left before --kill-after" in outcome.missing[0]["why"]
    assert not plan[1].dir.exists()  # never started


def test_a_run_waits_for_its_reference_and_is_dropped_without_it(tmp_path):
    """Dependencies: a rho run starts only once its corpus's reference finished."""
    script = tmp_path / "job.py"
    script.write_text("import sys, time, pathlib\n"
                      "time.sleep(float(sys.argv[2]))\n"
                      "sys.exit(int(sys.argv[3]))\n")
    order = []

    def run(name, sleep, rc=0, needs=()):
        arm = bm.Arm(name, section={}, family=name)
        r = bm.Run(arm, 0, tmp_path / name, None, [sys.executable, str(script), name,
                                                    str(sleep), str(rc)], needs=needs)
        r.load = lambda: order.append(name) or {}
        return r

    ref = run("ref", 3.0)
    ref_key = ref.key
    rho, plain = run("rho", 0.0, needs=(ref_key,)), run("plain", 0.0)
    outcome = bm.execute_plan([ref, rho, plain], lambda r: r.load() or "ok", resume=False,
                              gpu_slots=["0", "1"])
    # Slot 2 skips rho (its reference is running) and takes plain; rho runs after ref.
    assert outcome.rc == 0 and order == ["plain", "ref", "rho"]
    # The reference killed at the deadline: its run is dropped, not run without scores.
    ref, rho = run("ref", 30.0), run("rho", 0.0, needs=(ref_key,))
    outcome = bm.execute_plan([ref, rho], lambda r: "ok", resume=False, gpu_slots=["0", "1"],
                              limits=bm.Limits(time.monotonic(), deadline=0.5, kill_after=1.0))
    why = {m["run"]: m["why"] for m in outcome.missing}
    assert why["ref seed 0"].startswith("killed") and why["rho seed 0"].startswith("not started")


def test_a_run_that_hits_the_streaming_start_race_is_launched_again(tmp_path, capsys):
    # First launch: streaming's FileExistsError at start (as two jobs opening data together
    # produce); the second launch finds the marker and succeeds.
    script = tmp_path / "job.py"
    script.write_text(
        "import pathlib, sys\n"
        "mark = pathlib.Path(sys.argv[1])\n"
        "if not mark.exists():\n"
        "    mark.write_text('x')\n"
        "    print(\"FileExistsError: [Errno 17] File exists: '/000019_locals'\")\n"
        "    sys.exit(1)\n")
    arm = bm.Arm("a", section={}, family="a")
    run = bm.Run(arm, 0, tmp_path / "a", None, [sys.executable, str(script),
                                                 str(tmp_path / "mark")])
    outcome = bm.execute_plan([run], lambda r: "ok", resume=False, gpu_slots=["0"],
                              start_gap=0.0)
    assert outcome.rc == 0 and "launching it again" in capsys.readouterr().out
    # Any other failure is not retried.
    (tmp_path / "job2.py").write_text("import sys; print('boom'); sys.exit(3)\n")
    run = bm.Run(arm, 0, tmp_path / "b", None, [sys.executable, str(tmp_path / "job2.py")])
    assert bm.execute_plan([run], lambda r: "ok", resume=False, gpu_slots=["0"]).rc == 3


def test_launch_spacer_keeps_launches_apart():
    spacer = bm.LaunchSpacer(0.2)
    times = []
    threads = [__import__("threading").Thread(
        target=lambda: (spacer.wait(), times.append(time.monotonic()))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times.sort()
    assert all(b - a >= 0.19 for a, b in zip(times, times[1:]))


# ---- reference scores (tools/reference_scores.py) ----------------------------------------------

@pytest.fixture(scope="module")
def asyncio_corpus(tmp_path_factory):
    """A second slice of the standard library (its asyncio package), in several shards."""
    from attent_scale.data import default_source, prepare_corpus
    root = tmp_path_factory.mktemp("corpus") / "asyncio"
    prepare_corpus(root, seq_len=32, vocab_size=512, max_bytes=150_000,
                   source_dir=default_source() / "asyncio", progress=False, shard_bytes=16_000)
    return root


def test_rho_arm_runs_after_its_reference_and_pays_for_it(asyncio_corpus, tmp_path, fake_job,
                                                          monkeypatch):
    """The real reference tool on a real corpus of several shards; the fake job for the arms."""
    import numpy as np
    from streaming import StreamingDataset

    rs = load_tool("reference_scores")
    monkeypatch.setattr(bm, "parse_attent", lambda section: None)  # a config knowing "score"
    out = tmp_path / "out"
    assert bm.main(["--out", str(out), "--corpora", f"code={asyncio_corpus}", "--arms",
                    "full@0.5,full@1.0,random,rho-soft", "--epochs", "2", "--seeds", "0",
                    "--model", "tiny", "--micro", "8", "--eval-samples", "16", "--lr", "3e-3",
                    "--reference-epochs", "1", "--gpus", "0,1", "--start-gap", "0"]) == 0

    meta = json.loads((asyncio_corpus / "meta.json").read_text())
    assert len(json.loads((asyncio_corpus / "train" / "index.json").read_text())["shards"]) > 1
    ref_dir = out / "code" / "reference"
    scores = np.load(ref_dir / "reference.npy")
    assert scores.dtype == np.float32 and scores.shape == (meta["num_train"],)
    ref = json.loads((ref_dir / "reference.json").read_text())
    n = meta["num_val"] - 16
    assert ref["holdout"] == {"split": "val", "skip": 16, "sequences": n, "seq_len": 32}
    assert ref["train"]["optimizer_steps"] == -(-n // 8) and ref["train"]["tokens"] == n * 32
    assert ref["score"]["tokens"] == meta["num_train"] * 32
    assert ref["eval_loss"] is not None and ref["params"] == bm.shape_params("tiny", 512)
    # Sample ids are the training job's: its dataset's global index over the shards.
    rows = np.concatenate(list(rs.iter_shards(asyncio_corpus / "train", "tokens")))
    ds = StreamingDataset(local=str(asyncio_corpus / "train"), shuffle=False, batch_size=8)
    for i in (0, meta["num_train"] // 2, meta["num_train"] - 1):
        assert (rows[i] == ds[i]["tokens"]).all()

    res = json.loads((out / "code" / "ttq.json").read_text())
    cost = res["reference"]["steps"]
    # The same shape and tokens per step: trained steps + scored sequences / 3 (a forward).
    assert cost == pytest.approx(ref["train"]["tokens"] / (8 * 32)
                                 + ref["score"]["tokens"] / (8 * 32) / 3)
    rho, rnd = res["runs"]["rho-soft"]["0"], res["runs"]["random"]["0"]
    assert rho["cost_steps"] == pytest.approx(rho["optimizer_steps"] + cost)
    assert rnd["cost_steps"] == rnd["optimizer_steps"]
    assert json.loads((out / "summary.json").read_text())["policies"]["rho-soft"]["reference"]
    assert "Reference model (tiny" in (out / "code" / "ttq.md").read_text()
    with pytest.raises(SystemExit, match="leaves none for the reference"):
        rs.main(["--data", str(asyncio_corpus), "--out", str(tmp_path / "r"), "--model", "tiny",
                 "--holdout-skip", str(meta["num_val"]), "--device", "cpu"])


def test_reference_lr_schedule():
    rs = load_tool("reference_scores")
    assert rs.lr_factor(0, 100) == pytest.approx(0.2)      # warm-up over 5 steps
    assert rs.lr_factor(4, 100) == pytest.approx(1.0)
    assert rs.lr_factor(5, 100) == pytest.approx(1.0)      # cosine starts at the peak
    assert rs.lr_factor(100, 100) == pytest.approx(0.1)    # and ends at 10%


# ---- real runs -----------------------------------------------------------------------------

def test_cli_end_to_end_on_cpu(tiny_corpus, asyncio_corpus, tmp_path):
    """Two corpora, two slots (--gpus 0,1; on CPU only CUDA_VISIBLE_DEVICES differs): runs go
    side by side, so two streaming jobs share this node's shared memory and must not clean up
    each other's."""
    out = tmp_path / "ttq"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RANK", None)
    cmd = [sys.executable, str(ROOT / "tools" / "bench_ttq.py"), "--out", str(out), "--corpora",
           f"code={tiny_corpus},asyncio={asyncio_corpus}", "--model", "tiny", "--epochs", "2",
           "--micro", "16", "--seeds", "0", "--arms", "full@1.0,random",
           "--eval-every", "20", "--eval-samples", "32", "--lr", "3e-3", "--gpus", "0,1"]
    # Generous: it fails on a real hang, not on a loaded machine.
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count(": done in ") == 4 and "ETA" in proc.stdout
    assert "| policy | corpora |" in proc.stdout

    for corpus, data in (("code", tiny_corpus), ("asyncio", asyncio_corpus)):
        res = json.loads((out / corpus / "ttq.json").read_text())
        assert set(res["runs"]) == {"full@1.0", "random"} and not res["missing"]
        full = res["runs"]["full@1.0"]["0"]
        run_dir = out / corpus / "full@1.0" / "seed0"
        last_eval = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                     .splitlines() if '"eval"' in line][-1]
        assert res["target"]["arm"] == "full@1.0"
        assert res["target"]["loss"] == full["final_loss"] == last_eval["val_loss"]
        assert full["train_time"] < last_eval["time"]  # evaluation time is not training time
        assert res["runs"]["random"]["0"]["examples_skipped"] > 0
        cfg = json.loads((out / corpus / "random" / "seed0" / "ds_config.json").read_text())
        assert cfg["attent"] == {"preset": "random", "seed": 0}
        assert "attent" not in json.loads(
            (out / corpus / "full@1.0" / "seed0" / "ds_config.json").read_text())
        for arm in ("full@1.0", "random"):
            d = out / corpus / arm / "seed0"
            assert (d / "data").resolve() == data.resolve()
            assert "--no-shm-clean" in (d / "log.txt").read_text().splitlines()[0]
        assert (out / corpus / "ttq.md").read_text().count("\n| ") >= 3  # header + 2 arms
        assert (out / corpus / "ttq.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "on CUDA device(s) 0" in proc.stdout and "on CUDA device(s) 1" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]["random"]["corpora"]) == {"code", "asyncio"}


def test_a_failing_run_stops_the_plan_with_its_exit_code_and_log(tmp_path, fake_job, capsys):
    data = _corpus_dir(tmp_path, "code", fail="the corpus holds fewer than one global batch")
    out = tmp_path / "ttq"
    rc = bm.main(["--out", str(out), "--data", str(data), "--epochs", "1", "--seeds", "0",
                  "--arms", "full@1.0,random"])
    log = out / "full@1.0" / "seed0" / "log.txt"
    assert rc == 1
    assert f"FAILED with exit code 1; log: {log}" in capsys.readouterr().err
    assert "fewer than one global batch" in log.read_text()
    assert not (out / "random").exists() and not (out / "ttq.json").exists()
