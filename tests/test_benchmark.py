"""The time-to-quality harness: its arithmetic on hand-made curves, its arms, and one real run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

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


# ---- the whole analysis on synthetic runs --------------------------------------------------

def _run(points, teacher_time=0.0):
    """load_run-shaped data from (time, loss) points (steps 0, 10, ...)."""
    curve = [[t, loss, 10 * i, 100 * i] for i, (t, loss) in enumerate(points)]
    return {"curve": curve, "train_time": curve[-1][0], "final_loss": curve[-1][1],
            "teacher_time": teacher_time, "tokens_trained": curve[-1][3],
            "examples_trained": 10 * len(points), "examples_skipped": 0,
            "optimizer_steps": curve[-1][2], "peak_memory_gib": None}


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

    md = bm.markdown(arms, res)
    assert "| random | 2 |" in md and "(1/2 seeds)" in md and "+28.0%" in md
    assert "3.1000" in md


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


def test_plot_writes_png(tmp_path):
    arms, runs = _synthetic()
    res = bm.analyze(arms, runs)
    out = bm.plot(arms, runs, res, tmp_path / "ttq.png", title="synthetic")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- arms ------------------------------------------------------------------------------------

def test_arm_names(tmp_path):
    full = bm.parse_arm("full@0.65")
    assert full.baseline and full.budget == 0.65 and full.attent(1) is None
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


def test_policies_are_valid_and_distinct_from_presets():
    assert not set(bm.POLICIES) & set(PRESETS)
    for name, section in bm.POLICIES.items():
        assert not name.startswith("full@")
        assert parse_attent({**section, "seed": 0}) is not None, name


@pytest.mark.parametrize("spec, words", [
    ("nope", "unknown arm 'nope'"), ("full@0", "(0, 1]"), ("full@1.5", "(0, 1]"),
    ("full@x", "(0, 1]"), ("random=x.json", "not a preset"), ("a b=x.json", "letters"),
])
def test_bad_arm_names_list_the_allowed_ones(spec, words):
    with pytest.raises(bm.ArmError) as exc:
        bm.parse_arm(spec)
    assert words in str(exc.value)
    if "unknown" in words:
        for name in ("full@0.5", "attent-simple", "attent-complex", "random", "soft-rescale",
                     "NAME=path"):
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
    assert bm.main(["--out", str(tmp_path), "--arms", "full@0.5,random", "--seeds", "3",
                    "--model", "tiny", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "--no-teacher --budget-fraction 0.5" in lines[0] and "--seed 3" in lines[0]
    assert "--no-teacher" not in lines[1]
    assert not (tmp_path / "full@0.5").exists()


@pytest.mark.parametrize("gpus,nproc,words", [("0,x", 1, "device numbers"),
                                               ("0,1", 2, "--nproc=2 devices")])
def test_bad_gpu_slots_are_refused(gpus, nproc, words, capsys):
    with pytest.raises(SystemExit):
        bm.parse_args(["--arms", "random", "--gpus", gpus, "--nproc", str(nproc)])
    assert words in capsys.readouterr().err


def test_gpu_slots_of_several_devices(tmp_path):
    args = bm.parse_args(["--out", str(tmp_path), "--arms", "random", "--gpus", "0+1,2+3",
                          "--nproc", "2"])
    assert args.gpu_slots == ["0,1", "2,3"]


def test_nproc_launches_through_torchrun(tmp_path):
    args = bm.parse_args(["--out", str(tmp_path), "--arms", "random", "--seeds", "0",
                          "--nproc", "2"])
    cmd = bm.make_run(args, args.arm_list[0], 0).command
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


def test_resume_reuses_only_identical_finished_runs(tmp_path):
    args = bm.parse_args(["--out", str(tmp_path), "--arms", "random", "--seeds", "0",
                          "--model", "tiny"])
    run = bm.make_run(args, args.arm_list[0], 0)
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
    other = bm.make_run(args2, args2.arm_list[0], 0)
    assert other.dir == run.dir and not other.finished()  # another config: run again


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


# ---- real runs -----------------------------------------------------------------------------

def test_cli_end_to_end_on_cpu(tiny_corpus, tmp_path):
    """Two slots (--gpus 0,1; on CPU only CUDA_VISIBLE_DEVICES differs): runs go side by side,
    so two streaming jobs share this node's shared memory and must not clean up each other's."""
    out = tmp_path / "ttq"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RANK", None)
    cmd = [sys.executable, str(ROOT / "tools" / "bench_ttq.py"), "--out", str(out), "--data",
           str(tiny_corpus), "--model", "tiny", "--epochs", "2", "--micro", "8", "--seeds", "0",
           "--arms", "full@0.5,full@1.0,random", "--eval-every", "20", "--eval-samples", "32",
           "--lr", "3e-3", "--gpus", "0,1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("[ttq ") >= 6  # a start and an end line per run
    assert "| arm | seeds |" in proc.stdout

    res = json.loads((out / "ttq.json").read_text())
    assert set(res["runs"]) == {"full@0.5", "full@1.0", "random"}
    full = res["runs"]["full@1.0"]["0"]
    last_eval = [json.loads(line) for line in
                 (out / "full@1.0" / "seed0" / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in line][-1]
    assert res["target"]["arm"] == "full@1.0"
    assert res["target"]["loss"] == full["final_loss"] == last_eval["val_loss"]
    half = res["runs"]["full@0.5"]["0"]["optimizer_steps"]
    assert abs(half - full["optimizer_steps"] / 2) <= 1
    assert full["train_time"] < last_eval["time"]  # evaluation time is not training time
    assert res["runs"]["random"]["0"]["examples_skipped"] > 0
    cfg = json.loads((out / "random" / "seed0" / "ds_config.json").read_text())
    assert cfg["attent"] == {"preset": "random", "seed": 0}
    assert "attent" not in json.loads((out / "full@0.5" / "seed0" / "ds_config.json").read_text())
    assert (out / "random" / "seed0" / "log.txt").stat().st_size > 0
    for arm in ("full@0.5", "full@1.0", "random"):
        run_dir = out / arm / "seed0"
        assert (run_dir / "data").resolve() == tiny_corpus.resolve()
        assert "--no-shm-clean" in (run_dir / "log.txt").read_text().splitlines()[0]
    assert "on CUDA device(s) 0" in proc.stdout and "on CUDA device(s) 1" in proc.stdout
    assert (out / "ttq.md").read_text().count("\n| ") == 4  # header + 3 arms
    assert (out / "ttq.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_stops_at_a_failing_run_with_its_exit_code_and_log(tiny_corpus, tmp_path):
    out = tmp_path / "ttq"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    # A micro batch larger than the corpus: the job refuses to start.
    cmd = [sys.executable, str(ROOT / "tools" / "bench_ttq.py"), "--out", str(out), "--data",
           str(tiny_corpus), "--model", "tiny", "--epochs", "1", "--micro", "4096",
           "--seeds", "0", "--arms", "full@1.0,random"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200)
    log = out / "full@1.0" / "seed0" / "log.txt"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAILED with exit code 1; log: {log}" in proc.stderr
    assert "fewer than one global batch" in log.read_text()
    assert not (out / "random").exists() and not (out / "ttq.json").exists()
