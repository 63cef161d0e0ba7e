"""Time-to-quality of teacher policies against full-data and random baselines, in one invocation.

Every arm is the real pretraining job (``attent_scale.pretrain``), one subprocess per corpus, arm
and seed, with the same model shape, DeepSpeed settings and seeds:

- ``full@F``: plain DeepSpeed (``--no-teacher``) trained for a share F in (0, 1] of the planned
  steps, with a complete learning-rate schedule fitted to that budget (``--budget-fraction F``);
- ``POLICY`` or ``POLICY@X``: a preset (``attent-soft``, ``attent-simple``, ``random``, ...) or a
  policy of :data:`POLICIES`, run for ``round(X * --epochs)`` passes (X = 1 when left out), each
  run with its own complete learning-rate schedule (the job plans it from the passes). Several X
  give the policy a frontier of its own, as the full@F budgets give full data one;
- ``NAME=path/to/section.json`` (or ``NAME@X=...``): a JSON file holding an ``attent`` section,
  or a whole DeepSpeed config whose ``attent`` section is used.

Corpora: ``--data DIR`` (one) or ``--corpora code=DIR1,prose=DIR2,mix=DIR3``; every arm runs at
every seed on every corpus. Each run gets ``--seed S`` (model init and data order) and, for
teacher arms, the section's ``"seed": S``. The plan is seed-major (every arm of every corpus at
the first seed, then the next seed), with full@1.0 and random first within each (seed, corpus):
a plan cut short by ``--deadline`` still holds whole seeds, each with its target and its control.

The compute clock is optimizer steps (a host's speed drifts between runs; steps do not);
training wall-clock (evaluation excluded) is kept beside it. Per corpus, with target = full@1.0's
mean final validation loss (the largest full@F's when full@1.0 is not among the arms):

- ``steps to target`` of a policy: where its frontier, the running minimum of its (mean
  optimizer steps, mean final loss) points over its budgets X, reaches the target (linear
  between points); ``saving to target = 1 - steps_to_target / steps(full@1.0)``. None ("not
  reached") when even its best budget ends above the target. Per seed: the same from that
  seed's runs against that seed's full@1.0 (paired: same init and data order);
- ``saving at final loss`` (in steps): ``1 - steps(arm) / steps the full-data frontier needs for
  the arm's final loss``;
- ``Δ vs random``: the policy's (X = 1) final loss minus the random control's loss at the same
  number of optimizer steps on that seed's random frontier (its random@X runs), paired by seed;
  "better" = negative.

Policies with ``"score": "reducible"`` (RHO-LOSS) need reference scores: the harness first runs
``tools/reference_scores.py`` once per corpus (a small model trained on the validation sequences
that evaluation does not read), passes ``--reference-scores`` to those runs, and reports their
savings "cost-counted": the reference's compute added to their steps (see :func:`reference_cost`).

    python tools/bench_ttq.py --out runs/ttq --corpora code=DIR1,prose=DIR2 --model small \\
        --epochs 3 --micro 16 --seeds 0,1,2 --bf16 --gpus 0,0,0,0 --deadline 420 \\
        --arms full@0.5,full@0.75,full@1.0,random,random@1.34,attent-soft,attent-soft@1.34

Writes, per corpus, ``ttq.json`` (every run's curve and numbers, and everything derived),
``ttq.md`` and ``ttq.png`` (into OUT/<corpus>/, or OUT itself with --data), and over corpora
``summary.md`` / ``summary.json`` in OUT (one row per policy: worst corpus and mean over corpora).
Each run's files, its stdout and stderr in ``log.txt``, stay in ``<corpus dir>/<arm>/seed<S>/``.
With ``--gpus`` runs go side by side, launched ``--start-gap`` seconds apart (a run that hits
streaming's shared-memory race at start is launched again). A failed run stops the benchmark with
its exit code; ``--deadline`` / ``--kill-after`` end a call in time and report what finished;
``--resume`` then reuses every run that finished with the identical config and command (paths
of this machine aside); ``--reanalyze`` only rebuilds the reports. ``--nproc N`` launches each
run on N ranks through ``torchrun``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: python tools/bench_ttq.py

from attent_scale.config import PRESETS, ConfigError, parse_attent  # noqa: E402

Curve = Sequence[tuple[float, float]]  # (training seconds or steps, validation loss), ordered

# Named teacher policies (``attent`` sections without the seed, which each run sets). A key may
# equal a preset's name only as that preset itself; none starts with "full@" or holds "@".
POLICIES: dict[str, dict[str, Any]] = {
    # InfoBatch (ICLR 2024) at the random control's budget plus a final full pass.
    "infobatch": {"preset": "infobatch"},
    # The same policies balanced per source (a mixed corpus: each source keeps its share).
    "mixture-soft": {"preset": "attent-soft", "selection": {"per_source": True}},
    "mixture-infobatch": {"preset": "infobatch", "selection": {"per_source": True}},
    # mixture-soft made milder, softmax(z / 2) (what became the preset attent-mild), or never
    # picking the top 10% within a source (unlearnable outliers). Spelled out from attent-soft
    # so that their meaning stays that of the runs in docs/BENCHMARKS.md §8b.
    "mixture-soft-T2": {"preset": "attent-soft",
                        "selection": {"per_source": True, "temperature": 2.0}},
    "mixture-soft-skip10": {"preset": "attent-soft",
                            "selection": {"per_source": True, "skip_top": 0.1}},
    # Learnability instead of hardness: how much an example's loss dropped since last scored.
    "learn-drop": {"preset": "attent-soft", "score": "drop"},
    # RHO-LOSS: loss minus a reference model's loss (needs reference scores; cost-counted).
    "rho-soft": {"preset": "attent-soft", "score": "reducible"},
    # Other signals under the shipped soft selection and under InfoBatch.
    "soft-fgrad": {"preset": "attent-soft", "signal": "fgrad_norm"},
    "soft-attn": {"preset": "attent-soft", "signal": "attention_fgrad"},
    "infobatch-fgrad": {"preset": "infobatch", "signal": "fgrad_norm"},
    # The paper's signals and the learnability score under the shipped default's selection
    # (mixture-soft-T2, the preset attent-mild), spelled out as mixture-soft-T2 is.
    "mild-fgrad": {"preset": "attent-soft", "signal": "fgrad_norm",
                   "selection": {"per_source": True, "temperature": 2.0}},
    "mild-attn": {"preset": "attent-soft", "signal": "attention_fgrad",
                  "selection": {"per_source": True, "temperature": 2.0}},
    "mild-drop": {"preset": "attent-soft", "score": "drop",
                  "selection": {"per_source": True, "temperature": 2.0}},
    "mild-rho": {"preset": "attent-soft", "score": "reducible",
                 "selection": {"per_source": True, "temperature": 2.0}},
    # Earlier sweeps (docs/BENCHMARKS.md §2 and §2b), kept so their commands still run.
    "soft-log-rescale": {"selection": {"method": "soft", "transform": "log", "temperature": 1.0,
                                       "rescale": True},
                         "ratio": {"value": 0.7}, "interval": {"schedule": "fixed", "every": 1}},
    "soft-log-fgrad-rescale": {"signal": "fgrad_norm",
                               "selection": {"method": "soft", "transform": "log",
                                             "temperature": 1.0, "rescale": True},
                               "ratio": {"value": 0.7},
                               "interval": {"schedule": "fixed", "every": 1}},
    "soft-rescale": {"selection": {"method": "soft", "temperature": 1.0, "rescale": True},
                     "ratio": {"value": 0.7}, "interval": {"schedule": "fixed", "every": 1}},
    "random-70": {"preset": "random", "ratio": {"value": 0.7}},
    "attent-fgrad": {"preset": "attent-simple", "signal": "fgrad_norm"},
    "attent-attn": {"preset": "attent-simple", "signal": "attention_fgrad"},
    "hard-skip5": {"preset": "attent-simple", "selection": {"method": "hard", "skip_top": 0.05}},
    "soft-T0.5": {"preset": "attent-simple", "interval": {"schedule": "fixed", "every": 1},
                  "selection": {"method": "soft", "temperature": 0.5}},
    "pool-every": {"preset": "attent-simple", "source": "pool",
                   "interval": {"schedule": "fixed", "every": 1}},
    "hard-50": {"preset": "attent-simple", "ratio": {"value": 0.5}},
    "random-50": {"preset": "random", "ratio": {"value": 0.5}},
}

DEFAULT_ARMS = "full@0.5,full@0.65,full@0.8,full@1.0,random,attent-soft"
TARGET_ARM = "full@1.0"
CONTROL = "random"       # the budget-matched control every policy is compared with
STEP_TOLERANCE = 0.01    # a policy within 1% of the control's steps counts as the same budget
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Streaming registers a dataset's shared memory without a lock: two jobs of one node opening
# datasets at the same instant can pick the same name, and one fails with this error at start.
_SHM_CLASH = re.compile(r"FileExistsError: \[Errno 17\] File exists: '/?\d{6}_\w+'")
SHM_RETRIES = 2
START_GAP_S = 2.0  # default seconds between two launches of --gpus slots
KILL_GRACE_S = 10.0
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


# --------------------------------------------------------------------------------------------
# arithmetic (pure)

def time_to_target(curve: Curve, target: float) -> Optional[float]:
    """First time at which ``curve`` reaches a loss <= ``target``, or None if it never does.

    ``curve`` is a sequence of (time, loss) points ordered by time. Between the last point above
    the target and the first point at or below it, the time is interpolated linearly in loss; a
    curve that starts at or below the target reaches it at its first point.

    >>> time_to_target([(0, 5.0), (10, 3.0), (20, 2.0)], 4.0)
    5.0
    """
    prev = None
    for t, loss in curve:
        if loss <= target:
            if prev is None:
                return float(t)
            t0, l0 = prev
            return float(t0 + (l0 - target) / (l0 - loss) * (t - t0))
        prev = (t, loss)
    return None


def build_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """A frontier from (mean training time or steps, mean final loss) points of several budgets.

    Points are ordered by time and the loss made non-increasing by a running minimum: a longer
    budget can always stop where a shorter one ended, so it needs no more time for the same loss.
    """
    out: list[tuple[float, float]] = []
    best = math.inf
    for t, loss in sorted(points, key=lambda p: (p[0], p[1])):
        best = min(best, loss)
        out.append((float(t), float(best)))
    return out


def frontier_time(frontier: Sequence[tuple[float, float]], loss: float) -> Optional[float]:
    """Training time the full-data baseline needs to reach ``loss`` on a :func:`build_frontier`.

    Piecewise-linear interpolation between the frontier's points (the earliest time where the
    frontier is flat at that loss). None when ``loss`` is out of range: below the best baseline
    (no budget reached it) or above the worst (the frontier says nothing about shorter budgets).

    >>> frontier_time(build_frontier([(10, 4.0), (20, 3.0)]), 3.5)
    15.0
    """
    if not frontier or loss is None or not math.isfinite(loss):
        return None
    worst, best = frontier[0][1], frontier[-1][1]
    if loss > worst or loss < best:
        return None
    return time_to_target(frontier, loss)


def frontier_loss(frontier: Sequence[tuple[float, float]], steps: float,
                  tolerance: float = STEP_TOLERANCE) -> Optional[float]:
    """The loss a :func:`build_frontier` reaches at ``steps`` (linear between its points).

    Within ``tolerance`` (relative) of its first or last point the loss is that point's: the
    same budget up to the rounding of steps per pass. Further outside its range: None (a
    frontier does not extrapolate).

    >>> frontier_loss([(100, 4.0), (200, 3.0)], 150)
    3.5
    """
    if not frontier or steps is None:
        return None
    (lo, lo_loss), (hi, hi_loss) = frontier[0], frontier[-1]
    if steps < lo:
        return lo_loss if steps >= lo * (1 - tolerance) else None
    if steps > hi:
        return hi_loss if steps <= hi * (1 + tolerance) else None
    for (t0, l0), (t1, l1) in zip(frontier, frontier[1:]):
        if t0 <= steps <= t1:
            return l0 if t1 == t0 else float(l0 + (steps - t0) / (t1 - t0) * (l1 - l0))
    return float(lo_loss)  # a single point, hit exactly


def saving(arm_time: Optional[float], baseline_time: Optional[float]) -> Optional[float]:
    """``1 - arm_time / baseline_time``: positive when the arm needs less time; None if either
    time is missing or the baseline time is not positive."""
    if arm_time is None or baseline_time is None or baseline_time <= 0:
        return None
    return 1.0 - arm_time / baseline_time


def spread(values: Sequence[Optional[float]]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max of the values that are not None.

    ``n`` counts those values and ``missing`` the None ones (e.g. seeds that never reached the
    target); ``std`` is None below two values, and every statistic is None without any value.
    """
    vals = [float(v) for v in values if v is not None]
    out: dict[str, Any] = {"n": len(vals), "missing": len(values) - len(vals),
                           "mean": None, "std": None, "min": None, "max": None}
    if vals:
        out.update(mean=statistics.fmean(vals), min=min(vals), max=max(vals))
    if len(vals) >= 2:
        out["std"] = statistics.stdev(vals)
    return out


def seed_mean_curve(curves: Sequence[Sequence[tuple[float, float, int]]]
                    ) -> list[tuple[float, float]]:
    """Mean (time, loss) over seeds at each step that every seed evaluated.

    Each curve holds (time, loss, step) points; the result is ordered by step.
    """
    if not curves:
        return []
    by_step = [{step: (t, loss) for t, loss, step in c} for c in curves]
    common = sorted(set.intersection(*(set(b) for b in by_step)))
    return [(statistics.fmean(b[s][0] for b in by_step),
             statistics.fmean(b[s][1] for b in by_step)) for s in common]


def steps_to_target(points: Sequence[tuple[float, float]], target: Optional[float],
                    target_steps: Optional[float], extra_steps: float = 0.0) -> dict[str, Any]:
    """Where one policy's frontier reaches ``target``, from its (steps, final loss) points.

    ``status``:
    - ``reached``: ``steps`` interpolated on the frontier (linear between budgets);
    - ``reached by the smallest budget``: already the policy's shortest run ended at or below the
      target, so ``steps`` (that run's) is an upper bound and ``saving`` a lower bound
      (``bound`` = True); a smaller X would tell how much lower;
    - ``not reached``: its best budget ends above the target (``best_loss`` at ``best_steps``);
      it needs more steps than its longest budget ran, so ``saving_below`` (``cost_saving_below``
      with ``extra_steps``) bounds its saving from above: a measured "below +1%", not a gap;
    - ``no runs``: no point, or no target.

    ``saving = 1 - steps / target_steps``; ``cost_saving`` the same with ``cost_steps = steps +
    extra_steps``, a cost paid outside the runs (a reference model).
    """
    out: dict[str, Any] = {"status": "no runs", "steps": None, "cost_steps": None,
                           "saving": None, "cost_saving": None, "bound": False,
                           "best_loss": None, "best_steps": None, "frontier": [],
                           "saving_below": None, "cost_saving_below": None}
    if not points or target is None:
        return out
    front = build_frontier(points)
    best_loss = front[-1][1]
    best_steps = next(t for t, loss in front if loss == best_loss)  # the earliest at that loss
    out.update(frontier=[list(p) for p in front], best_loss=best_loss, best_steps=best_steps)
    if target < best_loss:
        longest = front[-1][0]
        out.update(status="not reached", saving_below=saving(longest, target_steps),
                   cost_saving_below=saving(longest + extra_steps, target_steps))
        return out
    if target > front[0][1]:
        out.update(status="reached by the smallest budget", steps=front[0][0], bound=True)
    else:
        out.update(status="reached", steps=time_to_target(front, target))
    out["cost_steps"] = out["steps"] + extra_steps
    out["saving"] = saving(out["steps"], target_steps)
    out["cost_saving"] = saving(out["cost_steps"], target_steps)
    return out


def per_seed_to_target(seeds: Sequence[int],
                       budgets: Sequence[dict[int, tuple[float, float]]],
                       target_runs: dict[int, tuple[float, float]],
                       extra_steps: float = 0.0) -> dict[int, dict[str, Any]]:
    """``steps_to_target`` seed by seed: each seed's (steps, loss) at every budget against that
    seed's own target run (steps, loss); a seed without a target run gets ``no runs``."""
    out = {}
    for seed in seeds:
        run = target_runs.get(seed)
        out[seed] = steps_to_target([b[seed] for b in budgets if seed in b],
                                    run and run[1], run and run[0], extra_steps)
    return out


def paired_difference(policy: dict[int, tuple[float, float]],
                      control: dict[int, Sequence[tuple[float, float]]],
                      extra_steps: float = 0.0) -> dict[str, Any]:
    """Per seed: the policy's final loss minus the control's loss at the policy's steps.

    ``policy[seed] = (steps, final loss)``; ``control[seed]`` = that seed's (steps, final loss)
    points of the control's budgets, read on their frontier (:func:`frontier_loss`) at the
    policy's steps plus ``extra_steps``. A seed whose control does not cover those steps counts
    as missing (``uncovered`` lists them with the steps needed). ``better`` counts seeds with a
    negative difference (the policy ended lower).
    """
    per_seed: dict[int, Optional[float]] = {}
    uncovered: dict[int, float] = {}
    for seed, (steps, loss) in sorted(policy.items()):
        at = steps + extra_steps
        ref = frontier_loss(build_frontier(control.get(seed, [])), at)
        per_seed[seed] = None if ref is None else loss - ref
        if ref is None:
            uncovered[seed] = at
    vals = [v for v in per_seed.values() if v is not None]
    return {"per_seed": per_seed, "diff": spread(list(per_seed.values())),
            "better": sum(v < 0 for v in vals), "n": len(vals), "uncovered": uncovered}


def scaled_epochs(scale: float, epochs: int) -> int:
    """Passes of ``POLICY@scale`` when the benchmark plans ``epochs``: round half up, so that
    X = 1.25 of 2 passes is 3 (Python's round would give 2)."""
    return int(math.floor(round(scale * epochs, 9) + 0.5))


def shape_params(shape: str, vocab_size: int) -> dict[str, int]:
    """Parameter counts of a named Llama shape (:data:`attent_scale.model.MODEL_SHAPES`).

    ``compute`` leaves out the input embedding, which is a table lookup: what a token costs is
    about 6 x ``compute`` FLOPs to train and 2 x ``compute`` to score (a forward).
    """
    from attent_scale.model import MODEL_SHAPES
    hidden, layers, heads, kv, inter = MODEL_SHAPES[shape]
    kv_dim = kv * hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter + 2 * hidden
    body = layers * per_layer + hidden  # blocks and the final norm
    embed = vocab_size * hidden
    return {"total": embed + body + vocab_size * hidden, "compute": body + vocab_size * hidden}


def reference_cost(ref: dict, main_compute_params: int, tokens_per_step: int) -> dict[str, Any]:
    """A reference model's cost in optimizer steps of the benchmarked job.

    ``ref`` is reference.json (tools/reference_scores.py). FLOP-equivalent steps (the cost that
    gets counted): (6 N_ref x trained tokens + 2 N_ref x scored tokens) / (6 N_main x tokens
    per step), N = parameters without the input embedding. Token-equivalent steps (every
    reference token, trained or scored, as one of the job's tokens) are stated beside them.
    """
    n_ref = ref["params"]["compute"]
    train_tokens, score_tokens = ref["train"]["tokens"], ref["score"]["tokens"]
    flops = 6 * n_ref * train_tokens + 2 * n_ref * score_tokens
    return {"steps": flops / (6 * main_compute_params * tokens_per_step),
            "token_steps": (train_tokens + score_tokens) / tokens_per_step,
            "flops": flops, "seconds": ref["train"]["seconds"] + ref["score"]["seconds"],
            "reference_model": ref.get("model"), "holdout": ref.get("holdout")}


def combine(per_corpus: dict[str, Optional[float]], higher_is_better: bool = True
            ) -> dict[str, Any]:
    """Worst corpus and mean over corpora of one measure (None values: no result there).

    ``mean`` is None unless every corpus has a value: a mean over the corpora that happen to have
    one would hide the one that failed. ``missing`` names the corpora without a value.
    """
    have = {c: v for c, v in per_corpus.items() if v is not None}
    out: dict[str, Any] = {"per_corpus": dict(per_corpus), "worst": None, "worst_corpus": None,
                           "mean": None, "missing": [c for c in per_corpus if c not in have]}
    if have:
        pick = min if higher_is_better else max
        out["worst_corpus"] = pick(have, key=lambda c: have[c])
        out["worst"] = have[out["worst_corpus"]]
        if not out["missing"]:
            out["mean"] = statistics.fmean(have.values())
    return out


def summarize(results: dict[str, dict], families: Sequence[str]) -> dict[str, Any]:
    """One row per policy over corpora, from each corpus's :func:`analyze` result.

    Per corpus, (a) ``saving_at_final``: the mean over seeds of the policy's (X = 1) step saving
    at its final loss, cost-counted; (b) ``saving_to_target``: its frontier's steps-to-target
    saving, cost-counted (a corpus where it is not reached is the worst one); (c) ``vs_random``:
    the mean paired difference of final loss against random, and seeds better out of seeds
    compared, summed over corpora. ``beats_random``: on every corpus a negative mean difference
    on a majority of its seeds.
    """
    rows: dict[str, Any] = {}
    for fam in families:
        pols = {c: r["policies"].get(fam) for c, r in results.items()}
        if not any(pols.values()):
            continue
        a = combine({c: p and p["cost_saving_at_final"]["mean"] for c, p in pols.items()})
        b = combine({c: p and p["to_target"]["cost_saving"] for c, p in pols.items()})
        b["status"] = {c: p["to_target"]["status"] if p else "no runs" for c, p in pols.items()}
        b["bound"] = {c: bool(p and p["to_target"]["bound"]) for c, p in pols.items()}
        b["below"] = {c: p["to_target"]["cost_saving_below"] for c, p in pols.items()
                      if p and p["to_target"]["status"] == "not reached"}
        not_reached = [c for c, s in b["status"].items() if s == "not reached"]
        if not_reached:  # never reaching the target is worse than any saving
            b.update(worst=None, worst_corpus=not_reached[0], mean=None)
        row = {"corpora": [c for c, p in pols.items() if p], "saving_at_final": a,
               "saving_to_target": b, "not_reached": not_reached,
               "reference": any(p and p.get("reference") for p in pols.values())}
        vs = {c: p and p.get("vs_random") for c, p in pols.items()}
        if fam != CONTROL and any(vs.values()):
            c_ = combine({c: v and v["diff"]["mean"] for c, v in vs.items()},
                         higher_is_better=False)
            c_["better"] = sum(v["better"] for v in vs.values() if v)
            c_["n"] = sum(v["n"] for v in vs.values() if v)
            losing = [c for c, v in vs.items()
                      if not v or v["diff"]["mean"] is None or v["diff"]["mean"] >= 0
                      or 2 * v["better"] <= v["n"]]
            c_["beats_random"] = not losing
            c_["losing_corpora"] = losing
            row["vs_random"] = c_
        rows[fam] = row
    return rows


# --------------------------------------------------------------------------------------------
# arms and corpora

class ArmError(ValueError):
    """An arm, corpus or seed list that cannot be run."""


@dataclass
class Arm:
    name: str
    budget: Optional[float] = None             # full@F baselines: F
    section: Optional[dict[str, Any]] = None   # teacher arms: the attent section (seed set per run)
    source: str = ""                           # where the section came from
    family: str = ""                           # full, or the policy / preset / NAME it runs
    scale: float = 1.0                         # POLICY@X: X (passes = round(X * --epochs))
    parsed: Any = None                         # the validated section (parse_arms)

    def __post_init__(self):
        if not self.family:
            self.family = "full" if self.budget is not None else self.name

    @property
    def baseline(self) -> bool:
        return self.budget is not None

    @property
    def needs_reference(self) -> bool:
        """RHO-LOSS arms: selection ranks the loss minus a reference model's loss."""
        if self.section is None:
            return False
        return (self.section.get("score") == "reducible"
                or getattr(self.parsed, "score", None) == "reducible")

    def passes(self, epochs: int) -> int:
        return epochs if self.baseline else scaled_epochs(self.scale, epochs)

    def attent(self, seed: int) -> Optional[dict[str, Any]]:
        return None if self.section is None else {**self.section, "seed": seed}


def allowed_arms() -> str:
    names = sorted(set(PRESETS) | set(POLICIES))
    return ("full@F with F in (0, 1] (e.g. full@0.5, full@0.65, full@0.8, full@1.0); a preset or "
            f"policy, alone or as POLICY@X with X > 0 (round(X x --epochs) passes): "
            f"{', '.join(names)}; or NAME=path/to/section.json (NAME@X=... too)")


def _scale(spec: str, text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise ArmError(f"arm {spec!r}: X in POLICY@X must be a number > 0 (the arm runs "
                       f"round(X x --epochs) passes), e.g. random@1.4; got {text!r}")
    return x


def _arm_name(family: str, scale: float) -> str:
    return family if scale == 1.0 else f"{family}@{scale:g}"


def parse_arm(spec: str) -> Arm:
    """One arm from its command-line name (see :func:`allowed_arms`)."""
    spec = spec.strip()
    if spec.startswith("full@"):
        try:
            frac = float(spec[len("full@"):])
        except ValueError:
            frac = math.nan
        if not 0.0 < frac <= 1.0:
            raise ArmError(f"arm {spec!r}: the budget must be a number in (0, 1]; allowed: "
                           f"{allowed_arms()}")
        return Arm(spec, budget=frac, source="--no-teacher --budget-fraction")
    if "=" in spec:
        left, path = (s.strip() for s in spec.split("=", 1))
        name, _, x = left.partition("@")
        scale = _scale(spec, x) if x else 1.0
        if (not _NAME.match(name) or name in PRESETS or name in POLICIES
                or name.startswith("full") or name == "reference"):
            raise ArmError(f"arm {spec!r}: NAME must be letters, digits and ._+- and not a preset, "
                           f"a policy, full@F or 'reference' (it names the arm's directory)")
        file = Path(path).expanduser()
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ArmError(f"arm {name}: cannot read an attent section from {file}: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("attent"), dict):
            data = data["attent"]  # a whole DeepSpeed config: use its section
        if not isinstance(data, dict):
            raise ArmError(f"arm {name}: {file} must hold a JSON object (an attent section)")
        return Arm(_arm_name(name, scale), section=data, source=str(file.resolve()),
                   family=name, scale=scale)
    family, _, x = spec.partition("@")
    scale = _scale(spec, x) if "@" in spec else 1.0
    if family in POLICIES:
        section, source = json.loads(json.dumps(POLICIES[family])), "POLICIES"
    elif family in PRESETS:
        section, source = {"preset": family}, "preset"
    else:
        raise ArmError(f"unknown arm {spec!r}; allowed: {allowed_arms()}")
    return Arm(_arm_name(family, scale), section=section, source=source, family=family,
               scale=scale)


def parse_arms(text: str, epochs: Optional[int] = None) -> list[Arm]:
    """Comma-separated arms, each validated (teacher sections through the config model).

    With ``epochs``, also refuses a POLICY@X of no pass and two arms of one policy that would
    run the same number of passes (the same run twice under two names).
    """
    arms = [parse_arm(s) for s in text.split(",") if s.strip()]
    if not arms:
        raise ArmError(f"no arms given; allowed: {allowed_arms()}")
    seen: dict[str, Arm] = {}
    for arm in arms:
        if arm.name in seen:
            raise ArmError(f"arm {arm.name!r} is listed twice")
        seen[arm.name] = arm
        if arm.section is not None:
            # The real config model decides: a key it does not know stops the arm here, before
            # any run, with the key named (the job would refuse the same section).
            try:
                arm.parsed = parse_attent(arm.attent(0))
            except ConfigError as exc:
                raise ArmError(f"arm {arm.name}: {exc}") from exc
    if epochs is not None:
        by_passes: dict[tuple[str, int], Arm] = {}
        for arm in arms:
            if arm.baseline:
                continue
            n = arm.passes(epochs)
            if n < 1:
                raise ArmError(f"arm {arm.name}: round({arm.scale:g} x --epochs {epochs}) = {n} "
                               f"passes; allowed: X >= {0.5 / epochs:.3g} so that it runs at "
                               "least one pass")
            twin = by_passes.get((arm.family, n))
            if twin is not None:
                raise ArmError(f"arms {twin.name} and {arm.name} both run {n} passes at --epochs "
                               f"{epochs} (round(X x {epochs})); choose values of X at least "
                               f"{1 / epochs:.3g} apart or raise --epochs")
            by_passes[(arm.family, n)] = arm
    return arms


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ArmError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ArmError(f"--seeds must list distinct integers, got {text!r}")
    return seeds


@dataclass
class Corpus:
    """A prepared corpus and where its runs and reports go (``flat``: OUT itself, for --data)."""
    name: str
    path: Path
    out: Path
    flat: bool = False

    def meta(self) -> Optional[dict]:
        try:
            return json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            return None


def parse_corpora(text: str, out: Path) -> list[Corpus]:
    """``NAME=DIR,NAME=DIR``: prepared corpora (each must hold meta.json), distinct names/dirs."""
    corpora: list[Corpus] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, path = (s.strip() for s in item.partition("="))
        if not sep or not _NAME.match(name) or not path:
            raise ArmError(f"--corpora: got {item!r}; allowed: NAME=DIR items separated by "
                           "commas, NAME of letters, digits and ._+- (it names OUT/NAME), e.g. "
                           "code=corpora/code,prose=corpora/prose")
        root = Path(path).expanduser().resolve()
        if not (root / "meta.json").is_file():
            raise ArmError(f"--corpora {name}={path}: no prepared corpus there (no meta.json); "
                           "prepare it first (attent-prepare --out DIR ...) or fix the path")
        corpora.append(Corpus(name, root, out / name))
    if not corpora:
        raise ArmError("--corpora: no corpus given; allowed: NAME=DIR[,NAME=DIR...]")
    for what, key in (("name", lambda c: c.name), ("directory", lambda c: c.path)):
        keys = [key(c) for c in corpora]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise ArmError(f"--corpora: the {what} {dup} is listed twice; give each corpus once")
    return corpora


def plan_order(corpora: Sequence[Corpus], arms: Sequence[Arm], seeds: Sequence[int]
               ) -> list[tuple[int, Corpus, Arm]]:
    """(seed, corpus, arm) in run order: seed-major over corpora, and within each (seed, corpus)
    the target full@1.0 and the control random first, then the arms as given. A plan cut short
    keeps whole seeds, each with what every comparison needs."""
    first = [a for a in arms if a.name == TARGET_ARM] + [a for a in arms if a.name == CONTROL]
    ordered = first + [a for a in arms if a not in first]
    return [(s, c, a) for s in seeds for c in corpora for a in ordered]


# --------------------------------------------------------------------------------------------
# one run

def ds_config(args: argparse.Namespace, attent: Optional[dict]) -> dict:
    """The DeepSpeed config shared by every arm; only the ``attent`` section differs."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.95],
                                                  "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR",
                      "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                 "warmup_type": "linear", "cos_min_ratio": 0.1}},
        "zero_optimization": {"stage": args.zero},
    }
    if args.bf16:
        # No per-parameter overflow scan: bf16 needs no loss scaling (configs/zero*.json).
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": False}
    # DeepSpeed's throughput timer synchronises the device twice a step.
    cfg["timers"] = {"throughput": {"enabled": False}}
    if attent is not None:
        cfg["attent"] = attent
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> str:
    # The launcher installed with this interpreter's torch (a bare PATH lookup could find another).
    here = Path(sys.executable).with_name("torchrun")
    found = str(here) if here.exists() else shutil.which("torchrun")
    if not found:
        raise SystemExit("--nproc > 1 needs torch's torchrun launcher, which was not found next "
                         f"to {sys.executable} or on PATH")
    return found


def reference_dir(corpus: Corpus) -> Path:
    return corpus.out / "reference"


def run_command(args: argparse.Namespace, corpus: Corpus, arm: Arm, seed: int, run_dir: Path
                ) -> list[str]:
    # Runs side by side (--gpus) must not share streaming's shared memory: each reads the corpus
    # through its own path (a link made by Run.execute) and leaves the others' segments alone.
    data = run_dir / "data" if args.gpu_slots else corpus.path
    cmd = ["--deepspeed_config", str(run_dir / "ds_config.json"), "--out", str(run_dir),
           "--data", str(data), "--model", args.model, "--epochs", str(arm.passes(args.epochs)),
           "--seed", str(seed), "--eval-every", str(args.eval_every),
           "--eval-samples", str(args.eval_samples), "--no-resume",
           "--loss-kernel", args.loss_kernel]
    for flag in ("seq_len", "vocab_size", "max_bytes"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if arm.baseline:
        cmd += ["--no-teacher", "--budget-fraction", repr(arm.budget)]
    if arm.needs_reference:
        cmd += ["--reference-scores", str(reference_dir(corpus) / "reference.npy")]
    if not args.run_plots:
        cmd.append("--no-plot")
    if args.gpu_slots:
        cmd.append("--no-shm-clean")
    if args.nproc > 1:
        return [_torchrun(), "--nproc_per_node", str(args.nproc), "--master_port", "{port}",
                "-m", "attent_scale.pretrain", *cmd]
    return [sys.executable, "-m", "attent_scale.pretrain", *cmd]


def reference_command(args: argparse.Namespace, corpus: Corpus) -> list[str]:
    """tools/reference_scores.py for one corpus: trained on the validation sequences that
    evaluation does not read (--holdout-skip = --eval-samples), unless --reference-holdout all."""
    cmd = [sys.executable, str(ROOT / "tools" / "reference_scores.py"), "--data",
           str(corpus.path), "--out", str(reference_dir(corpus)),
           "--model", args.reference_model or args.model,
           "--epochs", str(args.reference_epochs), "--micro", str(args.micro),
           "--lr", str(args.lr), "--seed", str(args.reference_seed)]
    if args.reference_holdout == "all":
        cmd += ["--holdout-skip", "0"]
    else:
        cmd += ["--holdout-skip", str(args.eval_samples)]
    if args.bf16:
        cmd.append("--bf16")
    return cmd


def _num(value: Any) -> Optional[float]:
    """A summary value as a float ("12.3" -> 12.3); None for text such as "n/a (CPU)"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).replace(",", ""))
    except ValueError:
        return None


def load_run(metrics: Path) -> dict[str, Any]:
    """A finished run's numbers from its metrics.jsonl.

    ``curve``: [training seconds, validation loss, step, tokens] per evaluation, where training
    seconds = the record's time minus the evaluation time spent so far. ``train_time`` and
    ``final_loss`` are the last evaluation's (the job always evaluates after its last step).
    """
    from attent_scale.report import read_metrics
    records = read_metrics(metrics)
    summary = next((r for r in records if r.get("type") == "summary"), None)
    evals = [r for r in records if r.get("type") == "eval"]
    if summary is None or not evals:
        raise RuntimeError(f"{metrics}: no summary or evaluation record; the run did not finish")
    curve = [[r["time"] - r.get("eval_time", 0.0), r["val_loss"], r["step"], r.get("tokens")]
             for r in evals]
    curve.sort(key=lambda p: p[0])
    return {
        "curve": curve,
        "train_time": curve[-1][0],
        "final_loss": evals[-1]["val_loss"],
        "wall_time": _num(summary.get("wall_time_(s)")),
        "eval_time": evals[-1].get("eval_time"),
        "teacher_time": _num(summary.get("teacher_time_(s)")),
        "optimizer_steps": summary.get("optimizer_steps"),
        "tokens_trained": summary.get("tokens_trained"),
        "examples_trained": summary.get("examples_trained"),
        "examples_skipped": summary.get("examples_skipped_by_the_teacher"),
        "training_tokens_per_s": _num(summary.get("training_tokens/s")),
        "peak_memory_gib": _num(summary.get("peak_GPU_memory_(GiB)")),
        "teacher": summary.get("teacher"),
    }


@dataclass(eq=False)
class Run:
    """One arm at one seed on one corpus: its directory, DeepSpeed config and command."""
    arm: Arm
    seed: int
    dir: Path
    config: Optional[dict]
    command: list[str]
    data_link: Optional[Path] = None  # with --gpus: the corpus the run reads through DIR/data
    corpus: str = ""                  # the corpus's name ("" alone: no prefix in messages)
    needs: tuple = ()                 # keys of runs that must finish first (its reference)
    places: dict = field(default_factory=dict)  # machine paths -> names, for a portable spec
    corpus_id: Optional[str] = None   # the corpus's fingerprint: another corpus, another run
    killed: bool = False              # stopped at --kill-after

    @property
    def key(self) -> tuple:
        return (self.corpus, self.arm.name, self.seed)

    @property
    def label(self) -> str:
        where = f"{self.corpus}/" if self.corpus else ""
        return f"{where}{self.arm.name} seed {self.seed}"

    @property
    def log(self) -> Path:
        return self.dir / "log.txt"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def spec(self) -> dict:
        """What must match for --resume to reuse a finished run: the config, the command with
        this machine's paths replaced by names (a device call's output directory, the corpus's
        place and the interpreter differ between calls; the corpus fingerprint stands for the
        corpus), and whether it ran beside others changes neither steps nor losses."""
        return {"config": self.config, "command": portable_command(self.command, self.places),
                "corpus": self.corpus_id}

    def load(self) -> dict:
        return load_run(self.metrics)

    def finished(self) -> bool:
        """True when the directory holds a complete run of exactly this config and command."""
        try:
            same = json.loads((self.dir / "run.json").read_text()) == self.spec
            return same and self.load() is not None
        except (OSError, ValueError, RuntimeError):
            return False

    def execute(self, gpu: Optional[str] = None, spacer: Optional["LaunchSpacer"] = None,
                kill_at: Optional[float] = None) -> int:
        """Run the job (stdout and stderr into log.txt); returns its exit code.

        ``gpu``: the CUDA device(s) the run may see (CUDA_VISIBLE_DEVICES), for ``--gpus``.
        ``spacer``: spaces the launches of runs side by side (see :class:`LaunchSpacer`).
        ``kill_at``: a time.monotonic() value at which a run still going is terminated
        (``killed`` set; its directory then holds no run.json, so --resume runs it again)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.metrics, self.dir / "run.json"):  # the job appends to metrics.jsonl
            stale.unlink(missing_ok=True)
        if self.config is not None:
            (self.dir / "ds_config.json").write_text(json.dumps(self.config, indent=1) + "\n")
        if self.data_link is not None and not (self.dir / "data").exists():
            (self.dir / "data").symlink_to(self.data_link, target_is_directory=True)
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                          os.environ.get("PYTHONPATH")]))
        launch = [str(_free_port()) if c == "{port}" else c for c in self.command]
        with open(self.log, "w") as fh:
            fh.write("$ " + " ".join(launch) + "\n")
            fh.flush()
            if spacer is not None:
                spacer.wait()
            proc = subprocess.Popen(launch, stdout=fh, stderr=subprocess.STDOUT, env=env)
            rc = self._wait(proc, kill_at)
        if rc == 0 and not self.killed:
            (self.dir / "run.json").write_text(json.dumps(self.spec, indent=1) + "\n")
        return rc

    def shm_clash(self) -> bool:
        """The run failed at start on streaming's shared-memory race (safe to launch again)."""
        try:
            return bool(_SHM_CLASH.search(self.log.read_text(errors="replace")))
        except OSError:
            return False

    def _wait(self, proc: subprocess.Popen, kill_at: Optional[float]) -> int:
        while True:
            timeout = None if kill_at is None else max(0.0, kill_at - time.monotonic())
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            # SIGTERM first: torchrun forwards it to its ranks; SIGKILL if it does not end.
            self.killed = True
            proc.terminate()
            try:
                return proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()


@dataclass(eq=False)
class ReferenceRun(Run):
    """tools/reference_scores.py for one corpus; finished when reference.json matches."""

    @property
    def key(self) -> tuple:
        return (self.corpus, "reference", None)

    @property
    def label(self) -> str:
        return f"{self.corpus + '/' if self.corpus else ''}reference scores"

    @property
    def metrics(self) -> Path:
        return self.dir / "reference.json"

    def load(self) -> dict:
        data = json.loads(self.metrics.read_text())
        if not (self.dir / "reference.npy").is_file():
            raise RuntimeError(f"{self.dir}: reference.npy is missing")
        return data


def portable_command(command: Sequence[str], places: dict[str, str]) -> list[str]:
    """``command`` with each path of ``places`` replaced by its name (longest first), the
    per-run corpus link (--gpus) read as the corpus itself, and --no-shm-clean left out."""
    out = []
    for arg in command:
        if arg == "--no-shm-clean":
            continue
        for path in sorted(places, key=len, reverse=True):
            arg = arg.replace(path, places[path])
        out.append(arg.replace("{run}/data", "{data}"))
    return out


def _places(corpus: Corpus, run_dir: Path) -> dict[str, str]:
    return {str(run_dir): "{run}", str(corpus.path): "{data}",
            str(reference_dir(corpus)): "{reference}", sys.executable: "{python}",
            str(Path(sys.executable).parent): "{bin}", str(ROOT): "{repo}"}


def _fingerprint(corpus: Corpus) -> Optional[str]:
    meta = corpus.meta()
    return None if meta is None else meta.get("fingerprint")


def make_run(args: argparse.Namespace, corpus: Corpus, arm: Arm, seed: int) -> Run:
    run_dir = corpus.out / arm.name / f"seed{seed}"
    needs = ((corpus.name if not corpus.flat else "", "reference", None),) \
        if arm.needs_reference else ()
    return Run(arm, seed, run_dir, ds_config(args, arm.attent(seed)),
               run_command(args, corpus, arm, seed, run_dir),
               corpus.path if args.gpu_slots else None,
               corpus="" if corpus.flat else corpus.name, needs=needs,
               places=_places(corpus, run_dir), corpus_id=_fingerprint(corpus))


def make_reference(args: argparse.Namespace, corpus: Corpus) -> ReferenceRun:
    ref_arm = Arm("reference", source="tools/reference_scores.py", family="reference")
    ref_dir = reference_dir(corpus)
    return ReferenceRun(ref_arm, 0, ref_dir, None, reference_command(args, corpus),
                        corpus="" if corpus.flat else corpus.name,
                        places=_places(corpus, ref_dir), corpus_id=_fingerprint(corpus))


# --------------------------------------------------------------------------------------------
# running the plan

class LaunchSpacer:
    """At least ``gap`` seconds between two launches of runs side by side.

    Starting runs together makes their streaming datasets more likely to register shared memory
    at the same instant (a loud FileExistsError, after which the run is launched again, see
    :func:`execute_plan`). A gap of a few seconds spreads the moments the jobs open their data,
    while the jobs' start-up (imports, DeepSpeed, model: tens of seconds) still overlaps.
    """

    def __init__(self, gap: float):
        self.gap = gap
        self._lock = threading.Lock()
        self._last = -math.inf

    def wait(self) -> None:
        with self._lock:
            delay = self._last + self.gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._last = time.monotonic()


@dataclass
class Limits:
    """When a call must end: ``deadline`` seconds after ``start`` no run starts any more;
    ``kill_after`` seconds after it the runs still going are terminated."""
    start: float
    deadline: Optional[float] = None
    kill_after: Optional[float] = None

    def no_new_runs(self, now: float) -> bool:
        return self.deadline is not None and now - self.start >= self.deadline

    @property
    def kill_at(self) -> Optional[float]:
        return None if self.kill_after is None else self.start + self.kill_after


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class Outcome:
    rc: int = 0
    missing: list[dict] = field(default_factory=list)  # {"run": label, "key": ..., "why": ...}
    done: set = field(default_factory=set)              # keys of finished runs


def execute_plan(plan: Sequence[Run], on_done: Callable[[Run], str], resume: bool,
                 gpu_slots: Optional[Sequence[str]] = None, limits: Optional[Limits] = None,
                 outcome: Optional[Outcome] = None, start_gap: float = START_GAP_S,
                 keep_going: bool = False) -> Outcome:
    """Run (or, with ``resume``, reuse) the runs of the plan in order; ``on_done(run)`` loads a
    finished run and returns the words for its progress line.

    Without ``gpu_slots`` runs go one after another. With slots, each slot (a CUDA device list)
    takes the next runnable run in plan order as soon as it is free, so several runs share the
    machine; their wall-clock times then include that sharing, while steps and losses do not
    depend on it. Launches are ``start_gap`` seconds apart, and a run that failed on
    streaming's shared-memory race at start is launched again (up to SHM_RETRIES times). A run
    whose ``needs`` (its reference scores) have not finished waits while they run and is left
    out when they cannot finish.

    ``limits``: after its deadline no run starts; at its kill time running runs are terminated;
    a run whose earlier seeds took longer than the time left before the kill is not started.
    Every run not finished is listed in ``outcome.missing`` with the reason. The first failed
    run's exit code ends up in ``outcome.rc`` and no new run starts after a failure, unless
    ``keep_going``: then a failed run is listed as missing and the others go on.
    """
    out = outcome or Outcome()
    limits = limits or Limits(time.monotonic())
    cond = threading.Condition()
    spacer = LaunchSpacer(start_gap) if gpu_slots else None
    total = len(plan)
    queue: list[tuple[int, Run]] = []
    lost: set = set()
    durations: dict[tuple, list[float]] = {}
    state = {"running": 0, "executed": 0, "first": None}

    def miss(run: Run, why: str) -> None:
        out.missing.append({"run": run.label, "key": list(run.key), "why": why})
        lost.add(run.key)

    for i, run in enumerate(plan, 1):  # reuse first: a resumed call spends no time on them
        if resume and run.finished():
            print(f"[ttq {i}/{total}] {run.label}: reused (--resume); {on_done(run)}", flush=True)
            out.done.add(run.key)
        else:
            queue.append((i, run))

    def estimate(run: Run) -> Optional[float]:
        for key in ((run.corpus, run.arm.name), (run.arm.name,)):
            if durations.get(key):
                return max(durations[key])
        return None

    def take() -> Optional[tuple[int, Run]]:
        """The next runnable run (lock held), or None when this worker should stop."""
        while True:
            if out.rc and not keep_going:
                return None
            now = time.monotonic()
            if limits.no_new_runs(now):
                for _, run in queue:
                    miss(run, f"not started: --deadline {limits.deadline:g} s passed")
                queue.clear()
                cond.notify_all()
                return None
            for k, (i, run) in enumerate(queue):
                if any(d in lost for d in run.needs):
                    queue.pop(k)
                    miss(run, "not started: its reference scores did not finish")
                    break
                if any(d not in out.done for d in run.needs):
                    continue  # its reference is still running: try the next run
                queue.pop(k)
                est = estimate(run)
                if limits.kill_at is not None and est is not None and now + est > limits.kill_at:
                    miss(run, f"not started: its arm took {est:.0f} s, only "
                              f"{limits.kill_at - now:.0f} s were left before --kill-after")
                    break
                state["running"] += 1
                if state["first"] is None:
                    state["first"] = now
                return i, run
            else:
                if not queue:
                    return None
                cond.wait(timeout=1.0)  # every queued run waits for a running reference

    def progress() -> str:
        now = time.monotonic()
        waiting = len(queue)
        text = (f"{state['executed']} run, {state['running']} running, {waiting} waiting; "
                f"{_clock(now - limits.start)} elapsed")
        if state["executed"] and state["first"] is not None:
            rate = state["executed"] / max(now - state["first"], 1e-9)
            text += f", ETA {_clock((waiting + state['running']) / rate)}"
        if limits.deadline is not None:
            text += f", deadline in {_clock(limits.start + limits.deadline - now)}"
        return text

    def worker(gpu: Optional[str]) -> None:
        while True:
            with cond:
                got = take()
            if got is None:
                return
            i, run = got
            tag = f"[ttq {i}/{total}] {run.label}"
            where = "" if gpu is None else f" on CUDA device(s) {gpu}"
            with cond:
                print(f"{tag}: running{where}, log {run.log}", flush=True)
            start = time.monotonic()
            for attempt in range(SHM_RETRIES + 1):
                rc = run.execute(gpu, spacer, limits.kill_at)
                if rc == 0 or run.killed or attempt == SHM_RETRIES or not run.shm_clash():
                    break
                with cond:
                    print(f"{tag}: streaming's shared memory clashed with another run's at "
                          f"start (FileExistsError); launching it again", flush=True)
            took = time.monotonic() - start
            with cond:
                state["running"] -= 1
                if run.killed:
                    miss(run, f"killed at --kill-after {limits.kill_after:g} s")
                    print(f"{tag}: killed after {took:.1f} s (--kill-after); log {run.log}",
                          flush=True)
                elif rc != 0:
                    if not out.rc:
                        out.rc = rc
                    lost.add(run.key)
                    miss(run, f"failed with exit code {rc}")
                    tail = run.log.read_text(errors="replace").splitlines()[-15:]
                    print("\n".join(tail), file=sys.stderr)
                    print(f"{tag}: FAILED with exit code {rc}; log: {run.log}", file=sys.stderr,
                          flush=True)
                else:
                    try:
                        words = on_done(run)
                    except (OSError, RuntimeError, ValueError, KeyError) as exc:
                        # Exit code 0 but no readable results: as good as a failed run.
                        out.rc = out.rc or 1
                        lost.add(run.key)
                        print(f"{tag}: exited 0 but its results cannot be read ({exc}); log: "
                              f"{run.log}", file=sys.stderr, flush=True)
                    else:
                        state["executed"] += 1
                        out.done.add(run.key)
                        durations.setdefault((run.corpus, run.arm.name), []).append(took)
                        durations.setdefault((run.arm.name,), []).append(took)
                        print(f"{tag}: done in {took:.1f} s; {words} | {progress()}",
                              flush=True)
                cond.notify_all()

    if not gpu_slots:
        worker(None)
    else:
        threads = [threading.Thread(target=worker, args=(g,)) for g in gpu_slots]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except KeyboardInterrupt:
            # The runs got the same Ctrl-C (one process group); the workers must not start more.
            with cond:
                out.rc = out.rc or 130
                cond.notify_all()
            raise
    if out.rc:
        for _, run in queue:
            miss(run, "not started: an earlier run failed")
    return out


# --------------------------------------------------------------------------------------------
# analysis

def _families(arms: Sequence[Arm]) -> dict[str, list[Arm]]:
    fams: dict[str, list[Arm]] = {}
    for arm in arms:
        fams.setdefault(arm.family, []).append(arm)
    return fams


def analyze(arms: Sequence[Arm], runs: dict[str, dict[int, dict]],
            reference: Optional[dict] = None) -> dict[str, Any]:
    """Target, frontiers and every arm's and policy's derived numbers for one corpus.

    ``runs[arm][seed]`` holds :func:`load_run` data and is updated in place with the run's time
    to target and savings. ``reference``: :func:`reference_cost` of the corpus's reference
    model, counted against the arms that need it.
    """
    per_arm: dict[str, dict[str, Any]] = {}
    for arm in arms:
        rs = list(runs.get(arm.name, {}).values())
        per_arm[arm.name] = {k: spread([r.get(k) for r in rs]) for k in (
            "train_time", "final_loss", "teacher_time", "tokens_trained", "examples_trained",
            "examples_skipped", "optimizer_steps", "peak_memory_gib")}

    baselines = sorted((a for a in arms if a.baseline and per_arm[a.name]["final_loss"]["n"]),
                       key=lambda a: a.budget)
    points = [{"arm": a.name, "budget": a.budget, "time": per_arm[a.name]["train_time"]["mean"],
               "steps": per_arm[a.name]["optimizer_steps"]["mean"],
               "loss": per_arm[a.name]["final_loss"]["mean"]} for a in baselines]
    frontier = build_frontier([(p["time"], p["loss"]) for p in points])
    # The same frontier on the compute clock (optimizer steps): immune to a host whose speed
    # drifts between runs, it says how much training the teacher saves at equal loss.
    step_frontier = build_frontier([(p["steps"], p["loss"]) for p in points])
    target_arm = next((a.name for a in baselines if a.name == TARGET_ARM),
                      baselines[-1].name if baselines else None)  # else: the largest budget
    target = per_arm[target_arm]["final_loss"]["mean"] if target_arm else None
    target_steps = per_arm[target_arm]["optimizer_steps"]["mean"] if target_arm else None
    baseline_time = frontier_time(frontier, target) if target is not None else None
    extra = reference["steps"] if reference else 0.0

    for arm in arms:
        cost = extra if arm.needs_reference else 0.0
        for r in runs.get(arm.name, {}).values():
            curve = [(p[0], p[1]) for p in r["curve"]]
            r["time_to_target"] = time_to_target(curve, target) if target is not None else None
            tokens = [(p[3], p[1]) for p in r["curve"] if p[3] is not None]
            r["tokens_to_target"] = time_to_target(tokens, target) if target is not None else None
            r["saving"] = saving(r["time_to_target"], baseline_time)
            r["frontier_time_at_final"] = frontier_time(frontier, r["final_loss"])
            r["saving_at_final"] = saving(r["train_time"], r["frontier_time_at_final"])
            r["frontier_steps_at_final"] = frontier_time(step_frontier, r["final_loss"])
            r["steps_saving_at_final"] = saving(r["optimizer_steps"],
                                                r["frontier_steps_at_final"])
            r["cost_steps"] = (r["optimizer_steps"] + cost
                               if r["optimizer_steps"] is not None else None)
            r["cost_steps_saving_at_final"] = saving(r["cost_steps"],
                                                     r["frontier_steps_at_final"])
        rs = list(runs.get(arm.name, {}).values())
        for k in ("time_to_target", "tokens_to_target", "saving", "saving_at_final",
                  "steps_saving_at_final", "cost_steps", "cost_steps_saving_at_final"):
            per_arm[arm.name][k] = spread([r[k] for r in rs])
    policies = analyze_policies(arms, runs, target_arm, target, target_steps, reference)
    return {"target": {"arm": target_arm, "loss": target, "frontier_time": baseline_time,
                       "steps": target_steps},
            "frontier": {"points": points,
                         "monotone": [{"time": t, "loss": loss} for t, loss in frontier],
                         "steps": [{"steps": t, "loss": loss} for t, loss in step_frontier]},
            "arms": per_arm, "policies": policies, "reference": reference}


def analyze_policies(arms: Sequence[Arm], runs: dict[str, dict[int, dict]],
                     target_arm: Optional[str], target: Optional[float],
                     target_steps: Optional[float], reference: Optional[dict]
                     ) -> dict[str, Any]:
    """Per policy (family of POLICY@X arms, and full data's full@F): its frontier, steps to
    target (seed means, and per seed against that seed's target run), the step saving at final
    loss of its X = 1 arm, and that arm's paired difference against the random control."""
    fams = _families(arms)
    target_runs = runs.get(target_arm, {}) if target_arm else {}
    control = {}
    for arm in fams.get(CONTROL, []):
        for seed, r in runs.get(arm.name, {}).items():
            control.setdefault(seed, []).append((r["optimizer_steps"], r["final_loss"]))
    out: dict[str, Any] = {}
    for fam, fam_arms in fams.items():
        needs_ref = any(a.needs_reference for a in fam_arms)
        extra = reference["steps"] if (needs_ref and reference) else 0.0
        budgets, points = [], []
        for a in fam_arms:
            rs = {s: r for s, r in runs.get(a.name, {}).items()
                  if r.get("optimizer_steps") is not None}
            if not rs:
                continue
            s = statistics.fmean(r["optimizer_steps"] for r in rs.values())
            loss = statistics.fmean(r["final_loss"] for r in rs.values())
            points.append((s, loss))
            budgets.append({"arm": a.name, "scale": a.scale, "budget": a.budget, "steps": s,
                            "loss": loss, "seeds": sorted(rs)})
        if not points:
            continue
        mean_tt = steps_to_target(points, target, target_steps, extra)
        seeds = sorted({s for a in fam_arms for s in runs.get(a.name, {})})
        finished = [{s: (r["optimizer_steps"], r["final_loss"])
                     for s, r in runs.get(a.name, {}).items()
                     if r.get("optimizer_steps") is not None} for a in fam_arms]
        per_seed = per_seed_to_target(
            seeds, finished, {s: (r["optimizer_steps"], r["final_loss"])
                              for s, r in target_runs.items()}, extra)
        entry: dict[str, Any] = {
            "budgets": budgets, "to_target": mean_tt, "per_seed": per_seed,
            "per_seed_saving": spread([v["saving"] for v in per_seed.values()]),
            "reached": sum(v["saving"] is not None for v in per_seed.values()),
            "seeds": seeds, "reference": reference if needs_ref else None,
            "needs_reference": needs_ref,
        }
        base = next((a for a in fam_arms if a.scale == 1.0 and not a.baseline), None)
        if fam == "full":
            base = next((a for a in fam_arms if a.name == TARGET_ARM), None)
        entry["budget_arm"] = base.name if base else None
        base_runs = runs.get(base.name, {}) if base else {}
        entry["saving_at_final"] = spread([r["steps_saving_at_final"]
                                           for r in base_runs.values()])
        entry["cost_saving_at_final"] = spread([r["cost_steps_saving_at_final"]
                                                for r in base_runs.values()])
        if fam not in (CONTROL, "full") and control and base_runs:
            mine = {s: (r["optimizer_steps"], r["final_loss"]) for s, r in base_runs.items()}
            entry["vs_random"] = paired_difference(mine, control)
            if needs_ref and extra:
                entry["vs_random_cost_counted"] = paired_difference(mine, control, extra)
        out[fam] = entry
    return out


# --------------------------------------------------------------------------------------------
# reports

def _pm(s: dict, digits: int = 1, scale: float = 1.0) -> str:
    if s["mean"] is None:
        return "–"
    text = f"{s['mean'] * scale:,.{digits}f}"
    if s["std"] is not None:
        text += f" ± {s['std'] * scale:,.{digits}f}"
    return text


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:+.1%}"


def _saving_cell(s: dict, none: str) -> str:
    """Mean [min, max] as signed percentages; ``none`` names why a seed has no value."""
    if s["mean"] is None:
        return "–" if not s["missing"] else none
    text = _pct(s["mean"])
    if s["n"] > 1:
        text += f" [{_pct(s['min'])}, {_pct(s['max'])}]"
    if s["missing"]:
        text += f" ({s['n']}/{s['n'] + s['missing']} seeds)"
    return text


def _to_target_cell(tt: dict, cost: bool = False) -> str:
    """Steps to target and its saving (cost-counted with ``cost``), or why there is none."""
    if tt["status"] == "no runs":
        return "–"
    if tt["status"] == "not reached":
        below = tt["cost_saving_below"] if cost else tt["saving_below"]
        bound = f" (saving < {_pct(below)})" if below is not None else ""
        return f"not reached{bound}, best {tt['best_loss']:.4f} at {tt['best_steps']:,.0f} steps"
    steps, sav = (tt["cost_steps"], tt["cost_saving"]) if cost else (tt["steps"], tt["saving"])
    if tt["bound"]:
        return f"≤ {steps:,.0f} (smallest budget), ≥ {_pct(sav)}"
    return f"{steps:,.0f} ({_pct(sav)})"


def _diff_cell(vs: Optional[dict]) -> str:
    if not vs:
        return "–"
    d = vs["diff"]
    if d["mean"] is None:
        need = ", ".join(f"{s}: {v:,.0f}" for s, v in vs["uncovered"].items())
        return f"random does not cover the steps (seed: steps {need}); add random@X"
    text = f"{d['mean']:+.4f}"
    if d["n"] > 1:
        text += f" [{d['min']:+.4f}, {d['max']:+.4f}]"
    return text + f", {vs['better']}/{vs['n']} seeds better"


def markdown(arms: Sequence[Arm], result: dict, corpus: str = "",
             missing: Sequence[dict] = (), epochs: Optional[int] = None) -> str:
    """ttq.md: the target, the frontier, one row per arm and one per policy."""
    tgt, per_arm = result["target"], result["arms"]
    lines = [f"# Time to quality{': ' + corpus if corpus else ''}", ""]
    if tgt["loss"] is None:
        lines.append("No full-data baseline finished: no target, no frontier, no savings.")
    else:
        lines.append(f"Target: validation loss **{tgt['loss']:.4f}** (mean final loss of "
                     f"{tgt['arm']}, {tgt['steps']:,.0f} optimizer steps). Full-data frontier "
                     "(mean steps, training seconds, final loss): " +
                     ", ".join(f"{p['arm']} {p['steps']:,.0f} / {p['time']:,.1f} s / "
                               f"{p['loss']:.4f}" for p in result["frontier"]["points"]) + ".")
    ref = result.get("reference")
    if ref:
        h = ref.get("holdout") or {}
        held = (f", trained on {h['sequences']} validation sequences from index {h['skip']} on"
                if h else "")
        lines += ["", f"Reference model ({ref['reference_model']}, for RHO-LOSS arms{held}): "
                  f"{ref['steps']:,.1f} optimizer-step equivalents of compute "
                  f"({ref['token_steps']:,.1f} counting its tokens as the job's), "
                  f"{ref['seconds']:,.1f} s; counted in the cost-counted columns."]
    elif any(a.needs_reference for a in arms):
        lines += ["", "Reference model: no reference.json found, so its cost is not counted "
                  "(the cost-counted columns equal the plain ones)."]
    lines += ["", "Compute clock: optimizer steps. Saving at final loss = 1 − steps / steps the "
              "full-data frontier needs for the arm's final loss (out of range: that loss lies "
              "outside the baselines' losses); the wall-clock version beside it uses training "
              "seconds (evaluation excluded, teacher phases included) and drifts with the host. "
              "Positive = less compute than plain DeepSpeed. ± is the sample standard deviation "
              "over seeds; [min, max] over seeds.", ""]
    # The cost-counted columns only where some arm pays for a reference model.
    costly = any(a.needs_reference for a in arms)
    cc = " cost-counted |" if costly else ""
    lines += ["| arm | passes | seeds | steps | final val loss | saving at final loss (steps) "
              f"[min, max] |{cc} train time (s) | saving at final loss (time) | "
              "teacher time (s) | examples trained | peak GiB |",
              "|---|---|---|---|---|---|" + "---|" * (6 if costly else 5)]
    for arm in arms:
        a = per_arm[arm.name]
        n = a["train_time"]["n"]
        peak = _pm(a["peak_memory_gib"], 2) if a["peak_memory_gib"]["mean"] is not None else "n/a"
        if arm.baseline:
            passes = f"{arm.budget:g} of {epochs}" if epochs else f"{arm.budget:g} of plan"
        else:
            passes = str(arm.passes(epochs)) if epochs else f"x{arm.scale:g}"
        cost = (_saving_cell(a["cost_steps_saving_at_final"], "out of range")
                if arm.needs_reference else "")
        cost = f" {cost} |" if costly else ""
        lines.append(f"| {arm.name} | {passes} | {n} | {_pm(a['optimizer_steps'], 0)} | "
                     f"{_pm(a['final_loss'], 4)} | "
                     f"{_saving_cell(a['steps_saving_at_final'], 'out of range')} |{cost} "
                     f"{_pm(a['train_time'])} | "
                     f"{_saving_cell(a['saving_at_final'], 'out of range')} | "
                     f"{_pm(a['teacher_time'], 2)} | {_pm(a['examples_trained'], 0)} | {peak} |")
    pols = result.get("policies", {})
    if pols:
        lines += ["", "## Policies", "",
                  "Steps to target: where the policy's frontier (its budgets X, seed means) "
                  "reaches the target; saving = 1 − steps to target / steps of "
                  f"{tgt['arm'] or TARGET_ARM}. Per seed: the same from that seed's runs against "
                  "that seed's target run. Δ vs random: the X = 1 arm's final loss minus random's "
                  "at the same steps on that seed's random frontier (negative = better).", "",
                  "| policy | budgets | steps to target (saving) | per seed [min, max] |" + cc +
                  " saving at final loss (X = 1, steps) | Δ final loss vs random |",
                  "|---|---|---|---|---|---|" + ("---|" if costly else "")]
        for fam, p in pols.items():
            per_seed = _saving_cell(p["per_seed_saving"], "not reached")
            if p["per_seed_saving"]["mean"] is not None or p["seeds"]:
                per_seed += f" ({p['reached']}/{len(p['seeds'])} seeds reached)"
            cost = (f"to target {_to_target_cell(p['to_target'], cost=True)}; at final loss "
                    f"{_saving_cell(p['cost_saving_at_final'], 'out of range')}"
                    if p["needs_reference"] else "")
            cost = f" {cost} |" if costly else ""
            vs = p.get("vs_random")
            diff = "control" if fam == CONTROL else ("" if fam == "full" else _diff_cell(vs))
            if p.get("vs_random_cost_counted"):
                diff += f"; cost-counted: {_diff_cell(p['vs_random_cost_counted'])}"
            budgets = ", ".join(b["arm"] for b in p["budgets"])
            lines.append(f"| {fam} | {budgets} | {_to_target_cell(p['to_target'])} | "
                         f"{per_seed} |{cost} "
                         f"{_saving_cell(p['saving_at_final'], 'out of range')} | {diff} |")
    if missing:
        lines += ["", f"Missing runs ({len(missing)}): " +
                  "; ".join(f"{m['run']} ({m['why']})" for m in missing) + "."]
    return "\n".join(lines) + "\n"


def summary_markdown(rows: dict[str, Any], corpora: Sequence[str], seeds: Sequence[int],
                     missing: Sequence[dict] = ()) -> str:
    """summary.md: one row per policy, worst corpus and mean over corpora."""
    def pair(m: dict, fmt: Callable[[float], str]) -> str:
        if m["worst"] is None:
            return "–"
        text = f"{fmt(m['worst'])} ({m['worst_corpus']}) / "
        text += fmt(m["mean"]) if m["mean"] is not None else \
            f"– (none on {', '.join(m['missing'])})"
        return text

    lines = [f"# Summary over corpora: {', '.join(corpora)}; seeds {', '.join(map(str, seeds))}",
             "", "Each cell: worst corpus (its name) / mean over corpora. (a) step saving at the "
             "policy's final loss against the full-data frontier (X = 1 arm, mean over seeds); "
             "(b) saving of the steps to reach full@1.0's loss on the policy's own frontier; "
             "(c) paired difference of final loss against random at equal steps (negative = "
             "better) and seeds better of seeds compared. RHO-LOSS rows (†) count the reference "
             "model's compute in (a) and (b). Beats random = on every corpus a negative mean "
             "difference with a majority of seeds better.", "",
             "| policy | corpora | (a) saving at final loss | (b) steps-to-target saving | "
             "(c) Δ loss vs random | seeds better | beats random |",
             "|---|---|---|---|---|---|---|"]
    for fam, row in rows.items():
        a, b = row["saving_at_final"], row["saving_to_target"]
        if row["not_reached"]:
            bcell = "not reached (" + ", ".join(
                c if b["below"].get(c) is None else f"{c} < {_pct(b['below'][c])}"
                for c in row["not_reached"]) + ")"
        else:
            bound = "≥ " if any(b["bound"].values()) else ""
            bcell = pair(b, lambda v: bound + _pct(v))
        c = row.get("vs_random")
        if fam == CONTROL:
            ccell, better, beats = "control", "", ""
        elif c is None:
            ccell, better, beats = "–", "", ""
        else:
            ccell = pair(c, lambda v: f"{v:+.4f}")
            better = f"{c['better']}/{c['n']}"
            beats = "yes" if c["beats_random"] else f"no ({', '.join(c['losing_corpora'])})"
        name = fam + (" †" if row["reference"] else "")
        lines.append(f"| {name} | {len(row['corpora'])} | {pair(a, _pct)} | {bcell} | {ccell} | "
                     f"{better} | {beats} |")
    if missing:
        lines += ["", f"{len(missing)} runs missing (see each corpus's ttq.md); rerun with "
                  "--resume to complete them."]
    return "\n".join(lines) + "\n"


def plot(arms: Sequence[Arm], runs: dict[str, dict[int, dict]], result: dict, path: Path,
         title: str = "") -> Path:
    """ttq.png: validation loss against optimizer steps, every arm (seeds thin, their mean
    thick), the full-data frontier in black and each policy's frontier dotted in its colour,
    the target as a horizontal line; the right panel zooms on the losses around the frontier."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 5.6))
    axes = fig.subplots(1, 2)
    tab, blues = colormaps["tab10"], colormaps["Blues"]
    order = (1, 2, 4, 5, 6, 8, 9, 3, 7, 0)  # tab10 without its blue first (baselines are blue)
    fams = [f for f in _families(arms) if f != "full"]
    fam_color = {f: tab(order[i % len(order)]) for i, f in enumerate(fams)}
    colors = {a.name: blues(0.35 + 0.6 * a.budget) if a.baseline else fam_color[a.family]
              for a in arms}
    frontier = result["frontier"]
    target = result["target"]["loss"]

    def draw(ax, legend: bool) -> None:
        for arm in arms:
            seeds = runs.get(arm.name, {})
            if not seeds:
                continue
            color = colors[arm.name]
            for r in seeds.values():
                ax.plot([p[2] for p in r["curve"]], [p[1] for p in r["curve"]], color=color,
                        lw=0.7, alpha=0.35)
            mean = seed_mean_curve([[(p[2], p[1], p[2]) for p in r["curve"]]
                                    for r in seeds.values()])
            ax.plot([p[0] for p in mean], [p[1] for p in mean], color=color,
                    lw=1.4 if arm.baseline or arm.scale != 1.0 else 2.2,
                    ls="--" if arm.baseline else "-",
                    label=f"{arm.name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
        if frontier["points"]:
            ax.plot([p["steps"] for p in frontier["steps"]],
                    [p["loss"] for p in frontier["steps"]], color="black", lw=1.2,
                    label="full-data frontier")
            ax.plot([p["steps"] for p in frontier["points"]],
                    [p["loss"] for p in frontier["points"]], ls="none", marker="s", ms=6,
                    color="black")
        for fam, p in result.get("policies", {}).items():
            if fam == "full" or len(p["budgets"]) < 2:
                continue
            front = p["to_target"]["frontier"]
            ax.plot([q[0] for q in front], [q[1] for q in front], color=fam_color[fam], lw=1.2,
                    ls=":", marker="o", ms=5)
        if target is not None:
            ax.axhline(target, color="crimson", ls=":", lw=1.3,
                       label=f"target {target:.4f} ({result['target']['arm']} mean)")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(loc="upper right", fontsize=8)

    draw(axes[0], legend=True)
    axes[0].set_title("validation loss vs optimizer steps")
    draw(axes[1], legend=False)
    finals = [r["final_loss"] for rs in runs.values() for r in rs.values()]
    tops = [p["loss"] for p in frontier["points"]] + ([target] if target is not None else [])
    if finals and tops:
        lo, hi = min(finals + tops), max(finals + tops)
        pad = max(0.15 * (hi - lo), 0.01 * abs(hi), 1e-3)
        top = hi + 2 * pad
        axes[1].set_ylim(lo - pad, top)
        # Start the zoom where the first curve comes into its loss range.
        entry = [time_to_target([(p[2], p[1]) for p in r["curve"]], top)
                 for rs in runs.values() for r in rs.values()]
        entry = [t for t in entry if t is not None]
        end = max(r["curve"][-1][2] for rs in runs.values() for r in rs.values())
        if entry and end > min(entry):
            axes[1].set_xlim(min(entry) - 0.03 * end, end * 1.05)
    axes[1].set_title("zoom on the frontier's losses")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------------------------
# command line

def parse_args(argv=None) -> argparse.Namespace:
    from attent_scale.model import MODEL_SHAPES
    p = argparse.ArgumentParser(prog="bench_ttq.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/ttq", help="results and one directory per arm and seed")
    p.add_argument("--data", default=None,
                   help="one prepared corpus (the first run builds the default, the standard "
                        "library, when missing); default .cache/stdlib-corpus")
    p.add_argument("--corpora", default=None,
                   help="several prepared corpora, NAME=DIR,NAME=DIR (e.g. code=c,prose=p,mix=m): "
                        "every arm and seed runs on each; instead of --data")
    p.add_argument("--arms", default=DEFAULT_ARMS, help="comma list of: " + allowed_arms())
    p.add_argument("--seeds", default="0,1", help="comma list; every arm runs once per seed")
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="demo")
    p.add_argument("--epochs", type=int, default=3,
                   help="passes over the training data planned for full@F and POLICY@1")
    p.add_argument("--micro", type=int, default=16, help="micro batch per rank")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--keep-going", action="store_true",
                   help="a failed run is reported as missing and the others go on (the exit code "
                        "still says a run failed); default: stop at the first failure")
    p.add_argument("--loss-kernel", default="logits",
                   help="the job's --loss-kernel (default logits: the arms differ in the data "
                        "they see, not in how the loss is computed)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="optimizer steps between evaluations (the curves' resolution)")
    p.add_argument("--eval-samples", type=int, default=256,
                   help="validation sequences per eval (the first ones of the split)")
    p.add_argument("--seq-len", type=int, help="corpus option, when --data is built here")
    p.add_argument("--vocab-size", type=int, help="corpus option, when --data is built here")
    p.add_argument("--max-bytes", type=int, help="corpus option (0 = all the source)")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks per run (>1 launches each run with torchrun)")
    p.add_argument("--gpus", default=None,
                   help="comma list of CUDA devices (e.g. 0,1,2,3, or 0,0,0,0 for four runs on "
                        "one GPU): run that many runs at once, each on its own device(s); with "
                        "--nproc N each slot is N devices (e.g. 0+1,2+3). Default: one run at a "
                        "time on what the job sees")
    p.add_argument("--start-gap", type=float, default=START_GAP_S,
                   help="seconds between two launches with --gpus (runs then start up side by "
                        "side; a run that hits streaming's start-up race is launched again)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after the start after which no run starts; running ones finish "
                        "(or are killed at --kill-after), then the reports cover what finished")
    p.add_argument("--kill-after", type=float, default=None,
                   help="seconds after the start at which runs still going are terminated (and "
                        "runs whose arm took longer than the time left are not started)")
    p.add_argument("--reference-model", choices=sorted(MODEL_SHAPES), default=None,
                   help="shape of the RHO-LOSS reference model (default: --model)")
    p.add_argument("--reference-epochs", type=int, default=2,
                   help="passes of the reference model over its holdout")
    p.add_argument("--reference-seed", type=int, default=0)
    p.add_argument("--reference-holdout", choices=("disjoint", "all"), default="disjoint",
                   help="disjoint: the validation sequences evaluation does not read (after the "
                        "first --eval-samples); all: the whole validation split (the reference "
                        "then saw the evaluation sequences; the report says so)")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs in --out that finished with the identical config and command")
    p.add_argument("--run-plots", action="store_true", help="also write each run's metrics.png")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs' commands and exit (with --resume, the runs it would "
                        "reuse as '# reused' lines)")
    p.add_argument("--reanalyze", action="store_true",
                   help="run nothing: rebuild the reports from the runs' metrics already in "
                        "--out (e.g. copied from the GPU host); unfinished runs are left out")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs: got {args.epochs}; allowed: an integer >= 1")
    args.out = Path(args.out).expanduser().resolve()
    try:
        args.arm_list = parse_arms(args.arms, args.epochs)
        args.seed_list = parse_seeds(args.seeds)
        if args.corpora is not None:
            if args.data is not None:
                raise ArmError("--data and --corpora both given; use --corpora NAME=DIR,... "
                               "for several corpora or --data DIR for one")
            args.corpus_list = parse_corpora(args.corpora, args.out)
        else:
            data = Path(args.data or ".cache/stdlib-corpus").expanduser().resolve()
            args.corpus_list = [Corpus(data.name, data, args.out, flat=True)]
    except ArmError as exc:
        p.error(str(exc))
    # Runs may start from another directory: every path the runs see is absolute.
    args.data = str(args.corpus_list[0].path) if args.corpora is None else None
    if args.nproc < 1:
        p.error("--nproc must be >= 1")
    if not args.start_gap >= 0:
        p.error(f"--start-gap: got {args.start_gap}; allowed: seconds >= 0")
    for flag in ("deadline", "kill_after"):
        v = getattr(args, flag)
        if v is not None and not v > 0:
            p.error(f"--{flag.replace('_', '-')}: got {v}; allowed: seconds > 0")
    if args.deadline is not None and args.kill_after is not None and \
            args.kill_after < args.deadline:
        p.error(f"--kill-after {args.kill_after:g} is before --deadline {args.deadline:g}; "
                "allowed: --kill-after >= --deadline (runs start until the deadline, and the "
                "ones still going are killed at --kill-after)")
    args.gpu_slots = None
    if args.gpus is not None:
        slots = [g.strip().replace("+", ",") for g in args.gpus.split(",") if g.strip()]
        if not slots or any(not re.fullmatch(r"\d+(,\d+)*", g) for g in slots):
            p.error(f"--gpus: got {args.gpus!r}; allowed: device numbers separated by commas, "
                    "a slot of several devices joined by + (e.g. 0,1 or 0+1,2+3)")
        if any(len(g.split(",")) != args.nproc for g in slots):
            p.error(f"--gpus: every slot must hold --nproc={args.nproc} devices; got {args.gpus!r}")
        args.gpu_slots = slots
    if any(a.needs_reference for a in args.arm_list) and args.reference_holdout == "disjoint":
        for c in args.corpus_list:
            meta = c.meta()
            if meta is None:
                continue  # built by the first run; the reference tool checks it then
            left = meta["num_val"] - args.eval_samples
            if left < args.micro:
                p.error(f"--reference-holdout disjoint: corpus {c.name} has {meta['num_val']} "
                        f"validation sequences and evaluation reads the first {args.eval_samples}"
                        f", leaving {max(left, 0)} for the reference model (at least --micro "
                        f"{args.micro} needed); lower --eval-samples, prepare the corpus with a "
                        "larger --val-fraction, or pass --reference-holdout all")
    return args


def _main_cost_basis(args: argparse.Namespace, corpus: Corpus) -> Optional[tuple[int, int]]:
    """(compute parameters of the benchmarked model, tokens per optimizer step) on a corpus."""
    meta = corpus.meta()
    if meta is None:
        return None
    params = shape_params(args.model, meta["vocab_size"])["compute"]
    return params, args.micro * args.nproc * meta["seq_len"]


def _settings(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in ("arm_list", "seed_list", "gpu_slots", "corpus_list")}


def main(argv=None) -> int:
    args = parse_args(argv)
    arms, seeds, corpora, out = args.arm_list, args.seed_list, args.corpus_list, args.out
    plan = [make_run(args, c, a, s) for s, c, a in plan_order(corpora, arms, seeds)]
    needing = {r.corpus for r in plan if r.needs}
    refs = [make_reference(args, c) for c in corpora
            if ("" if c.flat else c.name) in needing]
    if args.dry_run:
        # With --resume, say which runs the call would reuse: a plan checked before a device
        # call should show what that call will spend its time on.
        reused = 0
        for run in [*refs, *plan]:
            if args.resume and run.finished():
                reused += 1
                print(f"# reused (--resume): {run.label}")
            else:
                print(" ".join(run.command))
        if args.resume:
            print(f"# {len(refs) + len(plan) - reused} to run, {reused} reused (--resume)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, dict[int, dict]]] = {
        c.name: {a.name: {} for a in arms} for c in corpora}
    by_key = {("" if c.flat else c.name): c.name for c in corpora}
    print(f"[ttq] {len(corpora)} corpora x {len(arms)} arms x {len(seeds)} seeds = {len(plan)} "
          f"runs{f' (+{len(refs)} reference models)' if refs else ''} into {out}", flush=True)

    def on_done(run: Run) -> str:
        if isinstance(run, ReferenceRun):
            ref = run.load()
            return (f"{ref['train']['optimizer_steps']} reference steps, "
                    f"{ref['score']['samples']} samples scored")
        r = run.load()
        r.update(seed=run.seed, dir=str(run.dir))
        runs[by_key[run.corpus]][run.arm.name][run.seed] = r
        return (f"{r['optimizer_steps']} steps, training time {r['train_time']:.1f} s, final "
                f"val loss {r['final_loss']:.4f}")

    outcome = Outcome()
    if args.reanalyze:
        for run in [*refs, *plan]:
            try:
                on_done(run)
            except (OSError, RuntimeError, ValueError, KeyError) as exc:
                outcome.missing.append({"run": run.label, "key": list(run.key),
                                        "why": f"left out ({exc})"})
                print(f"[ttq] {run.label}: left out ({exc})", flush=True)
    else:
        limits = Limits(time.monotonic(), args.deadline, args.kill_after)
        execute_plan([*refs, *plan], on_done, args.resume, args.gpu_slots, limits, outcome,
                     args.start_gap, args.keep_going)
        if outcome.rc != 0 and not args.keep_going:
            return outcome.rc

    results = {}
    for c in corpora:
        key = "" if c.flat else c.name
        reference = None
        ref_file = reference_dir(c) / "reference.json"
        basis = _main_cost_basis(args, c)
        if key in needing and ref_file.is_file() and basis is not None:
            reference = reference_cost(json.loads(ref_file.read_text()), *basis)
        result = analyze(arms, runs[c.name], reference)
        missing = [m for m in outcome.missing if m["key"][0] == key]
        results[c.name] = result
        report = {
            "settings": _settings(args),
            "corpus": {"name": c.name, "path": str(c.path), "meta": c.meta()},
            "seeds": seeds,
            "arm_specs": {a.name: {"budget_fraction": a.budget, "attent": a.section,
                                   "source": a.source, "family": a.family, "scale": a.scale,
                                   "passes": a.passes(args.epochs)} for a in arms},
            **result,
            "missing": missing,
            "runs": {name: {str(s): r for s, r in rs.items()} for name, rs in runs[c.name].items()},
        }
        c.out.mkdir(parents=True, exist_ok=True)
        (c.out / "ttq.json").write_text(json.dumps(report, indent=1) + "\n")
        table = markdown(arms, result, "" if c.flat else c.name, missing, args.epochs)
        (c.out / "ttq.md").write_text(table)
        plot(arms, runs[c.name], result, c.out / "ttq.png",
             title=f"{c.name}: {args.model}, {args.epochs} passes, seeds {args.seeds}")
        print(f"\n{table}\nresults: {c.out / 'ttq.json'}  {c.out / 'ttq.md'}  "
              f"{c.out / 'ttq.png'}")

    families = [f for f in _families(arms) if f != "full"]
    rows = summarize(results, families)
    summary = summary_markdown(rows, [c.name for c in corpora], seeds, outcome.missing)
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(json.dumps(
        {"settings": _settings(args), "corpora": {c.name: str(c.path) for c in corpora},
         "seeds": seeds, "policies": rows, "missing": outcome.missing}, indent=1) + "\n")
    print(f"\n{summary}\nsummary: {out / 'summary.md'}  {out / 'summary.json'}")
    if outcome.missing:
        print(f"[ttq] incomplete: {len(outcome.missing)} of {len(plan) + len(refs)} runs missing "
              "(listed in the reports); run the same command with --resume to complete them",
              flush=True)
    return outcome.rc if args.keep_going else 0


if __name__ == "__main__":
    sys.exit(main())
