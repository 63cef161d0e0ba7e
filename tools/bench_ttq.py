"""Time-to-quality of teacher arms against full-data baselines, in one invocation.

Every arm is the real pretraining job (``attent_scale.pretrain``), one subprocess per arm and
seed, on the same corpus, model shape, DeepSpeed settings and seeds:

- ``full@F``: plain DeepSpeed (``--no-teacher``) trained for a share F of the planned steps with a
  complete learning-rate schedule fitted to that budget (``--budget-fraction F``);
- a teacher arm: a preset (``attent-simple``, ``attent-complex``, ``random``), a policy of
  :data:`POLICIES`, or ``NAME=path/to/section.json`` (a JSON file holding an ``attent`` section, or
  a whole DeepSpeed config whose ``attent`` section is used).

Each arm runs once per seed S with ``--seed S`` (model init and data order) and, for teacher arms,
the section's ``"seed": S``. Runs go seed by seed (every arm at seed 0, then every arm at seed 1,
...), so a drift of the machine's speed spreads over all arms instead of landing on the last one.

Time is TRAINING wall-clock: the run's clock (which includes the teacher's phases) minus the time
spent evaluating, since evaluation is measurement, not training. From the baselines' (mean training
time, mean final validation loss) points the harness builds the full-data frontier: how long plain
DeepSpeed needs to reach a given loss. The target is full@1.0's mean final loss (the largest
full@F budget's when full@1.0 is not among the arms), and

- ``saving = 1 - time_to_target(arm) / frontier_time(target)``: the share of the baseline's training
  time an arm saves to reach the target (positive: the arm is faster);
- ``saving_at_final = 1 - train_time(arm) / frontier_time(final_loss(arm))``: the same at whatever
  loss the arm ends with (None when that loss lies outside the frontier's range).

    python tools/bench_ttq.py --out runs/ttq --data .cache/ttq-corpus --model small --epochs 3 --micro 16 \\
        --seeds 0,1 --arms full@0.5,full@0.65,full@0.8,full@1.0,random,attent-simple \\
        --eval-every 50 --eval-samples 256 --bf16

Writes ``ttq.json`` (every run's curve and numbers, and everything derived), ``ttq.md`` (the table,
also printed at the end) and ``ttq.png`` into --out; each run's files, with its stdout and stderr
in ``log.txt``, stay in ``OUT/<arm>/seed<S>/``. A failed run stops the benchmark with its exit
code; ``--resume`` then reuses every run that finished with the identical config and command.
``--nproc N`` launches each run on N ranks through ``torchrun``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: python tools/bench_ttq.py

from attent_scale.config import PRESETS, ConfigError, parse_attent  # noqa: E402

Curve = Sequence[tuple[float, float]]  # (training seconds, validation loss), ordered by time

# Named teacher policies (``attent`` sections without the seed, which each run sets). Keys must not
# clash with the presets or start with "full@".
POLICIES: dict[str, dict[str, Any]] = {
    # Importance sampling proportional to the per-example loss, reweighted to stay unbiased.
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
    # The paper's recipe with each ingredient changed once (the policy sweep of BENCHMARKS.md):
    # signal: the functional-gradient norm, or the same weighted by attention importance.
    "attent-fgrad": {"preset": "attent-simple", "signal": "fgrad_norm"},
    "attent-attn": {"preset": "attent-simple", "signal": "attention_fgrad"},
    # RHO-LOSS critique: the highest losses may be unlearnable noise; never select the top 5%.
    "hard-skip5": {"preset": "attent-simple", "selection": {"method": "hard", "skip_top": 0.05}},
    # Soft (Gumbel-top-k) selection on softmax(loss / 0.5), re-drawn every pass from the
    # freshest free scores: diversity instead of the same hard subset every pass.
    "soft-T0.5": {"preset": "attent-simple", "interval": {"schedule": "fixed", "every": 1},
                  "selection": {"method": "soft", "temperature": 0.5}},
    # No staleness: a no-grad pass re-scores the whole set before every pass's top 70%.
    "pool-every": {"preset": "attent-simple", "source": "pool",
                   "interval": {"schedule": "fixed", "every": 1}},
    "hard-50": {"preset": "attent-simple", "ratio": {"value": 0.5}},
    "random-50": {"preset": "random", "ratio": {"value": 0.5}},
}

DEFAULT_ARMS = "full@0.5,full@0.65,full@0.8,full@1.0,random,attent-simple"
TARGET_ARM = "full@1.0"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_STARTED = re.compile(r"planned \d+ steps")  # the job's start line, printed once its data is open
START_TIMEOUT_S = 300.0
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
    """The full-data frontier from baseline (mean training time, mean final loss) points.

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


# --------------------------------------------------------------------------------------------
# arms

class ArmError(ValueError):
    """An arm name or section that cannot be run."""


@dataclass
class Arm:
    name: str
    budget: Optional[float] = None             # full@F baselines: F
    section: Optional[dict[str, Any]] = None   # teacher arms: the attent section (seed set per run)
    source: str = ""                           # where the section came from

    @property
    def baseline(self) -> bool:
        return self.budget is not None

    def attent(self, seed: int) -> Optional[dict[str, Any]]:
        return None if self.section is None else {**self.section, "seed": seed}


def allowed_arms() -> str:
    return ("full@F with F in (0, 1] (e.g. full@0.5, full@0.65, full@0.8, full@1.0); presets "
            f"{', '.join(sorted(PRESETS))}; policies {', '.join(sorted(POLICIES))}; "
            "or NAME=path/to/section.json")


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
        name, path = (s.strip() for s in spec.split("=", 1))
        if (not _NAME.match(name) or name in PRESETS or name in POLICIES
                or name.startswith("full")):
            raise ArmError(f"arm {spec!r}: NAME must be letters, digits and ._+- and not a preset, "
                           f"a policy or full@F (it names the arm's directory)")
        file = Path(path).expanduser()
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ArmError(f"arm {name}: cannot read an attent section from {file}: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("attent"), dict):
            data = data["attent"]  # a whole DeepSpeed config: use its section
        if not isinstance(data, dict):
            raise ArmError(f"arm {name}: {file} must hold a JSON object (an attent section)")
        return Arm(name, section=data, source=str(file.resolve()))
    if spec in POLICIES:
        return Arm(spec, section=json.loads(json.dumps(POLICIES[spec])), source="POLICIES")
    if spec in PRESETS:
        return Arm(spec, section={"preset": spec}, source="preset")
    raise ArmError(f"unknown arm {spec!r}; allowed: {allowed_arms()}")


def parse_arms(text: str) -> list[Arm]:
    """Comma-separated arm names, each validated (teacher sections through the config model)."""
    arms = [parse_arm(s) for s in text.split(",") if s.strip()]
    if not arms:
        raise ArmError(f"no arms given; allowed: {allowed_arms()}")
    seen = set()
    for arm in arms:
        if arm.name in seen:
            raise ArmError(f"arm {arm.name!r} is listed twice")
        seen.add(arm.name)
        if arm.section is not None:
            try:
                parse_attent(arm.attent(0))
            except ConfigError as exc:
                raise ArmError(f"arm {arm.name}: {exc}") from exc
    return arms


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ArmError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ArmError(f"--seeds must list distinct integers, got {text!r}")
    return seeds


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
        cfg["bf16"] = {"enabled": True}
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


def run_command(args: argparse.Namespace, arm: Arm, seed: int, run_dir: Path) -> list[str]:
    # Runs side by side (--gpus) must not share streaming's shared memory: each reads the corpus
    # through its own path (a link made by Run.execute) and leaves the others' segments alone.
    data = run_dir / "data" if args.gpu_slots else args.data
    cmd = ["--deepspeed_config", str(run_dir / "ds_config.json"), "--out", str(run_dir),
           "--data", str(data), "--model", args.model, "--epochs", str(args.epochs),
           "--seed", str(seed), "--eval-every", str(args.eval_every),
           "--eval-samples", str(args.eval_samples), "--no-resume"]
    for flag in ("seq_len", "vocab_size", "max_bytes"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if arm.baseline:
        cmd += ["--no-teacher", "--budget-fraction", repr(arm.budget)]
    if not args.run_plots:
        cmd.append("--no-plot")
    if args.gpu_slots:
        cmd.append("--no-shm-clean")
    if args.nproc > 1:
        return [_torchrun(), "--nproc_per_node", str(args.nproc), "--master_port", "{port}",
                "-m", "attent_scale.pretrain", *cmd]
    return [sys.executable, "-m", "attent_scale.pretrain", *cmd]


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


@dataclass
class Run:
    """One arm at one seed: its directory, DeepSpeed config and command."""
    arm: Arm
    seed: int
    dir: Path
    config: dict
    command: list[str]
    corpus: Optional[Path] = None  # with --gpus: the corpus the run reads through OUT/.../data

    @property
    def log(self) -> Path:
        return self.dir / "log.txt"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def spec(self) -> dict:
        return {"config": self.config, "command": self.command}

    def finished(self) -> bool:
        """True when the directory holds a complete run of exactly this config and command."""
        try:
            same = json.loads((self.dir / "run.json").read_text()) == self.spec
            return same and load_run(self.metrics) is not None
        except (OSError, ValueError, RuntimeError):
            return False

    def execute(self, gpu: Optional[str] = None, start_gate: Optional[threading.Lock] = None
                ) -> int:
        """Run the job (stdout and stderr into log.txt); returns its exit code.

        ``gpu``: the CUDA device(s) the run may see (CUDA_VISIBLE_DEVICES), for ``--gpus``.
        ``start_gate``: held from the launch until the job has opened its datasets (its log shows
        the "planned N steps" line) or exited: streaming registers a dataset's shared memory
        without a lock, so two jobs of one node opening datasets at the same instant can both
        claim the same segment and one fails with FileExistsError."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.metrics, self.dir / "run.json"):  # the job appends to metrics.jsonl
            stale.unlink(missing_ok=True)
        (self.dir / "ds_config.json").write_text(json.dumps(self.config, indent=1) + "\n")
        if self.corpus is not None and not (self.dir / "data").exists():
            (self.dir / "data").symlink_to(self.corpus, target_is_directory=True)
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                          os.environ.get("PYTHONPATH")]))
        launch = [str(_free_port()) if c == "{port}" else c for c in self.command]
        with open(self.log, "w") as fh:
            fh.write("$ " + " ".join(launch) + "\n")
            fh.flush()
            if start_gate is None:
                rc = subprocess.run(launch, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
            else:
                with start_gate:
                    proc = subprocess.Popen(launch, stdout=fh, stderr=subprocess.STDOUT, env=env)
                    deadline = time.monotonic() + START_TIMEOUT_S
                    while (proc.poll() is None and time.monotonic() < deadline
                           and not _STARTED.search(self.log.read_text(errors="replace"))):
                        time.sleep(0.5)
                rc = proc.wait()
        if rc == 0:
            (self.dir / "run.json").write_text(json.dumps(self.spec, indent=1) + "\n")
        return rc


def make_run(args: argparse.Namespace, arm: Arm, seed: int) -> Run:
    run_dir = args.out / arm.name / f"seed{seed}"
    return Run(arm, seed, run_dir, ds_config(args, arm.attent(seed)),
               run_command(args, arm, seed, run_dir), args.data if args.gpu_slots else None)


# --------------------------------------------------------------------------------------------
# analysis

def analyze(arms: Sequence[Arm], runs: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """Target, frontier and every arm's derived numbers from the per-run data of :func:`load_run`.

    ``runs[arm][seed]`` is updated in place with the run's time to target and savings.
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
               "loss": per_arm[a.name]["final_loss"]["mean"]} for a in baselines]
    frontier = build_frontier([(p["time"], p["loss"]) for p in points])
    # The same frontier on the compute clock (optimizer steps): immune to a host whose speed
    # drifts between runs, it says how much training the teacher saves at equal loss.
    step_frontier = build_frontier([(per_arm[a.name]["optimizer_steps"]["mean"],
                                     per_arm[a.name]["final_loss"]["mean"]) for a in baselines])
    target_arm = next((a.name for a in baselines if a.name == TARGET_ARM),
                      baselines[-1].name if baselines else None)  # else: the largest budget
    target = per_arm[target_arm]["final_loss"]["mean"] if target_arm else None
    baseline_time = frontier_time(frontier, target) if target is not None else None

    for arm in arms:
        for r in runs.get(arm.name, {}).values():
            curve = [(p[0], p[1]) for p in r["curve"]]
            r["time_to_target"] = time_to_target(curve, target) if target is not None else None
            tokens = [(p[3], p[1]) for p in r["curve"] if p[3] is not None]
            r["tokens_to_target"] = time_to_target(tokens, target) if target is not None else None
            r["saving"] = saving(r["time_to_target"], baseline_time)
            r["frontier_time_at_final"] = frontier_time(frontier, r["final_loss"])
            r["saving_at_final"] = saving(r["train_time"], r["frontier_time_at_final"])
            r["steps_saving_at_final"] = saving(r["optimizer_steps"],
                                                frontier_time(step_frontier, r["final_loss"]))
        rs = list(runs.get(arm.name, {}).values())
        for k in ("time_to_target", "tokens_to_target", "saving", "saving_at_final",
                  "steps_saving_at_final"):
            per_arm[arm.name][k] = spread([r[k] for r in rs])
    return {"target": {"arm": target_arm, "loss": target, "frontier_time": baseline_time},
            "frontier": {"points": points,
                         "monotone": [{"time": t, "loss": loss} for t, loss in frontier],
                         "steps": [{"steps": t, "loss": loss} for t, loss in step_frontier]},
            "arms": per_arm}


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


def markdown(arms: Sequence[Arm], result: dict) -> str:
    """ttq.md: the target, the frontier and one table row per arm."""
    tgt, per_arm = result["target"], result["arms"]
    lines = ["# Time to quality", ""]
    if tgt["loss"] is None:
        lines.append("No full-data baseline finished: no target, no frontier, no savings.")
    else:
        bt = "out of the frontier's range" if tgt["frontier_time"] is None else \
            f"{tgt['frontier_time']:,.1f} s on the frontier"
        lines.append(f"Target: validation loss **{tgt['loss']:.4f}** (mean final loss of "
                     f"{tgt['arm']}); the full-data baseline reaches it in {bt}. Frontier "
                     "(mean training time, mean final loss): " +
                     ", ".join(f"{p['arm']} {p['time']:,.1f} s / {p['loss']:.4f}"
                               for p in result["frontier"]["points"]) + ".")
    lines += ["", "Times are training wall-clock seconds (evaluation excluded, teacher phases "
              "included). Saving = 1 − time to target / frontier time to target; at final loss = "
              "1 − training time / frontier time to the arm's final loss (out of range: that loss "
              "lies outside the baselines' losses); in steps = the same on the compute clock (optimizer "
              "steps, immune to a host's speed drift). Positive = faster than plain DeepSpeed. "
              "± is the sample standard deviation over seeds; [min, max] over seeds.", ""]
    lines += ["| arm | seeds | train time (s) | final val loss | time to target (s) | saving "
              "[min, max] | saving at final loss [min, max] | in steps [min, max] | teacher time (s) "
              "| examples trained | peak GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        a = per_arm[arm.name]
        n = a["train_time"]["n"]
        ttt = a["time_to_target"]
        ttt_cell = _pm(ttt) if ttt["mean"] is not None else ("never" if ttt["missing"] else "–")
        if ttt["mean"] is not None and ttt["missing"]:
            ttt_cell += f" ({ttt['n']}/{ttt['n'] + ttt['missing']} seeds)"
        peak = _pm(a["peak_memory_gib"], 2) if a["peak_memory_gib"]["mean"] is not None else "n/a"
        lines.append(f"| {arm.name} | {n} | {_pm(a['train_time'])} | {_pm(a['final_loss'], 4)} | "
                     f"{ttt_cell} | {_saving_cell(a['saving'], 'never')} | "
                     f"{_saving_cell(a['saving_at_final'], 'out of range')} | "
                     f"{_saving_cell(a['steps_saving_at_final'], 'out of range')} | "
                     f"{_pm(a['teacher_time'], 2)} | "
                     f"{_pm(a['examples_trained'], 0)} | {peak} |")
    return "\n".join(lines) + "\n"


def plot(arms: Sequence[Arm], runs: dict[str, dict[int, dict]], result: dict, path: Path,
         title: str = "") -> Path:
    """ttq.png: validation loss against training wall-clock, every arm (seeds thin, their mean
    thick), the frontier's points connected, the target as a horizontal line; the right panel
    zooms on the losses around the frontier."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 5.6))
    axes = fig.subplots(1, 2)
    tab, blues = colormaps["tab10"], colormaps["Blues"]
    order = (1, 2, 4, 5, 6, 8, 9, 3, 7, 0)  # tab10 without its blue first (baselines are blue)
    teachers = [a for a in arms if not a.baseline]
    colors = {a.name: blues(0.35 + 0.6 * a.budget) for a in arms if a.baseline}
    colors.update({a.name: tab(order[i % len(order)]) for i, a in enumerate(teachers)})
    frontier = result["frontier"]
    target = result["target"]["loss"]

    def draw(ax, legend: bool) -> None:
        for arm in arms:
            seeds = runs.get(arm.name, {})
            if not seeds:
                continue
            color = colors[arm.name]
            for r in seeds.values():
                ax.plot([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], color=color,
                        lw=0.7, alpha=0.35)
            mean = seed_mean_curve([[(p[0], p[1], p[2]) for p in r["curve"]]
                                    for r in seeds.values()])
            ax.plot([p[0] for p in mean], [p[1] for p in mean], color=color,
                    lw=1.4 if arm.baseline else 2.2, ls="--" if arm.baseline else "-",
                    label=f"{arm.name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
        if frontier["points"]:
            ax.plot([p["time"] for p in frontier["monotone"]],
                    [p["loss"] for p in frontier["monotone"]], color="black", lw=1.2,
                    label="full-data frontier")
            ax.plot([p["time"] for p in frontier["points"]],
                    [p["loss"] for p in frontier["points"]], ls="none", marker="s", ms=6,
                    color="black")
            for p in frontier["points"]:
                ax.annotate(p["arm"], (p["time"], p["loss"]), textcoords="offset points",
                            xytext=(4, 5), fontsize=8)
        if target is not None:
            ax.axhline(target, color="crimson", ls=":", lw=1.3,
                       label=f"target {target:.4f} ({result['target']['arm']} mean)")
        ax.set_xlabel("training wall-clock (s, evaluation excluded)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(loc="upper right", fontsize=8)

    draw(axes[0], legend=True)
    axes[0].set_title("validation loss vs training time")
    draw(axes[1], legend=False)
    finals = [r["final_loss"] for rs in runs.values() for r in rs.values()]
    tops = [p["loss"] for p in frontier["points"]] + ([target] if target is not None else [])
    if finals and tops:
        lo, hi = min(finals + tops), max(finals + tops)
        pad = max(0.15 * (hi - lo), 0.01 * abs(hi), 1e-3)
        top = hi + 2 * pad
        axes[1].set_ylim(lo - pad, top)
        # Start the zoom where the first curve comes into its loss range.
        entry = [time_to_target([(p[0], p[1]) for p in r["curve"]], top)
                 for rs in runs.values() for r in rs.values()]
        entry = [t for t in entry if t is not None]
        end = max(r["train_time"] for rs in runs.values() for r in rs.values())
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
    p.add_argument("--data", default=".cache/stdlib-corpus",
                   help="prepared corpus (the first run builds it when missing)")
    p.add_argument("--arms", default=DEFAULT_ARMS, help="comma list of: " + allowed_arms())
    p.add_argument("--seeds", default="0,1", help="comma list; every arm runs once per seed")
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="demo")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training data")
    p.add_argument("--micro", type=int, default=16, help="micro batch per rank")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--eval-every", type=int, default=50,
                   help="optimizer steps between evaluations (the curves' resolution)")
    p.add_argument("--eval-samples", type=int, default=256, help="validation sequences per eval")
    p.add_argument("--seq-len", type=int, help="corpus option, when --data is built here")
    p.add_argument("--vocab-size", type=int, help="corpus option, when --data is built here")
    p.add_argument("--max-bytes", type=int, help="corpus option (0 = all the source)")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks per run (>1 launches each run with torchrun)")
    p.add_argument("--gpus", default=None,
                   help="comma list of CUDA devices (e.g. 0,1,2,3): run that many runs at once, "
                        "each on its own device(s); with --nproc N each slot is N devices "
                        "(e.g. 0+1,2+3). Default: one run at a time on what the job sees")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs in --out that finished with the identical config and command")
    p.add_argument("--run-plots", action="store_true", help="also write each run's metrics.png")
    p.add_argument("--dry-run", action="store_true", help="print the runs' commands and exit")
    p.add_argument("--reanalyze", action="store_true",
                   help="run nothing: rebuild ttq.json/md/png from the runs' metrics already in "
                        "--out (e.g. copied from the GPU host); unfinished runs are left out")
    args = p.parse_args(argv)
    try:
        args.arm_list = parse_arms(args.arms)
        args.seed_list = parse_seeds(args.seeds)
    except ArmError as exc:
        p.error(str(exc))
    if args.nproc < 1:
        p.error("--nproc must be >= 1")
    args.gpu_slots = None
    if args.gpus is not None:
        slots = [g.strip().replace("+", ",") for g in args.gpus.split(",") if g.strip()]
        if not slots or any(not re.fullmatch(r"\d+(,\d+)*", g) for g in slots):
            p.error(f"--gpus: got {args.gpus!r}; allowed: device numbers separated by commas, "
                    "a slot of several devices joined by + (e.g. 0,1 or 0+1,2+3)")
        if any(len(g.split(",")) != args.nproc for g in slots):
            p.error(f"--gpus: every slot must hold --nproc={args.nproc} devices; got {args.gpus!r}")
        args.gpu_slots = slots
    args.out = Path(args.out).expanduser().resolve()
    args.data = Path(args.data).expanduser().resolve()  # runs may start from another directory
    return args


def execute_plan(plan: Sequence[Run], runs: dict[str, dict[int, dict]], resume: bool,
                 gpu_slots: Optional[Sequence[str]] = None) -> int:
    """Run (or, with ``resume``, reuse) every run of the plan; fill ``runs[arm][seed]``.

    Without ``gpu_slots`` runs go one after another. With slots, each slot (a CUDA device list)
    takes the next run in plan order as soon as it is free, so several runs share the machine; their
    wall-clock times then include that sharing, while steps and losses do not depend on it.
    Returns 0, or the exit code of the first run that failed (no new run starts after a failure).
    """
    lock = threading.Lock()
    start_gate = threading.Lock() if gpu_slots else None
    queue = list(enumerate(plan, 1))
    failed: list[int] = []

    def finish(i: int, run: Run, how: str) -> None:
        r = load_run(run.metrics)
        r.update(seed=run.seed, dir=str(run.dir))
        with lock:
            runs[run.arm.name][run.seed] = r
            print(f"[ttq {i}/{len(plan)}] {run.arm.name} seed {run.seed}: {how}; "
                  f"{r['optimizer_steps']} steps, training time {r['train_time']:.1f} s, final "
                  f"val loss {r['final_loss']:.4f}", flush=True)

    def worker(gpu: Optional[str]) -> None:
        while True:
            with lock:
                if failed or not queue:
                    return
                i, run = queue.pop(0)
            tag = f"[ttq {i}/{len(plan)}] {run.arm.name} seed {run.seed}"
            if resume and run.finished():
                finish(i, run, "reused (--resume)")
                continue
            where = "" if gpu is None else f" on CUDA device(s) {gpu}"
            print(f"{tag}: running{where}, log {run.log}", flush=True)
            start = time.perf_counter()
            rc = run.execute(gpu, start_gate)
            if rc != 0:
                with lock:
                    failed.append(rc)
                    tail = run.log.read_text(errors="replace").splitlines()[-15:]
                    print("\n".join(tail), file=sys.stderr)
                    print(f"{tag}: FAILED with exit code {rc}; log: {run.log}", file=sys.stderr,
                          flush=True)
                return
            finish(i, run, f"done in {time.perf_counter() - start:.1f} s")

    if not gpu_slots:
        worker(None)
    else:
        threads = [threading.Thread(target=worker, args=(g,)) for g in gpu_slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return failed[0] if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    arms, seeds, out = args.arm_list, args.seed_list, args.out
    # Seed-major order: a drift of the machine's speed spreads over every arm.
    plan = [make_run(args, arm, seed) for seed in seeds for arm in arms]
    if args.dry_run:
        for run in plan:
            print(" ".join(run.command))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[int, dict]] = {arm.name: {} for arm in arms}
    print(f"[ttq] {len(arms)} arms x {len(seeds)} seeds = {len(plan)} runs into {out}", flush=True)
    if args.reanalyze:
        for run in plan:
            try:
                r = load_run(run.metrics)
            except (OSError, RuntimeError) as exc:
                print(f"[ttq] {run.arm.name} seed {run.seed}: left out ({exc})", flush=True)
                continue
            r.update(seed=run.seed, dir=str(run.dir))
            runs[run.arm.name][run.seed] = r
    else:
        rc = execute_plan(plan, runs, args.resume, args.gpu_slots)
        if rc != 0:
            return rc

    result = analyze(arms, runs)
    meta_file = args.data / "meta.json"
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("arm_list", "seed_list", "gpu_slots")},
        "corpus": json.loads(meta_file.read_text()) if meta_file.exists() else None,
        "seeds": seeds,
        "arm_specs": {a.name: {"budget_fraction": a.budget, "attent": a.section,
                               "source": a.source} for a in arms},
        **result,
        "runs": {name: {str(s): r for s, r in rs.items()} for name, rs in runs.items()},
    }
    (out / "ttq.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(arms, result)
    (out / "ttq.md").write_text(table)
    plot(arms, runs, result, out / "ttq.png",
         title=f"{args.model}, {args.epochs} passes, seeds {args.seeds}")
    print(f"\n{table}\nresults: {out / 'ttq.json'}  {out / 'ttq.md'}  {out / 'ttq.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
