"""The DeepSpeed adapter: config split, engine set-up, and checkpoints that carry the teacher.

A DeepSpeed config with an ``"attent"`` section is the only switch. This module hands DeepSpeed
exactly the user's config minus that section, so the job without it is plain DeepSpeed, and stores
the teacher's and trainer's state as plain JSON/NPZ inside DeepSpeed's own checkpoint directory.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch

from .comm import make_comm
from .teacher import Teacher

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"


def global_batch_size(ds_config: dict, world: int) -> tuple[int, int]:
    """(micro batch per rank, samples per optimizer step over the data-parallel group)."""
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    gas = ds_config.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or micro < 1:
        raise ValueError("train_micro_batch_size_per_gpu must be set to a positive integer in the "
                         f"DeepSpeed config (got {micro!r}); attent-scale needs it to plan passes")
    if not isinstance(gas, int) or gas < 1:
        raise ValueError(f"gradient_accumulation_steps must be a positive integer (got {gas!r})")
    total = ds_config.get("train_batch_size")
    if total is not None and total != micro * gas * world:
        raise ValueError(f"train_batch_size={total} != micro batch {micro} x gradient accumulation "
                         f"{gas} x world size {world}; remove train_batch_size or make it agree")
    return micro, micro * gas * world


def resolve_auto(ds_config: dict, optimizer_steps: int) -> dict:
    """Fill ``"auto"`` scheduler lengths from the planned optimizer steps of this arm.

    Each arm (teacher or not) gets a learning-rate schedule that completes within its own budget:
    comparing against a baseline frozen mid-schedule would flatter the teacher.
    """
    out = copy.deepcopy(ds_config)
    params = out.get("scheduler", {}).get("params", {})
    if params.get("total_num_steps") == "auto":
        params["total_num_steps"] = max(1, optimizer_steps)
    if params.get("warmup_num_steps") == "auto":
        params["warmup_num_steps"] = max(1, optimizer_steps // 20)
    return out


def initialize(model: torch.nn.Module, ds_config: dict):
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config)
    return engine


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(engine, teacher: Teacher, save_dir: Path, tag: str, state: dict) -> None:
    """Collective: DeepSpeed state, then teacher and trainer state, then the ``latest`` pointer.

    ``latest`` moves only after every file of the new checkpoint exists, so a job killed while
    saving resumes from the previous checkpoint.
    """
    teacher.sync()
    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    comm = make_comm()
    if comm.rank == 0:
        teacher.save(save_dir / tag)
        _write_atomic(save_dir / tag / TRAINER_STATE, json.dumps(state, indent=1))
    comm.barrier()
    if comm.rank == 0:
        _write_atomic(save_dir / LATEST, tag)
    comm.barrier()


def load_checkpoint(engine, teacher: Teacher, load_dir: Path) -> Optional[dict[str, Any]]:
    """Resume from ``load_dir/latest`` if present; returns the trainer state or None."""
    latest = load_dir / LATEST
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    teacher.load_state_dict(*Teacher.read(load_dir / tag))
    return json.loads((load_dir / tag / TRAINER_STATE).read_text())
