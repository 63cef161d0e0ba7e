"""The FSDP2 adapter: the DeepSpeed-style JSON read for ``fully_shard``, and DCP checkpoints.

The same config file drives both loops. Its ``attent`` section is parsed exactly as for DeepSpeed
(:func:`attent_scale.config.split_deepspeed_config`); of the rest, FSDP2 reads the batch sizes,
gradient clipping, the Adam/AdamW optimizer, the WarmupCosineLR schedule and ``bf16``. DeepSpeed's
own sections (``zero_optimization``, ``steps_per_print``...) are ignored with a note: FSDP2 always
shards parameters, gradients and optimizer state, which is what ZeRO-3 does.

This module never imports deepspeed (a slow import that probes accelerators): the two small pieces
of deepspeed_plugin it needs, the batch arithmetic and the ``"auto"`` schedule lengths, are
restated here with the same rules.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .checkpoint import commit, latest_tag, read_trainer_state  # noqa: F401
from .config import ConfigError
from .teaching import Teaching

SCHEDULER_STATE = "lr_scheduler.json"
# Top-level keys that only configure DeepSpeed itself; FSDP2 has no use for them.
DEEPSPEED_ONLY = ("zero_optimization", "steps_per_print", "wall_clock_breakdown",
                  "zero_allow_untested_optimizer", "communication_data_type", "prescale_gradients",
                  "gradient_predivide_factor", "activation_checkpointing", "flops_profiler",
                  "comms_logger")


@dataclass(frozen=True)
class WarmupCosine:
    """DeepSpeed's WarmupCosineLR shape: warm up to the base lr, then cosine down to a floor."""
    total_num_steps: int
    warmup_num_steps: int
    warmup_min_ratio: float = 0.0        # lr share at step 0
    cos_min_ratio: float = 0.0001        # lr share at the end
    warmup_type: Literal["log", "linear"] = "log"

    def ratio(self, step: int) -> float:
        """Multiplier of the base lr for optimizer step ``step`` (0-based)."""
        warmup = max(2, self.warmup_num_steps)
        if step < warmup:
            rise = (math.log(step + 1) / math.log(warmup) if self.warmup_type == "log"
                    else step / warmup)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * rise
        progress = min(1.0, (step - warmup + 1) / max(1, self.total_num_steps - warmup))
        return self.cos_min_ratio + (1.0 - self.cos_min_ratio) * (1 + math.cos(math.pi * progress)) / 2


@dataclass(frozen=True)
class TrainConfig:
    """What the FSDP2 loop takes from the DeepSpeed-style JSON (same keys, same meaning)."""
    micro_batch: int                     # train_micro_batch_size_per_gpu
    grad_accum: int                      # gradient_accumulation_steps
    global_batch: int                    # micro x accumulation x data-parallel ranks
    grad_clip: float                     # gradient_clipping (0: off)
    adam: dict                           # optimizer.params given (lr, betas, eps, weight_decay)
    decoupled_weight_decay: bool         # AdamW (DeepSpeed's default for "Adam" too)
    schedule: Optional[dict]             # scheduler.params of WarmupCosineLR; None: constant lr
    bf16: bool                           # bf16.enabled: bf16 compute, fp32 gradient reduction
    notes: list[str] = field(default_factory=list)  # keys ignored, printed once at start


def parse_train_config(cfg: dict, world: int, cuda: bool) -> TrainConfig:
    """Read the non-``attent`` part of the config; every problem is reported at once."""
    problems, notes = [], []

    def positive_int(key: str, default: Optional[int]) -> int:
        value = cfg.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{key}: got {value!r}; allowed: a positive integer")
            return 1
        return value

    micro = positive_int("train_micro_batch_size_per_gpu", None)
    gas = positive_int("gradient_accumulation_steps", 1)
    total = cfg.get("train_batch_size")
    if total is not None and total != micro * gas * world:
        problems.append(f"train_batch_size: got {total}; allowed: micro batch {micro} x gradient "
                        f"accumulation {gas} x world size {world} = {micro * gas * world}; "
                        "fix: remove it or make it agree")
    clip = cfg.get("gradient_clipping", 0.0)
    if not isinstance(clip, (int, float)) or clip < 0:
        problems.append(f"gradient_clipping: got {clip!r}; allowed: a number >= 0 (0: off)")
        clip = 0.0

    opt = cfg.get("optimizer", {"type": "AdamW", "params": {}})
    opt_type = opt.get("type")
    params = dict(opt.get("params", {}))
    if opt_type not in ("Adam", "AdamW"):
        problems.append(f"optimizer.type: got {opt_type!r}; allowed: 'Adam', 'AdamW' under FSDP2")
    # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false.
    decoupled = bool(params.pop("adam_w_mode", True)) or opt_type == "AdamW"
    params.pop("torch_adam", None)  # DeepSpeed's choice of kernel; FSDP2 always uses torch's
    unknown = sorted(set(params) - {"lr", "betas", "eps", "weight_decay"})
    if unknown:
        problems.append(f"optimizer.params: unknown keys {unknown}; allowed: lr, betas, eps, "
                        "weight_decay, torch_adam, adam_w_mode")
    if "betas" in params:
        params["betas"] = tuple(params["betas"])

    schedule = None
    sched = cfg.get("scheduler")
    if sched is not None:
        if sched.get("type") != "WarmupCosineLR":
            problems.append(f"scheduler.type: got {sched.get('type')!r}; allowed: "
                            "'WarmupCosineLR' under FSDP2 (or no scheduler: constant lr)")
        schedule = dict(sched.get("params", {}))
        unknown = sorted(set(schedule) - set(WarmupCosine.__dataclass_fields__))
        if unknown:
            problems.append(f"scheduler.params: unknown keys {unknown}; allowed: "
                            f"{sorted(WarmupCosine.__dataclass_fields__)}")
        if schedule.get("warmup_type", "log") not in ("log", "linear"):
            problems.append(f"scheduler.params.warmup_type: got {schedule['warmup_type']!r}; "
                            "allowed: 'log', 'linear'")

    if cfg.get("fp16", {}).get("enabled"):
        problems.append("fp16.enabled: got true; allowed: false under FSDP2 (fp16 needs loss "
                        'scaling); fix: use "bf16": {"enabled": true}')
    bf16 = cfg.get("bf16", {}).get("enabled", False)
    bf16 = cuda if bf16 == "auto" else bool(bf16)  # "auto": as deepspeed_plugin.resolve_auto
    if bf16 and not cuda:
        # bf16 matmuls on CPU are emulated and slower than fp32: keep CPU runs (tests) in fp32.
        notes.append("bf16.enabled ignored on CPU: training in fp32")
        bf16 = False
    ignored = [k for k in DEEPSPEED_ONLY if k in cfg]
    if ignored:
        notes.append(f"ignored under FSDP2 (DeepSpeed settings): {', '.join(ignored)}; "
                     "FSDP2 shards parameters, gradients and optimizer state like ZeRO-3")
    if problems:
        raise ConfigError(f"invalid config for FSDP2 ({len(problems)} problems):\n  " +
                          "\n  ".join(problems))
    return TrainConfig(micro, gas, micro * gas * world, float(clip), params, decoupled, schedule,
                       bf16, notes)


def shard(model: torch.nn.Module, bf16: bool) -> torch.nn.Module:
    """``fully_shard`` every transformer block, then the root (embeddings, norm, LM head).

    One FSDP unit per block lets a forward all-gather one block at a time and free it after use
    (``reshard_after_forward``), so no rank ever holds the whole model. Blocks are found by the
    class names a transformers model lists in ``_no_split_modules``.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class in "
                         "_no_split_modules; FSDP2 needs one to shard per block")
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16 else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mp_policy=mp, reshard_after_forward=True)
    return model


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, planned_steps: int
                    ) -> tuple[torch.optim.Optimizer, Optional[torch.optim.lr_scheduler.LambdaLR]]:
    """Adam(W) over the sharded parameters and the WarmupCosineLR schedule of this arm.

    ``"auto"`` lengths follow deepspeed_plugin.resolve_auto: the whole planned run, and a
    twentieth of it for warm-up, so each arm's schedule completes within its own budget.
    """
    cls = torch.optim.AdamW if tc.decoupled_weight_decay else torch.optim.Adam
    optimizer = cls(model.parameters(), **tc.adam)
    if tc.schedule is None:
        return optimizer, None
    params = dict(tc.schedule)
    if params.get("total_num_steps", "auto") == "auto":
        params["total_num_steps"] = max(1, planned_steps)
    if params.get("warmup_num_steps", "auto") == "auto":
        params["warmup_num_steps"] = max(1, planned_steps // 20)
    shape = WarmupCosine(**params)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, shape.ratio)


def init_distributed(cuda: bool) -> None:
    """The process group FSDP2 shards over: NCCL between GPUs, gloo between CPU processes."""
    dist.init_process_group(backend="nccl" if cuda else "gloo")


def save_checkpoint(model, optimizer, scheduler, teaching: Teaching, save_dir: Path, tag: str,
                    state: dict) -> None:
    """Collective: sharded model + optimizer (DCP), then teacher, schedule and trainer state,
    then the ``latest`` pointer.

    Every rank writes its own shards; ``latest`` moves only after every file of the new
    checkpoint exists, so a job killed while saving resumes from the previous checkpoint.
    """
    teaching.flush()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(save_dir / tag / "dcp"))
    files = {}
    if scheduler is not None:
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        files[SCHEDULER_STATE] = json.dumps(sched)
    commit(teaching, save_dir, tag, state, files)


def load_checkpoint(model, optimizer, scheduler, teaching: Teaching, load_dir: Path,
                    pass_index: Optional[int] = None) -> None:
    """Collective: load model, optimizer, schedule and teacher from ``load_dir/latest``.

    Every rank reads just its own shards. DCP opens the tensor files with ``weights_only=True``
    but its ``.metadata`` index is a pickle: resume only from checkpoints this project wrote.
    """
    tag = latest_tag(load_dir)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(load_dir / tag / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    if scheduler is not None:
        sched = json.loads((load_dir / tag / SCHEDULER_STATE).read_text())
        scheduler.load_state_dict({**sched, "lr_lambdas": [None] * len(optimizer.param_groups)})
    teaching.load(load_dir / tag, pass_index)
