"""The DeepSpeed adapter: ``attent_scale.initialize``, config split, and checkpoints with the teacher.

:func:`initialize` is a drop-in for ``deepspeed.initialize``: the same arguments and return tuple,
plus ``passes`` (what the teacher plans). An ``"attent"`` section in the config switches the
teacher on; without it the call is exactly ``deepspeed.initialize``. DeepSpeed always receives the
user's config minus that section, with ``"auto"`` schedule lengths filled from the plan.

With the section, the returned ``training_dataloader`` yields, pass after pass, this rank's share of
the teacher's selection (every selected id once across the data-parallel group), and the engine
scores each training forward from its logits and labels (or input ids) on the way out: no other
line of the user's loop changes. ``engine.save_checkpoint`` / ``load_checkpoint`` carry the
teacher's state in the same checkpoint directory.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch

from .checkpoint import TRAINER_STATE, commit, latest_tag, read_trainer_state, write_atomic  # noqa: F401
from .comm import make_comm
from .config import SECTION, ConfigError, split_deepspeed_config
from .monitor import MonitorSink, open_monitor
from .sampler import AttentSampler, WithIds, collate_with_ids
from .signals import IGNORE_INDEX, causal_token_losses
from .teaching import Teaching


def global_batch_size(ds_config: dict, world: int) -> tuple[int, int]:
    """(micro batch per rank, samples per optimizer step over the data-parallel group)."""
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    gas = ds_config.get("gradient_accumulation_steps", 1)
    total = ds_config.get("train_batch_size")
    if micro is None and isinstance(total, int) and isinstance(gas, int) and gas >= 1 \
            and total % (gas * world) == 0:
        micro = total // (gas * world)  # DeepSpeed derives it the same way
    if not isinstance(micro, int) or micro < 1:
        raise ValueError("train_micro_batch_size_per_gpu must be set to a positive integer in the "
                         f"DeepSpeed config (got {micro!r}); attent-scale needs it to plan passes")
    if not isinstance(gas, int) or gas < 1:
        raise ValueError(f"gradient_accumulation_steps must be a positive integer (got {gas!r})")
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


def resolve_auto(ds_config: dict, optimizer_steps: Optional[int]) -> dict:
    """Fill ``"auto"`` values: scheduler lengths from the planned optimizer steps of this arm
    (left as they are when ``optimizer_steps`` is None), and ``bf16.enabled`` from the device
    (true where CUDA supports bf16, false on CPU).

    Each arm (teacher or not) gets a learning-rate schedule that completes within its own budget:
    comparing against a baseline frozen mid-schedule would flatter the teacher. bf16 on CPU is
    emulated and slower than float32, so one config serves a GPU job and a CPU test alike.
    """
    out = copy.deepcopy(ds_config)
    params = out.get("scheduler", {}).get("params", {}) if optimizer_steps is not None else {}
    if params.get("total_num_steps") == "auto":
        params["total_num_steps"] = max(1, optimizer_steps)
    if params.get("warmup_num_steps") == "auto":
        params["warmup_num_steps"] = max(1, optimizer_steps // 20)
    bf16 = out.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") == "auto":
        bf16["enabled"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return out


def build_engine(model: torch.nn.Module, ds_config: dict):
    """The DeepSpeed engine of ``model`` under a config whose lengths are already resolved."""
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config)
    return engine


# ---- attent_scale.initialize ------------------------------------------------------------------

def _read_config(args, config, config_params) -> dict:
    """The config deepspeed.initialize would read: ``config``, ``config_params`` or
    ``args.deepspeed_config``, as a dict (a path is loaded)."""
    if config is None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None)
    if from_args is not None:
        if config is not None:
            raise ValueError("a config was given both in args.deepspeed_config and config=; "
                             "give one of them")
        config = from_args
    if config is None:
        raise ValueError("no DeepSpeed config: pass config= (a dict or a JSON path) or "
                         "args.deepspeed_config")
    if isinstance(config, dict):
        return config
    path = Path(config)
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config ({exc})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the DeepSpeed config must be a JSON object")
    return loaded


def _without_config(args):
    """``args`` with its deepspeed_config cleared (we hand DeepSpeed the config ourselves)."""
    if getattr(args, "deepspeed_config", None) is None:
        return args
    args = copy.copy(args)
    args.deepspeed_config = None
    return args


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, distributed_port: int = 29500, mpu=None,
               dist_init_required: Optional[bool] = None, collate_fn=None, config=None,
               mesh_param=None, config_params=None, *, passes: Optional[int] = None,
               seed: int = 0, sources=None, reference=None, pool_scorer=None):
    """``deepspeed.initialize`` with the AtteNT teacher (see the module doc).

    Extra keyword arguments: ``passes`` (passes over ``training_data`` the run is planned for;
    required with the section, and used to fill ``"auto"`` schedule lengths without it), ``seed``
    (data order), ``sources`` / ``reference`` (per-sample ids / scores for the policies that need
    them), ``pool_scorer`` (``ids -> scores``, for ``source: pool``; by default the model is run
    on collated items under no_grad).

    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` like DeepSpeed.
    """
    raw = _read_config(args, config, config_params)
    ds_config, attent = split_deepspeed_config(raw)
    ds_args = _without_config(args)
    if SECTION in raw:  # checked before any process group exists
        if training_data is None:
            raise ValueError("the 'attent' section needs training_data= (the teacher chooses "
                             "from it); a loop that builds its own loader uses "
                             "attent_scale.AttentSampler")
        if not isinstance(passes, int) or passes < 1:
            raise ValueError(f"passes: got {passes!r}; the 'attent' section needs passes= (an "
                             "integer >= 1: the passes over training_data the run is planned "
                             "for)")
    from deepspeed.accelerator import get_accelerator
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               distributed_port=distributed_port,
                               dist_init_required=dist_init_required)
    comm = make_comm(mpu.get_data_parallel_group() if mpu is not None else None)
    if SECTION not in raw:
        steps = None
        if passes is not None and training_data is not None:
            # The "auto" lengths of full passes under the remainder rule.
            _, global_batch = global_batch_size(ds_config, comm.world)
            steps = passes * (len(training_data) // global_batch)
        ds_config = resolve_auto(ds_config, steps)
        return deepspeed.initialize(args=ds_args, model=model, optimizer=optimizer,
                                    model_parameters=model_parameters,
                                    training_data=training_data, lr_scheduler=lr_scheduler,
                                    distributed_port=distributed_port, mpu=mpu,
                                    dist_init_required=dist_init_required, collate_fn=collate_fn,
                                    config=ds_config, mesh_param=mesh_param)
    micro, global_batch = global_batch_size(ds_config, comm.world)
    teaching = Teaching(attent, len(training_data), passes, global_batch, comm=comm,
                        data_seed=seed, sources=sources, reference=reference, model=model)
    ds_config = resolve_auto(ds_config, teaching.planned_steps())
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        args=ds_args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        lr_scheduler=lr_scheduler, distributed_port=distributed_port, mpu=mpu,
        dist_init_required=dist_init_required, config=ds_config, mesh_param=mesh_param)
    collate = collate_with_ids(collate_fn)
    if teaching.cfg is not None and teaching.cfg.source == "pool" and pool_scorer is None:
        pool_scorer = _model_scorer(engine, WithIds(training_data), collate, teaching)
    sampler = AttentSampler(training_data, None, passes, micro, seed=seed, teaching=teaching,
                            pool_scorer=pool_scorer)
    hooks = _ForwardScoring(engine.module, teaching)
    loader = TeacherDataLoader(
        engine.deepspeed_io(sampler.dataset, data_sampler=sampler, collate_fn=collate),
        sampler, hooks)
    engine.training_dataloader = loader
    _checkpoint_with_teacher(engine, teaching)
    monitor = open_monitor(ds_config, engine)
    if monitor is not None:  # the teacher's decisions beside DeepSpeed's own training figures
        sink = MonitorSink(monitor)
        teaching.listeners.append(lambda r: sink.log({**r, "step": engine.global_steps}))
    return engine, optimizer, loader, lr_scheduler


class TeacherDataLoader:
    """DeepSpeed's training loader over the teacher's sampler; each batch's ids go to the engine's
    scoring hooks (``batch_ids`` holds the last batch's), the batch itself as the user's collate
    made it. ``len()`` is the number of micro batches of the pass the next iteration trains."""

    def __init__(self, loader, sampler: AttentSampler, hooks: "_ForwardScoring"):
        self.loader, self.sampler, self.hooks = loader, sampler, hooks
        self.data_sampler = sampler  # where DeepSpeed users call set_epoch
        self.batch_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        self.hooks.pending.clear()  # ids of a batch fetched but never trained
        for batch in self.loader:
            if isinstance(batch, dict):
                ids = batch.pop("id")
            else:
                *rest, ids = batch
                batch = rest[0] if len(rest) == 1 else type(batch)(rest)
            self.batch_ids = ids
            self.hooks.pending.append(ids)
            yield batch


class _ForwardScoring:
    """Forward hooks on the engine's module: each training forward takes the ids of the oldest
    batch the loader handed out and is scored from its logits and labels (``labels``, else the
    ``input_ids``, with ``attention_mask`` zeros ignored). Where the teacher weights examples
    (``selection.rescale``) or needs the loss's graph (``grad_norm``), the model's loss is replaced
    by the teacher's: the mean over examples of their mean token loss, weighted."""

    def __init__(self, module: torch.nn.Module, teaching: Teaching):
        self.teaching = teaching
        self.pending: collections.deque = collections.deque()
        self._inputs: Optional[dict] = None
        self._stack: Optional[contextlib.ExitStack] = None
        module.register_forward_pre_hook(self._before, with_kwargs=True)
        module.register_forward_hook(self._after, with_kwargs=True)

    def _training(self, module) -> bool:
        return module.training and torch.is_grad_enabled() and bool(self.pending)

    def _before(self, module, args, kwargs):
        if not self._training(module):
            return None
        self._inputs = {"input_ids": args[0] if args else kwargs.get("input_ids"),
                        "labels": kwargs.get("labels"),
                        "attention_mask": kwargs.get("attention_mask")}
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.teaching.recording())
        return None

    def _after(self, module, args, kwargs, output):
        if self._stack is None:
            return None
        self._stack.close()
        self._stack, inputs = None, self._inputs
        ids = self.pending.popleft()
        logits = output.logits if hasattr(output, "logits") else output
        labels = inputs["labels"]
        if labels is None:
            if inputs["input_ids"] is None:
                raise ValueError("attent_scale.initialize scores each forward from its labels or "
                                 "input_ids, and this forward got neither; use "
                                 "attent_scale.AttentSampler and sampler.update() instead")
            labels = inputs["input_ids"]
            if inputs["attention_mask"] is not None:
                labels = labels.masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
        t = self.teaching
        replace = t.weights(ids) is not None or (t.enabled and t.cfg.signal == "grad_norm")
        if not replace:
            ce, shifted = causal_token_losses(logits.detach(), labels)
            t.observe(ids, ce, shifted, logits.detach()[:, :-1])
            return None
        if getattr(output, "loss", None) is None:
            raise ValueError("this teacher weights the loss (selection.rescale or signal "
                             "grad_norm), so the model's forward must compute its loss: pass "
                             "labels= to it, or use attent_scale.AttentSampler and update()")
        output.loss = t.update(ids, logits=logits, labels=labels)
        return output


def _model_scorer(engine, dataset, collate, teaching: Teaching):
    """``source: pool`` without a pool_scorer: run the model on collated items under no_grad."""
    module = engine.module

    @torch.no_grad()
    def score(ids):
        batch = collate([dataset[int(i)] for i in ids])
        if not isinstance(batch, dict):
            raise ValueError("source 'pool' scores with the model's forward on dict batches; "
                             "these items are not dicts: pass pool_scorer= to initialize")
        batch.pop("id")
        batch = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        labels = batch.get("labels", batch.get("input_ids"))
        was = module.training
        module.eval()
        try:
            with teaching.recording(True):
                logits = module(**batch).logits
            ce, shifted = causal_token_losses(logits, labels)
            return teaching.scores(ce, shifted, logits[:, :-1])
        finally:
            module.train(was)
    return score


def _checkpoint_with_teacher(engine, teaching: Teaching) -> None:
    """``engine.save_checkpoint`` / ``load_checkpoint`` that also carry the teacher's state.

    The ``latest`` pointer moves only after the teacher's files exist, so a job killed while
    saving resumes from the previous checkpoint, teacher and weights alike.
    """
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir, tag=None, client_state={}, save_latest=True, **kwargs):
        tag = str(tag if tag is not None else f"global_step{engine.global_steps}")
        done = save(save_dir, tag=tag, client_state=client_state, save_latest=False, **kwargs)
        teaching.save(Path(save_dir) / tag)
        if save_latest:
            if teaching.comm.rank == 0:
                write_atomic(Path(save_dir) / "latest", tag)
            teaching.comm.barrier()
        return done

    def load_checkpoint(load_dir, tag=None, **kwargs):
        path, client_state = load(load_dir, tag=tag, **kwargs)
        if path is None:
            return path, client_state
        tag = tag if tag is not None else latest_tag(Path(load_dir))
        folder = Path(load_dir) / str(tag)
        if not (folder / "attent_state.json").exists():
            raise FileNotFoundError(f"{folder} holds no teacher state (attent_state.json): it was "
                                    "saved without attent_scale.initialize; resume from a "
                                    "checkpoint this job wrote, or start fresh")
        teaching.load(folder)
        return path, client_state

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def save_checkpoint(engine, teaching: Teaching, save_dir: Path, tag: str, state: dict) -> None:
    """Collective: DeepSpeed state, then teacher and trainer state, then the ``latest`` pointer.

    ``latest`` moves only after every file of the new checkpoint exists, so a job killed while
    saving resumes from the previous checkpoint.
    """
    teaching.flush()
    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    commit(teaching, save_dir, tag, state)


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


def saved_zero_stage(tag_dir: Path) -> Optional[int]:
    """The ZeRO stage a DeepSpeed checkpoint was written with (the ``ds_config`` DeepSpeed keeps
    in its model-states files), or None when no file says so. Call after check_weights_only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Stages 0-2 write mp_rank_XX_model_states.pt, stage 3 zero_pp_rank_N_mp_rank_XX_...
    for path in sorted(tag_dir.glob("*model_states.pt")):
        try:
            with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum,
                                                   fragment_address]):
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return int((state.get("ds_config") or {}).get("zero_optimization", {})
                       .get("stage", 0))
        except Exception:  # noqa: BLE001 - an unreadable file is DeepSpeed's to report
            continue
    return None


def _layout(stage: int) -> str:
    # Stages 1 and 2 share one file layout; 0 keeps the optimizer with the model; 3 shards both.
    return {0: "0", 1: "1-2", 2: "1-2"}.get(stage, "3")


def load_checkpoint(engine, teaching: Teaching, load_dir: Path,
                    load_optimizer_states: bool = True,
                    pass_index: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Resume from ``load_dir/latest`` if present; returns the trainer state or None.

    ``load_optimizer_states=False`` (a resume on another data-parallel size): DeepSpeed cannot
    re-partition ZeRO optimizer state, so the weights load and the optimizer restarts from them.
    A checkpoint of another ZeRO layout, or one missing a file, raises :class:`CheckpointError`
    before DeepSpeed fails on it with a bare assertion or a file name.
    """
    from .checkpoint import CheckpointError
    tag = latest_tag(load_dir)
    if tag is None:
        return None
    tag_dir = load_dir / tag
    fix = (f"point {load_dir / 'latest'} at an earlier complete tag, or start fresh (--no-resume, "
           "or another --out)")
    check_weights_only(tag_dir)
    saved, stage = saved_zero_stage(tag_dir), engine.zero_optimization_stage()
    if saved is not None and _layout(saved) != _layout(stage):
        raise CheckpointError(f"checkpoint {tag_dir} was written under ZeRO stage {saved}, this "
                              f"job runs stage {stage}; DeepSpeed cannot load one stage's files "
                              f"into the other's; fix: resume with zero_optimization.stage "
                              f"{saved} in the config, or start fresh (--no-resume, or another "
                              "--out)")
    try:
        path, _ = engine.load_checkpoint(str(load_dir), tag=tag,
                                         load_optimizer_states=load_optimizer_states)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {exc.filename} is missing; "
                              f"fix: {fix}") from None
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}; fix: {fix}")
    teaching.load(load_dir / tag, pass_index)
    return json.loads((load_dir / tag / TRAINER_STATE).read_text())
