"""The DeepSpeed adapter: config split, engine set-up, and checkpoints that carry the teacher.

A DeepSpeed config with an ``"attent"`` section is the only switch. This module hands DeepSpeed
exactly the user's config minus that section, so the job without it is plain DeepSpeed, and stores
the teacher's and trainer's state as plain JSON/NPZ inside DeepSpeed's own checkpoint directory.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch

from .checkpoint import TRAINER_STATE, commit, latest_tag, read_trainer_state  # noqa: F401
from .comm import make_comm
from .teacher import Teacher


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
    if isinstance(total, int) and total % world:
        raise ValueError(f"train_batch_size={total} is not divisible by the world size {world} "
                         f"(micro batch x gradient accumulation x ranks); set it to a multiple "
                         f"of {world}, e.g. {micro * gas * world}, or remove it")
    if total is not None and total != micro * gas * world:
        raise ValueError(f"train_batch_size={total} != micro batch {micro} x gradient accumulation "
                         f"{gas} x world size {world}; remove train_batch_size or make it agree")
    return micro, micro * gas * world


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


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


def save_checkpoint(engine, teacher: Teacher, save_dir: Path, tag: str, state: dict) -> None:
    """Collective: DeepSpeed state, then teacher and trainer state, then the ``latest`` pointer.

    ``latest`` moves only after every file of the new checkpoint exists, so a job killed while
    saving resumes from the previous checkpoint.
    """
    teacher.sync()
    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    commit(make_comm(), teacher, save_dir, tag, state)


def check_weights_only(tag_dir: Path) -> None:
    """Refuse a checkpoint whose files hold anything but tensors and plain containers.

    DeepSpeed 0.19 loads its own files with full unpickling (``weights_only`` off), which can run
    arbitrary code. Opening every file first with ``weights_only=True`` (memory-mapped,
    so nothing is copied) means DeepSpeed only ever unpickles files that are plain data.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # The only classes DeepSpeed's own files name besides tensors: plain records and an enum.
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    for path in sorted(tag_dir.glob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any failure means "not plain data"
            lines = str(exc).splitlines() or [type(exc).__name__]
            why = next((ln.strip() for ln in lines if "Unsupported global" in ln), lines[0])
            raise RuntimeError(f"{path} is not plain tensor data (torch.load weights_only=True "
                               f"refused it: {why}); it will not be loaded") from None


def load_checkpoint(engine, teacher: Teacher, load_dir: Path,
                    load_optimizer_states: bool = True) -> Optional[dict[str, Any]]:
    """Resume from ``load_dir/latest`` if present; returns the trainer state or None.

    ``load_optimizer_states=False`` (a resume on another data-parallel size): DeepSpeed cannot
    re-partition ZeRO optimizer state, so the weights load and the optimizer restarts from them.
    """
    tag = latest_tag(load_dir)
    if tag is None:
        return None
    check_weights_only(load_dir / tag)
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag,
                                     load_optimizer_states=load_optimizer_states)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    teacher.load_state_dict(*Teacher.read(load_dir / tag))
    return json.loads((load_dir / tag / TRAINER_STATE).read_text())
