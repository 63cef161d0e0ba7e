"""Tables of the evaluation protocol from several bench_ttq.py calls' final (steps, loss) pairs.

A device call that ends early (its limit, a lost machine) keeps its runs' final figures in its
log and ttq.json files but not always a report over all of them. This tool joins them and
applies bench_ttq's own arithmetic (frontiers, paired differences, steps to target):

    python tools/protocol_report.py docs/bench/protocol-2026-12-02.json
    python tools/protocol_report.py --ttq 100m=runs/c100 --ttq small-fp=runs/fp --write joined.json
    python tools/protocol_report.py 'earlier.json::100m|*|full@*' later.json

``FILE::PATTERN`` keeps only that file's keys matching the shell-style pattern (one call's
full-data frontier joined with another call's teacher arms).

The input maps ``"<scale>|<corpus>|<arm>"`` to ``{seed: [optimizer steps, final val loss]}``, or
``[steps, loss, cost steps]`` for an arm that needed a reference model (RHO-LOSS): its steps plus
the reference's compute in steps of the job (bench_ttq's ``cost_steps``).
Runs of one arm given by several inputs are joined seed by seed (a device call that lost one
seed can be completed by another). Per scale and corpus it prints, for every teacher arm: the
paired difference of final loss against the budget-matched random control at equal steps
(negative = better; read on each seed's random budgets), the same against full data at equal
steps (read on each seed's full@F budgets: is the arm below the full-data frontier?), the step
saving at the arm's final loss against the full-data frontier (built
from the full@F means; where a reference model's compute is given, the same saving with it
counted), and, where the arm ran at several budgets (ARM@X), the steps its own frontier needs to
reach full@1.0's mean loss (per seed, that seed's full@1.0 loss; and with the reference model's
compute counted where it paid for one).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ttq import (build_frontier, frontier_time, paired_difference,  # noqa: E402
                       per_seed_to_target, saving, steps_to_target)


def family(arm: str) -> str:
    return arm.split("@")[0]


def fmt(values: list[float], pct: bool = False) -> str:
    if not values:
        return "–"
    f = (lambda v: f"{v:+.1%}") if pct else (lambda v: f"{v:+.4f}")
    mean = statistics.fmean(values)
    return f(mean) if len(values) == 1 else f"{f(mean)} [{f(min(values))}, {f(max(values))}]"


def target_cell(tt: dict | None) -> str:
    """The steps-to-target cell: measured, a bound (the smallest budget already got there), not
    reached, or empty (a single budget, or no full@1.0 to give the target)."""
    if tt is None or tt["status"] == "no runs":
        return "–"
    if tt["status"] == "not reached":
        below = "" if tt["saving_below"] is None else f", saving < {tt['saving_below']:+.1%}"
        return f"not reached (best {tt['best_loss']:.4f} at {tt['best_steps']:.0f}{below})"
    bound = "≤ " if tt["bound"] else ""
    suffix = ", smallest budget" if tt["bound"] else ""
    return f"{bound}{tt['steps']:.0f} ({tt['saving']:+.1%}{suffix})"


def per_seed_cell(budgets: list[dict[int, tuple[float, float]]],
                  target_runs: dict[int, tuple[float, float]]) -> str:
    """Steps-to-target saving seed by seed: each seed's budgets against that seed's full@1.0."""
    seeds = sorted(set().union(*budgets))
    per_seed = per_seed_to_target(seeds, budgets, target_runs)
    reached = [tt["saving"] for tt in per_seed.values() if tt["saving"] is not None]
    return f"{fmt(reached, pct=True)} ({len(reached)}/{len(seeds)} seeds reached)"


def report(runs: dict[str, dict[str, list]]) -> str:
    table: dict[tuple[str, str], dict[str, dict[int, tuple[float, float]]]] = defaultdict(dict)
    # (scale, corpus) -> arm -> seed -> steps with a reference model's compute added
    costs: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(dict)
    for key, seeds in runs.items():
        scale, corpus, arm = key.split("|")
        table[(scale, corpus)][arm] = {int(s): (float(v[0]), float(v[1])) for s, v in seeds.items()}
        costs[(scale, corpus)][arm] = {int(s): float(v[2] if len(v) > 2 else v[0])
                                       for s, v in seeds.items()}
    lines = []
    for (scale, corpus), arms in sorted(table.items()):
        # The extra column only where some arm paid for a reference model: read beside the
        # plain saving, it says whether the teacher still saves once that compute is counted.
        counted = any(c != arms[arm][s][0] for arm, cs in costs[(scale, corpus)].items()
                      for s, c in cs.items())
        full = {a: r for a, r in arms.items() if a.startswith("full@")}
        means = [(statistics.fmean(v[0] for v in r.values()),
                  statistics.fmean(v[1] for v in r.values())) for r in full.values() if r]
        frontier = build_frontier(means)
        target = statistics.fmean(v[1] for v in full["full@1.0"].values()) \
            if full.get("full@1.0") else None
        target_steps = statistics.fmean(v[0] for v in full["full@1.0"].values()) \
            if full.get("full@1.0") else None
        control: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for arm, r in arms.items():
            if family(arm) == "random":
                for seed, point in r.items():
                    control[seed].append(point)
        full_seeds: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for r in full.values():
            for seed, point in r.items():
                full_seeds[seed].append(point)
        lines += [f"## {scale}, {corpus}", "",
                  f"target: full@1.0 mean loss {target:.4f} at {target_steps:.0f} steps" if target
                  else "target: no full@1.0 run", "",
                  "| arm | seeds | final loss | Δ vs random at equal steps | better | Δ vs full "
                  "data at equal steps | better | saving at final loss | "
                  + ("saving, reference counted | " if counted else "")
                  + "steps to target (own frontier) |",
                  "|---|---|---|---|---|---|---|---|" + ("---|" if counted else "") + "---|"]
        families: dict[str, list[str]] = defaultdict(list)
        for arm in arms:
            families[family(arm)].append(arm)
        for fam, members in sorted(families.items()):
            if fam == "full":
                continue
            base = arms.get(fam, {})
            diff = paired_difference(base, control) if fam != "random" else None
            vs_full = paired_difference(base, full_seeds)
            full_diffs = [v for v in vs_full["per_seed"].values() if v is not None]
            full_better = f"{vs_full['better']}/{vs_full['n']}" if full_diffs else ""
            savings = [saving(s, frontier_time(frontier, loss)) for s, loss in base.values()]
            cost = costs[(scale, corpus)].get(fam, {})
            counted_savings = [saving(cost[seed], frontier_time(frontier, loss))
                               for seed, (_, loss) in base.items()]
            counted_cell = (fmt([s for s in counted_savings if s is not None], pct=True) + " | "
                            if counted else "")
            points = [(statistics.fmean(v[0] for v in arms[m].values()),
                       statistics.fmean(v[1] for v in arms[m].values())) for m in members
                      if arms[m]]
            # A reference model is paid once per corpus, so every budget of the family carries
            # the same extra steps: its mean over the family's runs.
            extras = [costs[(scale, corpus)][m][seed] - arms[m][seed][0]
                      for m in members for seed in arms[m]]
            extra = statistics.fmean(extras) if extras else 0.0
            tt = steps_to_target(points, target, target_steps, extra) \
                if len(members) > 1 else None
            tt_cell = target_cell(tt)
            if tt is not None and tt["status"] != "no runs":
                tt_cell += "; per seed " + per_seed_cell(
                    [arms[m] for m in members], full["full@1.0"])
                if extra and tt["cost_steps"] is not None:
                    tt_cell += (f"; reference counted {tt['cost_steps']:.0f} "
                                f"({tt['cost_saving']:+.1%})")
                elif extra and tt["cost_saving_below"] is not None:
                    tt_cell += f"; reference counted, saving < {tt['cost_saving_below']:+.1%}"
            diffs = [] if diff is None else [v for v in diff["per_seed"].values() if v is not None]
            better = "" if diff is None else "{}/{}".format(diff["better"], diff["n"])
            losses = ", ".join(f"{v[1]:.4f}" for _, v in sorted(base.items()))
            lines.append(
                f"| {fam} | {len(base)} | {losses} | "
                f"{'control' if diff is None else fmt(diffs)} | {better} | "
                f"{fmt(full_diffs)} | {full_better} | "
                f"{fmt([s for s in savings if s is not None], pct=True)} | {counted_cell}"
                f"{tt_cell} |")
        lines.append("")
    return "\n".join(lines)


def runs_from_ttq(scale: str, out: Path) -> dict[str, dict[str, list]]:
    """The final (steps, loss) of every finished run of one bench_ttq.py --out directory: its
    per-corpus ``<corpus>/ttq.json`` files (``ttq.json`` itself with --data, corpus "data")."""
    files = sorted(out.glob("*/ttq.json")) or ([out / "ttq.json"] if (out / "ttq.json").is_file()
                                               else [])
    if not files:
        raise SystemExit(f"--ttq {scale}={out}: no ttq.json there or in its subdirectories")
    joined: dict[str, dict[str, list]] = {}
    for f in files:
        corpus = "data" if f.parent == out else f.parent.name
        for arm, seeds in json.loads(f.read_text())["runs"].items():
            done = {s: [r["optimizer_steps"], r["final_loss"]] for s, r in seeds.items()
                    if r.get("final_loss") is not None}
            for s, point in done.items():  # a reference model's compute, where it was counted
                cost = seeds[s].get("cost_steps")
                if cost is not None and cost != point[0]:
                    point.append(cost)
            if done:
                joined[f"{scale}|{corpus}|{arm}"] = done
    return joined


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", metavar="FILE[::PATTERN]",
                   help="JSON: '<scale>|<corpus>|<arm>' -> {seed: [steps, loss]}; with ::PATTERN "
                        "only the keys that match it (fnmatch)")
    p.add_argument("--ttq", action="append", default=[], metavar="SCALE=DIR",
                   help="add the finished runs of a bench_ttq.py --out DIR under the label SCALE")
    p.add_argument("--write", default=None, help="also write the joined runs to this JSON file")
    args = p.parse_args(argv)
    joined: dict[str, dict[str, list]] = {}
    sources = []
    for spec in args.runs:
        path, _, pattern = spec.partition("::")
        runs = json.loads(Path(path).read_text())
        if pattern:
            runs = {k: v for k, v in runs.items() if fnmatch.fnmatchcase(k, pattern)}
            if not runs:
                p.error(f"{spec}: no key of {path} matches {pattern!r}")
        sources.append((path, runs))
    for spec in args.ttq:
        scale, sep, where = spec.partition("=")
        if not sep or not scale or "|" in scale:
            p.error(f"--ttq {spec!r}: expected SCALE=DIR (SCALE without '|')")
        sources.append((where, runs_from_ttq(scale, Path(where))))
    for where, runs in sources:
        for key, seeds in runs.items():
            have = joined.setdefault(key, {})
            for seed, point in seeds.items():
                old = have.get(seed)
                if old is not None and list(old[:2]) != list(point[:2]):
                    print(f"protocol_report: {key} seed {seed} is in two inputs; keeping the "
                          f"one from {where} ({point}, not {old})", file=sys.stderr)
                elif old is not None and len(old) > len(point):
                    continue  # the same run; one input also knew its reference cost
                have[seed] = point
    if not joined:
        p.error("nothing to report: give a runs JSON or --ttq SCALE=DIR")
    if args.write:
        Path(args.write).write_text(json.dumps(joined, indent=1, sort_keys=True) + "\n")
    print(report(joined))
    return 0


if __name__ == "__main__":
    sys.exit(main())
