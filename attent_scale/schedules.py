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
from typing import Literal

from .config import AttentConfig, IntervalSchedule, RatioSchedule


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
    """Unroll the schedules into one :class:`PassPlan` per pass."""
    if num_passes < 1:
        raise ValueError(f"num_passes must be >= 1, got {num_passes}")
    plan: list[PassPlan] = []
    warm = min(cfg.warmup_passes, num_passes)
    plan.extend(PassPlan(p, "full", 1.0, False, -1) for p in range(warm))
    first, last = warm, num_passes - 1
    p, k = warm, 0
    while p < num_passes:
        progress = (p - first) / (last - first) if last > first else 1.0
        ratio = ratio_at(cfg.ratio, progress)
        length = min(interval_at(cfg.interval, k, num_passes - p), num_passes - p)
        for j in range(length):
            select = j == 0 or cfg.selection.resample_each_pass
            plan.append(PassPlan(p + j, "subset", ratio, select, k))
        p += length
        for _ in range(min(cfg.full_passes_per_round, num_passes - p)):
            plan.append(PassPlan(p, "full", 1.0, False, -1))
            p += 1
        k += 1
    return plan


def full_plan(num_passes: int) -> list[PassPlan]:
    """The plan of a job without a teacher: every pass is full."""
    return [PassPlan(p, "full", 1.0, False, -1) for p in range(num_passes)]
