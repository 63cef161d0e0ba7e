"""The arithmetic of the GPU benchmark tools, on made-up measurements (their speed lives on GPUs).

tools/bench_finetune.py: paired savings and the step saving at equal loss against the full-data
frontier. tools/bench_scaling.py: the paired teacher cost and the efficiency ratio.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from conftest import load_tool as _tool


def _row(arm, seed, steps, loss, runtime):
    return {"arm": arm, "seed": seed, "steps": steps, "answer_loss": loss,
            "train_runtime_s": runtime, "wall_s": runtime + 10, "exact_match": 0.5,
            "flexible_match": 0.5, "n_test": 4}


def test_finetune_frontier_saving_and_summary():
    bench = _tool("bench_finetune")
    short, full = _row("full-budget", 0, 80, 2.0, 80.0), _row("full", 0, 100, 1.0, 100.0)
    # Full data needs 90 steps for loss 1.5 on the line (80, 2.0)-(100, 1.0): 1 - 80/90.
    assert math.isclose(bench.frontier_saving(_row("a", 0, 80, 1.5, 0), short, full), 1 / 9)
    assert bench.frontier_saving(_row("a", 0, 80, 2.0, 0), short, full) == 0.0
    # Worse than the short run: extrapolated below 80 steps, a negative saving.
    assert math.isclose(bench.frontier_saving(_row("a", 0, 80, 2.5, 0), short, full), 1 - 80 / 70)
    with pytest.raises(ValueError, match="two distinct points"):
        bench.frontier_saving(short, short, short)

    rows = [full, short, _row("attent-simple", 0, 80, 1.5, 70.0),
            _row("full", 1, 100, 1.2, 110.0), _row("full-budget", 1, 80, 1.6, 88.0),
            _row("attent-simple", 1, 80, 1.6, 77.0)]
    arms = bench.arm_list("full,full-budget,attent-simple")
    assert arms == ["full", "attent-simple", "full-budget"]  # the budget waits for its source
    args = argparse.Namespace(epochs=3, lora_rank=8, lora_alpha=16, lr=1e-3, batch_size=4,
                              grad_accum=1)
    report = bench.summarize(args, rows, arms, 2, Path("base"), 4)
    s = report["summary"]["attent-simple"]
    # Seed 0 saves 30% of full's time, seed 1 also 30% (77 of 110): paired per seed.
    assert math.isclose(s["time_saving"]["mean"], 0.3)
    assert math.isclose(s["loss_delta"]["min"], 0.4) and math.isclose(s["loss_delta"]["max"], 0.5)
    # Seed 0: 1/9; seed 1 sits on its full-budget point: 0.
    assert math.isclose(s["step_saving_at_loss"]["max"], 1 / 9)
    assert s["step_saving_at_loss"]["min"] == 0.0
    assert "step_saving_at_loss" not in report["summary"]["full-budget"]
    assert "| attent-simple | 80 |" in report["markdown"]
    with pytest.raises(SystemExit, match="full-budget takes its step budget"):
        bench.arm_list("full,full-budget")
    with pytest.raises(SystemExit, match="unknown \\['soft'\\]"):
        bench.arm_list("full,soft")


def test_scaling_paired_cost_and_efficiency_ratio():
    bench = _tool("bench_scaling")

    def result(plain, factor, pass_end=0.0):
        return {"plain_blocks_ms": plain, "teacher_blocks_ms": [x * factor for x in plain],
                "pass_end_ms": pass_end, "steps_per_pass": 100}

    # Plain blocks drift by 30% between rounds; each round's teacher block follows its plain one,
    # so the paired cost is exact however much the host drifts.
    one = result([100, 130, 90, 120, 110], 1.01)
    four = result([200, 260, 180, 240, 220], 1.03, pass_end=100.0)  # +1 ms a step from the end
    cost, ratio = bench.paired_cost(one, one)
    assert math.isclose(cost["median"], 1.01) and ratio == {"median": 1.0, "low": 1.0, "high": 1.0}
    cost, ratio = bench.paired_cost(four, one)
    ratios = sorted((t + 1.0) / p for t, p in zip(four["teacher_blocks_ms"],
                                                   four["plain_blocks_ms"]))
    assert math.isclose(cost["median"], ratios[2])
    assert math.isclose(ratio["median"], 1.01 / ratios[2])
    assert ratio["low"] <= ratio["median"] <= ratio["high"] < 1.0
    assert bench.paired_cost(four, one) == (cost, ratio)  # a fixed generator: same intervals


def test_protocol_report_joins_bench_ttq_outputs(tmp_path, capsys):
    """tools/protocol_report.py --ttq: finished runs of a bench_ttq.py --out directory, per
    corpus, joined with an earlier runs JSON; unfinished runs (no final loss) are left out."""
    import json
    report = _tool("protocol_report")
    run = lambda steps, loss: {"optimizer_steps": steps, "final_loss": loss}  # noqa: E731
    for corpus, shift in (("code", 0.0), ("prose", 1.0)):
        (tmp_path / "c100" / corpus).mkdir(parents=True)
        (tmp_path / "c100" / corpus / "ttq.json").write_text(json.dumps({"runs": {
            "full@1.0": {"0": run(100, 4.0 + shift), "1": run(100, 4.2 + shift)},
            "random": {"0": run(74, 4.5 + shift), "1": run(74, 4.6 + shift)},
            "attent-mix": {"0": run(74, 4.4 + shift), "1": {"optimizer_steps": 30,
                                                            "final_loss": None}}}}))
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"100m|code|full@0.7": {"0": [70, 4.6], "1": [70, 4.7]},
                                   # a later call that finished attent-mix's seed 1
                                   "100m|code|attent-mix": {"1": [74, 4.65]}}))
    joined = tmp_path / "joined.json"
    assert report.main([str(earlier), "--ttq", f"100m={tmp_path / 'c100'}",
                        "--write", str(joined)]) == 0
    runs = json.loads(joined.read_text())
    assert runs["100m|prose|random"] == {"0": [74, 5.5], "1": [74, 5.6]}
    # seed 1 never finished in c100; the earlier JSON's seed 1 is kept beside c100's seed 0
    assert runs["100m|code|attent-mix"] == {"0": [74, 4.4], "1": [74, 4.65]}
    assert runs["100m|prose|attent-mix"] == {"0": [74, 5.4]}
    assert runs["100m|code|full@0.7"] == {"0": [70, 4.6], "1": [70, 4.7]}
    text = capsys.readouterr().out
    # code: 0.1 below random on seed 0 and 0.05 above on seed 1; prose: 0.1 below on its seed
    assert "| attent-mix | 2 | 4.4000, 4.6500 | -0.0250 [-0.1000, +0.0500] | 1/2 |" in text
    assert "| attent-mix | 1 | 5.4000 | -0.1000 | 1/1 |" in text
    # against full data at 74 steps, read between each seed's full@0.7 and full@1.0 on code
    # (seed 0: 4.6 - 0.6 * 4/30 = 4.52; seed 1: 4.7 - 0.5 * 4/30 = 4.6333); prose has no
    # full@0.7, so 74 steps lie outside its full-data runs and the cell stays empty
    assert "| attent-mix | 2 | 4.4000, 4.6500 | -0.0250 [-0.1000, +0.0500] | 1/2 | " \
        "-0.0517 [-0.1200, +0.0167] | 1/2 |" in text
    assert "| random | 2 | 4.5000, 4.6000 | control |  | -0.0267 [-0.0333, -0.0200] | 2/2 |" \
        in text
    assert "| attent-mix | 1 | 5.4000 | -0.1000 | 1/1 | – |  |" in text
    with pytest.raises(SystemExit):
        report.main(["--ttq", f"100m={tmp_path / 'nothing'}"])


def test_protocol_report_reads_steps_to_target_on_a_policys_own_frontier(tmp_path, capsys):
    """ARM@X budgets give a policy its own frontier: the steps where it reaches full@1.0's mean
    loss are interpolated on it, given as a bound when its smallest budget already got there,
    and left empty (no failure) on a corpus without full@1.0."""
    import json
    report = _tool("protocol_report")
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({
        "s|code|full@1.0": {"0": [100, 4.0], "1": [100, 4.2]},    # target 4.1 at 100 steps
        "s|code|slow": {"0": [80, 4.5]}, "s|code|slow@1.3": {"0": [104, 4.0]},
        "s|code|fast": {"0": [80, 4.05]}, "s|code|fast@1.3": {"0": [104, 3.9]},
        "s|code|stuck": {"0": [80, 4.6]}, "s|code|stuck@1.2": {"0": [96, 4.3]},
        "s|prose|fast": {"0": [80, 4.05]}, "s|prose|fast@1.3": {"0": [104, 3.9]}}))
    assert report.main([str(runs)]) == 0
    text = capsys.readouterr().out
    # slow: 4.5 -> 4.0 over 80 -> 104 steps reaches 4.1 at 80 + 24 * 0.8 = 99.2: +0.8%; its one
    # seed against that seed's full@1.0 (4.0 at 100 steps) only at 104 steps: -4.0%
    assert "| slow | 1 | 4.5000 |" in text
    assert "| 99 (+0.8%); per seed -4.0% (1/1 seeds reached) |" in text
    # fast: its 80-step run already ends below 4.1: at most 80 steps, a saving of at least 20%;
    # seed 0 reaches 4.0 at 80 + 24 * 0.05 / 0.15 = 88 steps: +12.0%
    assert "| ≤ 80 (+20.0%, smallest budget); per seed +12.0% (1/1 seeds reached) |" in text
    # stuck: its longest budget (96 steps) ends at 4.3, above 4.1, so it needs more than 96
    # steps: a saving below 1 - 96/100
    assert "| not reached (best 4.3000 at 96, saving < +4.0%); per seed – (0/1 seeds reached) |" \
        in text
    prose = text.split("## s, prose")[1]
    assert "target: no full@1.0 run" in prose and prose.rstrip().endswith("| – |")


def test_protocol_report_counts_a_reference_model_and_filters_keys(tmp_path, capsys):
    """An arm that paid for a reference model (bench_ttq's cost_steps) gets a second saving and a
    second steps-to-target with that compute added; FILE::PATTERN keeps only the matching keys of
    a file."""
    import json
    report = _tool("protocol_report")
    (tmp_path / "c" / "code").mkdir(parents=True)
    (tmp_path / "c" / "code" / "ttq.json").write_text(json.dumps({"runs": {
        "random": {"0": {"optimizer_steps": 70, "final_loss": 4.6, "cost_steps": 70}},
        "rho": {"0": {"optimizer_steps": 70, "final_loss": 4.3, "cost_steps": 75}},
        "rho@1.3": {"0": {"optimizer_steps": 90, "final_loss": 3.8, "cost_steps": 95}}}}))
    frontier = tmp_path / "full.json"
    frontier.write_text(json.dumps({"s|code|full@0.5": {"0": [50, 5.0]},
                                    "s|code|full@1.0": {"0": [100, 4.0]},
                                    "s|code|other": {"0": [70, 9.0]}}))
    joined = tmp_path / "joined.json"
    assert report.main([f"{frontier}::s|code|full@*", "--ttq", f"s={tmp_path / 'c'}",
                        "--write", str(joined)]) == 0
    runs = json.loads(joined.read_text())
    assert runs["s|code|rho"] == {"0": [70, 4.3, 75]} and runs["s|code|random"] == {"0": [70, 4.6]}
    assert "s|code|other" not in runs
    text = capsys.readouterr().out
    # 4.3 lies at 50 + 50 * 0.7 = 85 steps on the frontier: 1 - 70/85 = +17.6%; with the
    # reference counted 1 - 75/85 = +11.8%; random ends on the frontier (4.6 at 70 steps) and
    # pays nothing: +0.0% twice
    assert "| saving at final loss | saving, reference counted |" in text
    assert "| +17.6% | +11.8% |" in text and "| +0.0% | +0.0% |" in text
    # rho's own frontier (70, 4.3) -> (90, 3.8) reaches 4.0 at 70 + 20 * 0.3 / 0.5 = 82 steps,
    # and with the reference's 5 steps counted 87
    assert ("| 82 (+18.0%); per seed +18.0% (1/1 seeds reached); "
            "reference counted 87 (+13.0%) |") in text
    with pytest.raises(SystemExit):
        report.main([f"{frontier}::nothing|*"])
