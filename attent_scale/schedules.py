"""Ratio and interval schedules, unrolled into a per-pass plan before training starts.

A *pass* is one sweep over a set of ids: either the whole dataset (a full pass) or the teacher's
selection (a subset pass). The plan is fixed in advance, so the total number of samples (and hence
the learning-rate schedule of each arm) is known at step 0 and budget-matched controls can be built
from it.

Pure module: no torch.distributed, DeepSpeed or streaming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from .config import AttentConfig, IntervalSchedule, RatioSchedule, config_error
from .policy import round_budget


@dataclass(frozen=True)
class PassPlan:
    index: int
    kind: Literal["full", "subset"]
    ratio: float
    """Share of the dataset this pass trains (1.0 for full passes)."""
    select: bool
    """The teacher draws a new selection at the start of this pass (needs fresh scores)."""
    round: int
    """Selection round this pass belongs to (-1 for warm-up and between-round full passes)."""


def ratio_at(schedule: RatioSchedule, progress: float) -> float:
    """Ratio at training progress ``progress`` in [0, 1]."""
    x = min(max(progress, 0.0), 1.0)
    if schedule.schedule == "constant":
        return schedule.value
    if schedule.schedule == "incremental":
        return schedule.start + (schedule.end - schedule.start) * x
    if schedule.schedule == "cosine":
        return schedule.end + (schedule.start - schedule.end) * 0.5 * (1.0 + math.cos(math.pi * x))
    # step: equal shares of the progress; x == 1 belongs to the last share.
    i = min(int(x * len(schedule.values)), len(schedule.values) - 1)
    return schedule.values[i]


def interval_at(schedule: IntervalSchedule, round_index: int, remaining: int) -> int:
    """Passes that selection round ``round_index`` lasts, given ``remaining`` passes left."""
    if schedule.schedule == "once":
        return remaining
    if schedule.schedule == "fixed":
        return schedule.every
    return min(schedule.every + round_index * schedule.growth, schedule.max)


def build_plan(cfg: AttentConfig, num_passes: int) -> list[PassPlan]:
    """Unroll the schedules into one :class:`PassPlan` per pass.

    Warm-up passes come first, ``final_full_passes`` last (both full); the rounds fill the passes
    between, and the ratio schedule's progress runs over those passes only. When warm-up and
    final passes leave none, every pass is full (:func:`check_plan` reports that as a problem).
    """
    if num_passes < 1:
        raise ValueError(f"num_passes must be >= 1, got {num_passes}")
    plan: list[PassPlan] = []
    warm = min(cfg.warmup_passes, num_passes)
    plan.extend(PassPlan(p, "full", 1.0, False, -1) for p in range(warm))
    end = max(warm, num_passes - cfg.final_full_passes)  # first final full pass
    first, last = warm, end - 1
    p, k = warm, 0
    while p < end:
        progress = (p - first) / (last - first) if last > first else 1.0
        ratio = ratio_at(cfg.ratio, progress)
        length = min(interval_at(cfg.interval, k, end - p), end - p)
        for j in range(length):
            select = j == 0 or cfg.selection.resample_each_pass
            plan.append(PassPlan(p + j, "subset", ratio, select, k))
        p += length
        for _ in range(min(cfg.full_passes_per_round, end - p)):
            plan.append(PassPlan(p, "full", 1.0, False, -1))
            p += 1
        k += 1
    plan.extend(PassPlan(q, "full", 1.0, False, -1) for q in range(end, num_passes))
    return plan


def check_plan(cfg: Optional[AttentConfig], num_passes: int, num_samples: Optional[int] = None,
               global_batch: Optional[int] = None) -> list[str]:
    """Problems of a run's plan, one line each (key, value, allowed, fix); [] when it is sound.

    Pure and cheap: a job calls it (or :func:`require_plan`) before it builds a model, so a run
    that would never select, or whose budget rounds to nothing, stops at once. With
    ``num_samples`` and ``global_batch`` it also checks that every subset pass trains at least
    one global batch (otherwise the teacher raises at that pass, hours into the run).
    """
    if num_passes < 1:
        return [f"passes: got {num_passes}; allowed: an integer >= 1; fix: train at least one "
                "pass (the job's --epochs or num_train_epochs)"]
    if cfg is None:
        return []
    warm, final = cfg.warmup_passes, cfg.final_full_passes
    allowed = f"allowed: warmup_passes + final_full_passes < {num_passes} (the passes)"
    fix = f"or train more than {warm + final} passes"
    if warm >= num_passes:
        return [f"attent.warmup_passes: got {warm} with {num_passes} passes; the teacher would "
                f"never select; {allowed}; fix: lower attent.warmup_passes {fix}"]
    if warm + final >= num_passes:
        return [f"attent.final_full_passes: got {final} with attent.warmup_passes {warm} and "
                f"{num_passes} passes; the teacher would never select (every pass is full); "
                f"{allowed}; fix: lower attent.final_full_passes or attent.warmup_passes {fix}"]
    problems = []
    if num_samples is not None and global_batch is not None:
        for step in build_plan(cfg, num_passes):
            if step.kind == "subset" and round_budget(num_samples, step.ratio, global_batch) == 0:
                problems.append(
                    f"attent.ratio: pass {step.index} trains ratio {step.ratio:.4f} x "
                    f"{num_samples} samples, less than one global batch of {global_batch}; "
                    f"allowed: a ratio >= {global_batch / num_samples:.4f} at every subset pass; "
                    "fix: raise attent.ratio (its value or start), use more data or a smaller "
                    "batch")
                break
    return problems


def require_plan(cfg: Optional[AttentConfig], num_passes: int, num_samples: Optional[int] = None,
                 global_batch: Optional[int] = None) -> None:
    """:func:`check_plan`, raising one :class:`~attent_scale.config.ConfigError` if it finds any."""
    problems = check_plan(cfg, num_passes, num_samples, global_batch)
    if problems:
        raise config_error(problems)


def full_plan(num_passes: int) -> list[PassPlan]:
    """The plan of a job without a teacher: every pass is full."""
    return [PassPlan(p, "full", 1.0, False, -1) for p in range(num_passes)]
