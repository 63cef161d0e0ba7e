"""The Hugging Face Trainer adapter: AtteNT teaching in an ordinary ``transformers`` Trainer job.

A Trainer script switches the teacher on with one line, constructing :class:`AttentTrainer` where it
constructed ``Trainer``; the ``"attent"`` section of the DeepSpeed JSON passed to
``TrainingArguments(deepspeed=...)`` configures it, exactly as for ``attent-pretrain``::

    from attent_scale import AttentTrainer
    args = TrainingArguments(output_dir="runs/ft", num_train_epochs=3,
                             per_device_train_batch_size=8, deepspeed="configs/finetune_zero2.json")
    trainer = AttentTrainer(model=model, args=args, train_dataset=train, data_collator=collator)
    trainer.train()            # or trainer.train(resume_from_checkpoint=True)

What changes against the plain Trainer, and why:

- **Scores** come from the training forward itself: per-example scores are reduced from the logits
  and the labels (``-100`` = prompt and padding, never scored), because the Trainer's loss is
  already a batch mean. Each example of a gradient-accumulation window is scored once.
- **Data**: the train loader yields, pass after pass, exactly the teacher's selection, split over
  the data-parallel ranks by the teacher's own seeded order (never the Trainer's seeds), so every
  rank trains the same selection and each selected id once per pass. It serves a map-style dataset
  (``datasets.Dataset`` or any ``torch`` map-style dataset) and
  :class:`~attent_scale.streaming_data.SubsetStreamingDataset` alike.
- **Steps**: ``num_train_epochs`` is the number of passes; the teacher's plan fixes the total
  optimizer steps before training (``max_steps`` while ``train()`` runs; the caller's value is
  given back when it returns), so the learning-rate schedule fits each arm's own budget. The
  Trainer's logged ``epoch`` is the pass count: the pass plus the fraction of it trained (3.0 after
  3 passes), though passes differ in length.
- **Checkpoints**: teacher state (``attent_state.{json,npz}``, and one score file per rank when the
  score table is sharded) is written into every Trainer checkpoint folder and read back on resume;
  the loader resumes mid-pass by itself, so ``ignore_data_skip`` is on while ``train()`` runs.

Without the section (or with ``attent=None``) the same loader trains every pass on the full data
with the same remainder rule and order: the fair baseline. Only there may ``max_steps`` be set: a
full-data run cut to a teacher arm's step count, with its own complete schedule (the budget-matched
baseline), trains as many whole passes as that needs and stops at ``max_steps``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback

from .comm import make_comm
from .config import SECTION, AttentConfig, ConfigError, parse_attent
from .signals import IGNORE_INDEX, causal_token_losses
from .teaching import Teaching

ID_KEY = "attent_id"
"""Batch key carrying each example's dataset index from the loader to :meth:`compute_loss`."""

_FROM_DEEPSPEED = "deepspeed"


def pop_attent_section(args) -> Optional[dict]:
    """Remove and return the ``attent`` section of the DeepSpeed config held by ``args``.

    transformers hands ``args.hf_deepspeed_config.config`` (the very dict accelerate gives
    DeepSpeed) on unchanged, so removing the key here makes the DeepSpeed side identical to the job
    without the section.
    """
    hf_ds = getattr(args, "hf_deepspeed_config", None)
    if hf_ds is not None and isinstance(getattr(hf_ds, "config", None), dict):
        return hf_ds.config.pop(SECTION, None)
    if isinstance(getattr(args, "deepspeed", None), dict):
        return args.deepspeed.pop(SECTION, None)
    return None


# ---- the train loader -------------------------------------------------------------------------

class _Rows(Dataset):
    """A rank's rows of one pass: (id, example) for the given dataset indices."""

    def __init__(self, base, ids: np.ndarray):
        self.base, self.ids = base, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        j = int(self.ids[i])
        return j, self.base[j]


def _plain(example: dict) -> dict:
    # Collators pad Python lists; streaming hands numpy arrays.
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in example.items()}


class _Collate:
    """The user's collator plus the id column (kept out of the collator, which would pad it)."""

    def __init__(self, collator, streaming: bool):
        self.collator, self.streaming = collator, streaming

    def __call__(self, items):
        if self.streaming:
            ids = [int(it["id"]) for it in items]
            feats = [_plain({k: v for k, v in it.items() if k != "id"}) for it in items]
        else:
            ids = [i for i, _ in items]
            feats = [_plain(ex) for _, ex in items]
        batch = self.collator(feats)
        batch[ID_KEY] = torch.tensor(ids, dtype=torch.int64)
        return batch


class TeacherLoader:
    """The train "dataloader": every remaining pass back to back, each the teacher's selection.

    ``len()`` is the planned number of micro-batches per rank over all passes (known before step
    0); iteration starts where the Trainer's ``global_step`` says training stands, so a resumed run
    continues mid-pass with the ids an uninterrupted run would train. ``begin_pass`` (a collective)
    runs in the main process at each pass boundary, after every batch of the previous pass has
    been trained: passes are whole optimizer steps and the Trainer fetches one step at a time.
    """

    def __init__(self, trainer: "AttentTrainer", dataset, collator):
        self.trainer = trainer
        self.dataset = dataset
        self.streaming = _is_streaming(dataset)
        self.collate = _Collate(collator, self.streaming)

    @property
    def teaching(self) -> Teaching:
        return self.trainer.teaching

    def _steps_per_pass(self) -> list[int]:
        t = self.teaching
        return [t.pass_size(p) // t.global_batch for p in range(t.num_passes)]

    def __len__(self) -> int:
        return self.teaching.planned_steps() * self.trainer.args.gradient_accumulation_steps

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the teacher's plan, not the Trainer's epoch counter, names the pass."""

    def locate(self, step: int) -> tuple[int, int]:
        """(pass, samples the whole group already trained in it) at optimizer step ``step``."""
        for p, n in enumerate(self._steps_per_pass()):
            if step < n:
                return p, step * self.teaching.global_batch
            step -= n
        return self.teaching.num_passes, 0

    def __iter__(self) -> Iterator[dict]:
        tr, t = self.trainer, self.teaching
        first, done = self.locate(tr.state.global_step)
        t.pass_index, t.samples_done = first, done
        for p in range(first, t.num_passes):
            sel = tr.begin_pass(p)
            yield from self._pass_batches(p, sel, done)
            done = 0

    def _pass_batches(self, p: int, selection, done: int) -> Iterator[dict]:
        args, comm = self.trainer.args, self.trainer.comm
        micro = args.per_device_train_batch_size
        workers = args.dataloader_num_workers
        if self.streaming:
            self.dataset.set_pass(p, selection.ids, done)
            loader = DataLoader(self.dataset, batch_size=micro, num_workers=workers,
                                collate_fn=self.collate)
        else:
            # Same seeded order on every rank; rank r takes slot r of each group of micro x world.
            rows = self.teaching.rank_order(p, selection, comm.rank, comm.world, micro)
            loader = DataLoader(_Rows(self.dataset, rows), batch_size=micro,
                                shuffle=False, num_workers=workers, collate_fn=self.collate)
        yield from loader


def _is_streaming(dataset) -> bool:
    return hasattr(dataset, "set_pass") and hasattr(dataset, "full_size")


# ---- checkpoints --------------------------------------------------------------------------------

class _SaveTeacher(TrainerCallback):
    """Writes the teacher's state into each Trainer checkpoint folder (every rank takes part: a
    sharded score table has one range per rank), and reports the pass count as the epoch."""

    def __init__(self, trainer: "AttentTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer.teaching
        if t is not None and t.selection is not None:
            # The Trainer counts one long "epoch" over every pass; the pass is the truth. This
            # runs after the Trainer sets state.epoch and before it logs or saves the step.
            size = len(t.selection.ids)
            state.epoch = t.pass_index + (t.samples_done / size if size else 0.0)

    def on_save(self, args, state, control, **kwargs):
        t = self.trainer.teaching
        if t is None or not t.enabled:
            return
        t.save(Path(args.output_dir) / f"checkpoint-{state.global_step}",
               extra={"global_step": state.global_step})


def _count_cpu_ranks() -> None:
    """Tell accelerate the real ranks when DeepSpeed runs on CPU.

    accelerate finds no device backend on a CPU-only machine under DeepSpeed and records one
    process at index 0 on every rank, so every rank would write checkpoints and logs as the main
    process, and collectives sized by that count fail. The process group knows the truth.
    """
    from .comm import world_if_initialized
    group = world_if_initialized()
    if torch.cuda.is_available() or group is None:
        return
    rank, world = group
    from accelerate.state import PartialState
    state = PartialState()
    if state.num_processes != world:
        state.num_processes, state.process_index = world, rank
        state.local_process_index = int(os.environ.get("LOCAL_RANK", rank))


# ---- the Trainer ------------------------------------------------------------------------------

class AttentTrainer(Trainer):
    """``transformers.Trainer`` with the AtteNT teacher choosing each pass's training examples.

    Extra keyword arguments (all optional):

    - ``attent``: ``"deepspeed"`` (default) reads the ``"attent"`` section of the DeepSpeed
      config in ``args.deepspeed``; a dict or :class:`AttentConfig` sets it directly; ``None``
      switches the teacher off (full passes, same order: the baseline). The section is always
      removed from the config DeepSpeed receives.
    - ``log_ids``: a directory; each rank appends its selections and trained ids per pass to
      ``ids.rank<R>.jsonl`` (the format of ``attent-pretrain --log-ids``).

    The train dataset is map-style (index = sample id) or a ``SubsetStreamingDataset`` whose
    ``batch_size`` equals ``per_device_train_batch_size``. Labels use ``-100`` for tokens that
    neither train nor score (prompt, padding).
    """

    def __init__(self, *args, attent: Union[str, dict, AttentConfig, None] = _FROM_DEEPSPEED,
                 log_ids: Optional[Union[str, Path]] = None, **kwargs):
        _count_cpu_ranks()
        super().__init__(*args, **kwargs)
        section = pop_attent_section(self.args)
        if isinstance(attent, str):
            if attent != _FROM_DEEPSPEED:
                raise ValueError(f"attent={attent!r}; allowed: 'deepspeed', a dict, an "
                                 "AttentConfig or None")
            attent = section
        self.attent_config: Optional[AttentConfig] = (
            attent if isinstance(attent, AttentConfig) or attent is None else parse_attent(attent))
        if self.attent_config is not None and self.attent_config.source != "free":
            raise ConfigError(
                f"attent.source: got {self.attent_config.source!r}; the Trainer integration "
                "supports 'free' (scores from the training forward); fix: remove attent.source")
        self.log_ids = Path(log_ids) if log_ids else None
        self.teaching: Optional[Teaching] = None
        self._budget: Optional[int] = None  # max_steps of the teacher-off budget-matched run
        self.comm = None
        self.current_pass = -1
        self.pass_log: list[dict] = []
        self._id_log = None
        self.add_callback(_SaveTeacher(self))

    # -- set-up ---------------------------------------------------------------------------------
    def _build_teaching(self) -> Teaching:
        args = self.args
        epochs = args.num_train_epochs
        budget = args.max_steps if args.max_steps and args.max_steps > 0 else None
        if budget is not None and self.attent_config is not None:
            raise ValueError(f"max_steps={args.max_steps}: the teacher plans whole passes; set "
                             "num_train_epochs instead and leave max_steps at -1")
        if float(epochs) != int(epochs) or int(epochs) < 1:
            raise ValueError(f"num_train_epochs={epochs}: the teacher needs a whole number of "
                             "passes (>= 1)")
        if getattr(args, "include_tokens_per_second", False):
            raise ValueError("include_tokens_per_second would iterate the teacher's loader before "
                             "training; switch it off")
        self.comm = make_comm()
        ds = self.train_dataset
        if ds is None:
            raise ValueError("AttentTrainer needs a train_dataset")
        if _is_streaming(ds):
            if ds.batch_size != args.per_device_train_batch_size:
                raise ValueError(f"SubsetStreamingDataset batch_size={ds.batch_size} != "
                                 f"per_device_train_batch_size={args.per_device_train_batch_size};"
                                 " make them equal")
            n = ds.full_size
        else:
            n = len(ds)
        global_batch = (args.per_device_train_batch_size * args.gradient_accumulation_steps *
                        self.comm.world)
        seed = args.data_seed if args.data_seed is not None else args.seed
        if budget is not None:
            # Without a teacher a step budget is allowed (the budget-matched full-data baseline):
            # enough whole passes are planned and the Trainer stops at max_steps, so its LR
            # schedule spans exactly the budget.
            per_pass = n // global_batch
            if per_pass < 1:
                raise ValueError(f"max_steps={budget}: {n} examples make no global batch of "
                                 f"{global_batch}")
            epochs = -(-budget // per_pass)
        teaching = Teaching(self.attent_config, n, int(epochs), global_batch, comm=self.comm,
                            data_seed=seed, model=self.model)
        self._budget = budget
        return teaching

    def planned_steps(self) -> int:
        """Optimizer steps the run trains: the teacher's plan (cut to ``max_steps`` in the
        budget-matched run without a teacher)."""
        if self.teaching is None:
            self.teaching = self._build_teaching()
        planned = self.teaching.planned_steps()
        return min(self._budget, planned) if self._budget else planned

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args, **kwargs):
        if self.teaching is None:
            self.teaching = self._build_teaching()
        ckpt = resume_from_checkpoint
        if ckpt is True:
            from transformers.trainer_utils import get_last_checkpoint
            ckpt = get_last_checkpoint(self.args.output_dir)
            if ckpt is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no "
                                 "checkpoint-* folder")
        if ckpt and self.teaching.enabled:
            folder = Path(ckpt)
            if not (folder / "attent_state.json").exists():
                raise FileNotFoundError(
                    f"{folder} has no attent_state.json: it was written without the teacher or "
                    "the job stopped while saving; resume from an earlier checkpoint")
            self.teaching.load(folder)
        if self.log_ids is not None:
            self.log_ids.mkdir(parents=True, exist_ok=True)
            self._id_log = open(self.log_ids / f"ids.rank{self.comm.rank}.jsonl", "a")
        # For this call only (the caller's arguments are theirs): the plan fixes the run's
        # length, since the Trainer's own arithmetic assumes equal epochs, and the loader resumes
        # mid-pass by itself.
        users = self.args.max_steps, self.args.ignore_data_skip
        self.args.max_steps, self.args.ignore_data_skip = self.planned_steps(), True
        try:
            return super().train(ckpt or None, *args, **kwargs)
        finally:
            self.args.max_steps, self.args.ignore_data_skip = users
            if self._id_log is not None:
                self._id_log.close()
                self._id_log = None

    def get_train_dataloader(self):
        if self.teaching is None:
            self.teaching = self._build_teaching()
        return TeacherLoader(self, self.train_dataset, self.data_collator)

    # -- passes ---------------------------------------------------------------------------------
    def begin_pass(self, p: int):
        """Collective: let the teacher choose pass ``p`` and log the decision."""
        t = self.teaching
        resuming = t.samples_done > 0 and p == t.pass_index
        sel = t.begin_pass(p)
        self.current_pass = p
        if not resuming:
            record = {"pass": p, "kind": t.teacher.plan[p].kind, "selected": len(sel.ids),
                      "skipped": t.teacher.full_pass_size - len(sel.ids),
                      "step": self.state.global_step}
            self.pass_log.append(record)
            if self._id_log is not None:
                self._id_log.write(json.dumps({"pass": p, "selection": sel.checksum,
                                               "size": len(sel.ids)}) + "\n")
                self._id_log.flush()
        return sel

    # -- the loss -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        ids = inputs.pop(ID_KEY, None)
        if ids is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)
        if "labels" not in inputs:
            raise KeyError("AttentTrainer needs 'labels' in each batch (-100 where a token "
                           "neither trains nor scores)")
        t = self.teaching
        ids_np = ids.cpu().numpy()
        labels = inputs["labels"]
        weights = t.weights(ids_np)
        own_loss = weights is not None or (t.enabled and t.cfg.signal == "grad_norm")
        with t.recording():
            if not own_loss:
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch,
                                                     **kwargs)
                with torch.no_grad():
                    ce, shifted = causal_token_losses(outputs.logits.detach(), labels)
            else:
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
                ce, shifted = causal_token_losses(outputs.logits, labels)
                loss = self._weighted_loss(ce, shifted, weights, num_items_in_batch)
        t.observe(ids_np, ce, shifted, outputs.logits[:, :-1])
        if self._id_log is not None:
            self._id_log.write(json.dumps({"pass": self.current_pass,
                                           "step": self.state.global_step,
                                           "ids": ids_np.tolist()}) + "\n")
        return (loss, outputs) if return_outputs else loss

    def _weighted_loss(self, ce, shifted, weights: Optional[np.ndarray], num_items_in_batch):
        """Token cross-entropy, each example's tokens weighted (soft selection with rescale).

        Normalised like the model's own loss: by the accumulation window's token count when the
        Trainer provides it (then it does not divide by the accumulation steps), else per batch.
        """
        total = ce.sum(dim=1) if weights is None else \
            (ce * torch.as_tensor(weights, dtype=ce.dtype, device=ce.device).unsqueeze(1)).sum(1)
        total = total.sum()
        if num_items_in_batch is not None and getattr(self, "model_accepts_loss_kwargs", False):
            loss = total / num_items_in_batch
            if getattr(self.args, "average_tokens_across_devices", False):
                loss = loss * self.accelerator.num_processes
            return loss
        return total / (shifted != IGNORE_INDEX).sum().clamp_min(1)


__all__ = ["AttentTrainer", "TeacherLoader", "ID_KEY", "pop_attent_section"]
