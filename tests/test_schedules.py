"""Tests of the ratio / interval schedules and the per-pass plan (attent_scale/schedules.py)."""
from __future__ import annotations

import pytest

from attent_scale.config import IntervalSchedule, RatioSchedule, parse_attent
from attent_scale.schedules import PassPlan, build_plan, full_plan, interval_at, ratio_at

approx = lambda v: pytest.approx(v, rel=1e-12, abs=1e-15)  # noqa: E731


# ---- ratio_at ------------------------------------------------------------------------------------

def test_ratio_constant():
    s = RatioSchedule(schedule="constant", value=0.7)
    assert [ratio_at(s, x) for x in (0.0, 0.5, 1.0)] == [0.7, 0.7, 0.7]


def test_ratio_incremental():
    s = RatioSchedule(schedule="incremental", start=0.2, end=0.8)
    assert ratio_at(s, 0.0) == approx(0.2)
    assert ratio_at(s, 0.5) == approx(0.5)
    assert ratio_at(s, 1.0) == approx(0.8)
    assert ratio_at(s, 0.25) == approx(0.35)


def test_ratio_incremental_can_decrease():
    s = RatioSchedule(schedule="incremental", start=0.9, end=0.3)
    assert ratio_at(s, 0.0) == approx(0.9)
    assert ratio_at(s, 0.5) == approx(0.6)
    assert ratio_at(s, 1.0) == approx(0.3)


def test_ratio_cosine():
    s = RatioSchedule(schedule="cosine", start=0.2, end=0.8)
    assert ratio_at(s, 0.0) == approx(0.2)
    assert ratio_at(s, 0.5) == approx(0.5)
    assert ratio_at(s, 1.0) == approx(0.8)
    # 0.8 - 0.6 * (1 + cos(pi/4)) / 2 = 0.8 - 0.3 * (1 + 0.70710678118654752)
    assert ratio_at(s, 0.25) == approx(0.287867965644035744)


def test_ratio_step():
    s = RatioSchedule(schedule="step", values=[0.5, 0.7, 0.9])
    assert ratio_at(s, 0.0) == 0.5
    assert ratio_at(s, 0.3) == 0.5
    assert ratio_at(s, 0.34) == 0.7
    assert ratio_at(s, 0.5) == 0.7
    assert ratio_at(s, 0.67) == 0.9
    assert ratio_at(s, 1.0) == 0.9  # x == 1 belongs to the last share


def test_ratio_step_two_values():
    s = RatioSchedule(schedule="step", values=[0.4, 0.8])
    assert [ratio_at(s, x) for x in (0.0, 0.49, 0.5, 1.0)] == [0.4, 0.4, 0.8, 0.8]


def test_ratio_progress_is_clamped():
    s = RatioSchedule(schedule="incremental", start=0.2, end=0.8)
    assert ratio_at(s, -1.0) == approx(0.2)
    assert ratio_at(s, 2.0) == approx(0.8)
    st = RatioSchedule(schedule="step", values=[0.5, 0.7, 0.9])
    assert ratio_at(st, 5.0) == 0.9
    assert ratio_at(st, -5.0) == 0.5


# ---- interval_at ---------------------------------------------------------------------------------

def test_interval_fixed():
    s = IntervalSchedule(schedule="fixed", every=3)
    assert [interval_at(s, r, 100) for r in range(4)] == [3, 3, 3, 3]


def test_interval_incremental_capped():
    s = IntervalSchedule(schedule="incremental", every=2, growth=3, max=7)
    assert [interval_at(s, r, 100) for r in range(5)] == [2, 5, 7, 7, 7]
    s0 = IntervalSchedule(schedule="incremental", every=2, growth=0, max=7)
    assert [interval_at(s0, r, 100) for r in range(3)] == [2, 2, 2]
    s1 = IntervalSchedule(schedule="incremental", every=1, growth=1, max=5)
    assert [interval_at(s1, r, 100) for r in range(7)] == [1, 2, 3, 4, 5, 5, 5]


def test_interval_once():
    s = IntervalSchedule(schedule="once")
    assert interval_at(s, 0, 9) == 9
    assert interval_at(s, 3, 2) == 2


# ---- build_plan ----------------------------------------------------------------------------------

def _rows(plan: list[PassPlan]) -> list[tuple]:
    return [(p.index, p.kind, p.ratio, p.select, p.round) for p in plan]


def _assert_plan(plan: list[PassPlan], expected: list[tuple]) -> None:
    assert len(plan) == len(expected)
    for got, want in zip(_rows(plan), expected):
        assert got[0] == want[0] and got[1] == want[1] and got[3] == want[3] and got[4] == want[4], \
            (got, want)
        assert got[2] == approx(want[2]), (got, want)


def test_plan_attent_simple_four_passes():
    cfg = parse_attent({"preset": "attent-simple"})
    _assert_plan(build_plan(cfg, 4), [
        (0, "full", 1.0, False, -1),
        (1, "subset", 0.7, True, 0),
        (2, "subset", 0.7, False, 0),
        (3, "subset", 0.7, False, 0),
    ])


def test_plan_attent_complex_ten_passes():
    cfg = parse_attent({"preset": "attent-complex"})
    # warm-up 1, intervals 1, 2, 3 (growth 1), one full pass after each round;
    # progress = (p - 1) / (9 - 1) at the first pass p of a round; ratio = 0.2 + 0.6 * progress.
    _assert_plan(build_plan(cfg, 10), [
        (0, "full", 1.0, False, -1),
        (1, "subset", 0.2, True, 0),      # progress 0
        (2, "full", 1.0, False, -1),
        (3, "subset", 0.35, True, 1),     # progress 2/8
        (4, "subset", 0.35, True, 1),     # resample_each_pass: selects again
        (5, "full", 1.0, False, -1),
        (6, "subset", 0.575, True, 2),    # progress 5/8
        (7, "subset", 0.575, True, 2),
        (8, "subset", 0.575, True, 2),
        (9, "full", 1.0, False, -1),
    ])


def test_plan_attent_complex_twelve_passes_last_round_truncated():
    cfg = parse_attent({"preset": "attent-complex"})
    # progress = (p - 1) / 10; round 3 would last 4 passes but only 2 remain, and no full pass fits
    _assert_plan(build_plan(cfg, 12), [
        (0, "full", 1.0, False, -1),
        (1, "subset", 0.2, True, 0),
        (2, "full", 1.0, False, -1),
        (3, "subset", 0.32, True, 1),
        (4, "subset", 0.32, True, 1),
        (5, "full", 1.0, False, -1),
        (6, "subset", 0.5, True, 2),
        (7, "subset", 0.5, True, 2),
        (8, "subset", 0.5, True, 2),
        (9, "full", 1.0, False, -1),
        (10, "subset", 0.74, True, 3),
        (11, "subset", 0.74, True, 3),
    ])


def test_plan_complex_without_resample_selects_once_per_round():
    cfg = parse_attent({"preset": "attent-complex", "selection": {"resample_each_pass": False}})
    plan = build_plan(cfg, 10)
    assert [p.select for p in plan] == [False, True, False, True, False, False, True, False, False,
                                        False]
    assert [p.round for p in plan] == [-1, 0, -1, 1, 1, -1, 2, 2, 2, -1]


def test_plan_resample_each_pass_with_once_interval():
    cfg = parse_attent({"preset": "attent-simple", "selection": {"resample_each_pass": True}})
    plan = build_plan(cfg, 4)
    assert [p.select for p in plan] == [False, True, True, True]
    assert [p.round for p in plan] == [-1, 0, 0, 0]


def test_plan_fixed_interval_step_ratio():
    cfg = parse_attent({"warmup_passes": 1, "ratio": {"schedule": "step", "values": [0.5, 0.7, 0.9]},
                        "interval": {"schedule": "fixed", "every": 2}})
    # first=1, last=6: rounds start at p=1 (x=0), 3 (x=0.4), 5 (x=0.8); round 2 is cut to 2 passes
    _assert_plan(build_plan(cfg, 7), [
        (0, "full", 1.0, False, -1),
        (1, "subset", 0.5, True, 0),
        (2, "subset", 0.5, False, 0),
        (3, "subset", 0.7, True, 1),
        (4, "subset", 0.7, False, 1),
        (5, "subset", 0.9, True, 2),
        (6, "subset", 0.9, False, 2),
    ])


def test_plan_random_preset_selects_every_pass():
    cfg = parse_attent({"preset": "random"})
    _assert_plan(build_plan(cfg, 4), [
        (0, "full", 1.0, False, -1),
        (1, "subset", 0.7, True, 0),
        (2, "subset", 0.7, True, 1),
        (3, "subset", 0.7, True, 2),
    ])


def test_plan_pool_source_without_warmup_starts_at_zero():
    cfg = parse_attent({"source": "pool", "warmup_passes": 0,
                        "ratio": {"schedule": "incremental", "start": 0.2, "end": 0.8},
                        "interval": {"schedule": "fixed", "every": 1}})
    _assert_plan(build_plan(cfg, 3), [
        (0, "subset", 0.2, True, 0),
        (1, "subset", 0.5, True, 1),
        (2, "subset", 0.8, True, 2),
    ])


def test_plan_fewer_passes_than_warmup():
    cfg = parse_attent({"preset": "attent-simple", "warmup_passes": 3})
    _assert_plan(build_plan(cfg, 2), [(0, "full", 1.0, False, -1), (1, "full", 1.0, False, -1)])
    _assert_plan(build_plan(cfg, 3), [(p, "full", 1.0, False, -1) for p in range(3)])


def test_plan_single_subset_pass_uses_end_of_schedule():
    # one pass after warm-up: first == last, so progress is 1 and the ratio is the schedule's end
    cfg = parse_attent({"warmup_passes": 2, "ratio": {"schedule": "incremental", "start": 0.2,
                                                      "end": 0.6}})
    _assert_plan(build_plan(cfg, 3), [
        (0, "full", 1.0, False, -1),
        (1, "full", 1.0, False, -1),
        (2, "subset", 0.6, True, 0),
    ])


def test_plan_indices_are_consecutive():
    for preset in ("attent-simple", "attent-complex", "random"):
        cfg = parse_attent({"preset": preset})
        for n in (1, 2, 5, 17):
            plan = build_plan(cfg, n)
            assert [p.index for p in plan] == list(range(n))


def test_plan_rejects_zero_passes():
    cfg = parse_attent({"preset": "attent-simple"})
    with pytest.raises(ValueError):
        build_plan(cfg, 0)


def test_full_plan():
    assert _rows(full_plan(3)) == [(0, "full", 1.0, False, -1), (1, "full", 1.0, False, -1),
                                   (2, "full", 1.0, False, -1)]


# ---- final full passes and check_plan ------------------------------------------------------------

def test_plan_infobatch_preset_ends_with_a_full_pass():
    cfg = parse_attent({"preset": "infobatch"})
    _assert_plan(build_plan(cfg, 5), [
        (0, "full", 1.0, False, -1),
        (1, "subset", 0.7, True, 0),
        (2, "subset", 0.7, True, 1),
        (3, "subset", 0.7, True, 2),
        (4, "full", 1.0, False, -1),
    ])


def test_plan_final_full_passes_shorten_the_schedules_progress():
    # selection passes 1..4 (the last two of 7 are full): progress (p - 1) / 3
    cfg = parse_attent({"ratio": {"schedule": "incremental", "start": 0.2, "end": 0.8},
                        "interval": {"schedule": "fixed", "every": 1}, "final_full_passes": 2})
    _assert_plan(build_plan(cfg, 7), [
        (0, "full", 1.0, False, -1),
        (1, "subset", 0.2, True, 0),
        (2, "subset", 0.4, True, 1),
        (3, "subset", 0.6, True, 2),
        (4, "subset", 0.8, True, 3),
        (5, "full", 1.0, False, -1),
        (6, "full", 1.0, False, -1),
    ])


def test_plan_final_full_passes_cut_rounds_and_between_round_passes():
    # attent-complex in 8 passes with one final full pass: rounds stop at pass 6
    cfg = parse_attent({"preset": "attent-complex", "final_full_passes": 1})
    plan = build_plan(cfg, 8)
    assert [(q.kind, q.round) for q in plan] == [
        ("full", -1), ("subset", 0), ("full", -1), ("subset", 1), ("subset", 1), ("full", -1),
        ("subset", 2), ("full", -1)]
    # ratio progress runs over passes 1..6: round 2 starts at 5/5 -> the schedule's end
    assert plan[6].ratio == approx(0.8) and plan[3].ratio == approx(0.2 + 0.6 * 2 / 5)
    # interval 'once' stops before the final passes too
    once = parse_attent({"preset": "attent-simple", "final_full_passes": 1})
    assert [(q.kind, q.select) for q in build_plan(once, 4)] == [
        ("full", False), ("subset", True), ("subset", False), ("full", False)]


def test_plan_without_room_for_selection_is_all_full():
    cfg = parse_attent({"preset": "infobatch", "final_full_passes": 3})
    assert [q.kind for q in build_plan(cfg, 3)] == ["full"] * 3
    assert [q.kind for q in build_plan(cfg, 4)] == ["full"] * 4
    assert [q.kind for q in build_plan(cfg, 5)] == ["full", "subset", "full", "full", "full"]


def test_check_plan_problems_have_key_value_and_fix():
    from attent_scale.schedules import check_plan
    assert check_plan(parse_attent({"preset": "infobatch"}), 3) == []
    assert check_plan(None, 3) == []
    assert check_plan(parse_attent({"warmup_passes": 5}), 3) == [
        "attent.warmup_passes: got 5 with 3 passes; the teacher would never select; allowed: "
        "warmup_passes + final_full_passes < 3 (the passes); fix: lower attent.warmup_passes or "
        "train more than 5 passes"]
    (line,) = check_plan(parse_attent({"preset": "infobatch"}), 2)
    assert line.startswith("attent.final_full_passes: got 1 with attent.warmup_passes 1 and 2 "
                           "passes; the teacher would never select (every pass is full);")
    assert "fix: lower attent.final_full_passes" in line
    for cfg in (None, parse_attent({})):
        (line,) = check_plan(cfg, 0)
        assert line.startswith("passes: got 0; allowed: an integer >= 1; fix:")
    # with the data size: a subset pass below one global batch (0.7 x 20 = 14 < 16)
    (line,) = check_plan(parse_attent({"preset": "infobatch"}), 3, num_samples=20,
                         global_batch=16)
    assert line.startswith("attent.ratio: pass 1 trains ratio 0.7000 x 20 samples, less than "
                           "one global batch of 16; allowed: a ratio >= 0.8000")
    assert check_plan(parse_attent({"preset": "infobatch"}), 3, num_samples=23,
                      global_batch=16) == []  # 0.7 x 23 = 16.1
    # an incremental ratio fails at its first, smallest pass
    inc = parse_attent({"ratio": {"schedule": "incremental", "start": 0.1, "end": 0.9},
                        "interval": {"schedule": "fixed", "every": 1}})
    (line,) = check_plan(inc, 4, num_samples=100, global_batch=16)
    assert line.startswith("attent.ratio: pass 1 trains ratio 0.1000")


def test_require_plan_raises_one_config_error():
    from attent_scale.config import ConfigError
    from attent_scale.schedules import require_plan
    require_plan(parse_attent({}), 2)
    with pytest.raises(ConfigError) as ei:
        require_plan(parse_attent({"warmup_passes": 5}), 3)
    lines = str(ei.value).splitlines()
    assert lines[0] == "invalid 'attent' section (1 problem):"
    assert lines[1].strip().startswith("attent.warmup_passes: got 5 with 3 passes;")
