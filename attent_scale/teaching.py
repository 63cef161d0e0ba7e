"""The teacher at work in a training loop: scores in, selections and loss weights out.

:class:`Teaching` is what every way in shares: ``attent_scale.initialize`` (DeepSpeed),
:class:`~attent_scale.sampler.AttentSampler` (any loop), ``AttentTrainer`` (Hugging Face) and our
own pretraining jobs. It wraps the pure :class:`~attent_scale.teacher.Teacher` with everything that
touches tensors or ranks:

- **scores** from what the training forward already has: per-example losses, per-token losses, or
  logits + labels, reduced to the configured signal and kept on the device until a point that
  synchronises anyway (a pass boundary, a checkpoint), so the step loop never waits for the host;
- **passes**: where training stands (pass, samples of it trained), the collective selection at
  each pass boundary (after a lockstep pool pass when ``source: pool``), and the order in which a
  map-style loader hands the selection to the ranks;
- **the loss** to backpropagate: each example's mean token loss, weighted where the selection
  rescales (``selection.rescale``), averaged over the batch;
- **state** that saves into and loads from any checkpoint directory (JSON + NPZ, no pickles).

Without a config (``None``, or ``"enabled": false``) the same object plans full passes with the same
remainder rule and order: the plain-training baseline.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch

from .comm import make_comm
from .config import AttentConfig, ConfigError, parse_attent
from .partition import lockstep_batches
from .policy import Selection, make_rng
from .schedules import require_plan
from .signals import IGNORE_INDEX, causal_token_losses, example_scores
from .teacher import PassSummary, Teacher

# Kept apart from the purposes in policy.py (1-3): the order in which a pass's ids are trained.
PURPOSE_ORDER = 11

ConfigLike = Union[AttentConfig, dict, None]
Scorer = Callable[[np.ndarray], Union[torch.Tensor, np.ndarray]]


def as_config(config: ConfigLike) -> Optional[AttentConfig]:
    """An ``attent`` section (dict), an :class:`AttentConfig`, or None (teacher off)."""
    if config is None or isinstance(config, AttentConfig):
        return config if config is None or config.enabled else None
    return parse_attent(config)


def print0(*args) -> None:
    """print on the first rank only (launchers set RANK)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


def make_probe(model, cfg: Optional[AttentConfig]):
    """The forward hooks a signal needs (attention importance, per-example gradients), or None.

    Raises ConfigError naming ``attent.signal`` when the model cannot provide what it needs.
    """
    if cfg is None or cfg.signal not in ("attention_fgrad", "grad_norm"):
        return None
    if model is None:
        raise ConfigError(f"attent.signal: got {cfg.signal!r}, which needs the model's forward "
                          "(attention or layer hooks), but no model was given; fix: pass model= "
                          "or use signal 'loss' or 'fgrad_norm'")
    try:
        if cfg.signal == "attention_fgrad":
            from .attention import AttentionImportance
            return AttentionImportance(model, cfg.attention.layers, cfg.attention.query_chunk)
        from .grad_norm import GradNormProbe
        return GradNormProbe.from_config(model, cfg.grad_norm)
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ConfigError(f"attent.signal: got {cfg.signal!r}, which {type(model).__name__} "
                          f"cannot provide ({exc}); fix: use signal 'loss' or 'fgrad_norm'"
                          ) from None


class Teaching:
    """One teacher in one training job (see the module doc).

    Args:
        config: the ``attent`` section (dict or :class:`AttentConfig`); None: teacher off.
        num_samples: size of the training set; sample ids are ``0 .. num_samples - 1``.
        passes: passes over the training set the run is planned for.
        global_batch: samples per optimizer step over the data-parallel group (micro batch x
            gradient accumulation x ranks): every pass is a whole number of them.
        comm: the data-parallel group's collectives (default: the default process group, or one
            rank when there is none).
        data_seed: seed of the data order and of the remainder rule's draws.
        sources: per-sample source (domain) ids, for ``selection.per_source``.
        reference: per-sample reference scores, for ``score: reducible``.
        model: the module whose forward the attention and gradient signals hook.
        announce: print one ``[attent]`` line per selection on the first rank.
        defer_model: the model comes later (:meth:`watch`), e.g. a job that checks the teacher's
            config before it spends time building the model.

    Raises ConfigError (the key, the value, what is allowed, the fix) before anything runs when
    the config cannot work here: a plan that never selects, inputs a policy needs but did not
    get, a signal the model cannot provide.
    """

    def __init__(self, config: ConfigLike, num_samples: int, passes: int, global_batch: int, *,
                 comm=None, data_seed: int = 0, sources: Optional[np.ndarray] = None,
                 reference: Optional[np.ndarray] = None, model=None, announce: bool = True,
                 defer_model: bool = False):
        self.cfg = as_config(config)
        require_plan(self.cfg, passes, num_samples, global_batch)
        self.comm = comm if comm is not None else make_comm()
        extra = {}
        if sources is not None:
            extra["sources"] = np.asarray(sources)
        if reference is not None:
            extra["reference"] = np.asarray(reference, dtype=np.float64)
        self.teacher = Teacher(self.cfg, num_samples, passes, global_batch, self.comm,
                               data_seed=data_seed, **extra)
        self.probe = None
        if model is not None or (self.cfg is not None and not defer_model):
            self.watch(model)
        self.sources = None if sources is None else np.asarray(sources)
        # Where training stands: the pass in progress (or next) and the samples of it that the
        # whole group has trained.
        self.pass_index = 0
        self.samples_done = 0
        self.stamp = 0  # micro batches trained: orders score records in time
        self.selection: Optional[Selection] = None
        self._pending: list[tuple[np.ndarray, torch.Tensor, int]] = []
        self.listeners: list[Callable[[dict], None]] = [_announce] if announce else []
        """Called on every rank with one record per pass begun (selections, for logs/monitors)."""
        # Host copies of the scores since the caller last cleared them, kept only for a caller
        # that asks (sets a list here, as the pretraining jobs' logs do): nobody else clears it.
        self.last_scores: Optional[list[np.ndarray]] = None
        self._grad_pool = False  # grad_norm: the recorded forward is a pool pass's

    def watch(self, model) -> None:
        """Hook the model's forward for the signals that need it (attention, gradient norms)."""
        self.probe = make_probe(model, self.cfg)

    # ---- plan ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.cfg is not None

    @property
    def num_passes(self) -> int:
        return len(self.teacher.plan)

    @property
    def global_batch(self) -> int:
        return self.teacher.global_batch

    def planned_steps(self) -> int:
        """Optimizer steps of the whole plan (fixes the learning-rate schedule before step 0)."""
        return self.teacher.planned_steps()

    def pass_size(self, p: int) -> int:
        return self.teacher.pass_size(p)

    @property
    def finished(self) -> bool:
        return self.pass_index >= self.num_passes

    def wants_scores(self) -> bool:
        """Whether training forwards should score (free source): otherwise scoring is skipped."""
        return self.teacher.wants_free_scores()

    # ---- passes ----------------------------------------------------------------------------
    def begin_pass(self, p: Optional[int] = None, pool_scorer: Optional[Scorer] = None,
                   pool_batch: int = 1) -> Selection:
        """Collective, at the start of pass ``p`` (default: the pass training stands in).

        Scores the candidate pool first when ``source: pool`` (``pool_scorer(ids) -> scores``,
        called on every rank with the same number of batches of ``pool_batch`` ids), hands the
        scores kept on the device to the teacher, and returns the pass's selection: the same on
        every rank (checked by checksum). A pass that training already stands inside (a resume)
        keeps the selection it started with.
        """
        p = self.pass_index if p is None else p
        if not 0 <= p < self.num_passes:
            raise IndexError(f"pass {p} outside the plan's {self.num_passes} passes")
        if p != self.pass_index:  # the caller skips ahead (e.g. a sampler's set_epoch)
            self.pass_index, self.samples_done = p, 0
        resuming = self.samples_done > 0
        pool = self.teacher.pool_ids(p)
        if pool is not None and not resuming:
            if pool_scorer is None:
                raise ConfigError("attent.source: got 'pool', but this loop provides no pool "
                                  "scorer; fix: pass pool_scorer= (ids -> scores), or use "
                                  "source 'free'")
            self.score_pool(pool, pool_scorer, pool_batch)
        self.flush()
        selection, summary = self.teacher.begin_pass(p)
        self.selection = selection
        record = self._record_of(p, selection, summary)
        if not resuming:
            for listen in self.listeners:
                listen(record)
        return selection

    def _record_of(self, p: int, selection: Selection, summary: Optional[PassSummary]) -> dict:
        plan = self.teacher.plan[p]
        record: dict[str, Any] = {
            "type": "selection", "pass": p, "kind": plan.kind, "ratio": plan.ratio,
            "selected": len(selection.ids),
            "skipped": self.teacher.full_pass_size - len(selection.ids),
            "checksum": selection.checksum}
        if summary is not None:
            q10, q50, q90 = summary.score_quantiles
            record.update(invalid=summary.invalid, unscored=summary.unscored, q10=q10, q50=q50,
                          q90=q90, selected_mean=summary.selected_mean_score)
            # "skipped" counts against a full pass (the remainder rule's size), as the run's
            # summary does, so the two always add up.
            record["line"] = (
                f"[attent] pass {p} {plan.kind} r={plan.ratio:.3f} kept {record['selected']} "
                f"skipped {record['skipped']} invalid {summary.invalid} unscored "
                f"{summary.unscored} score q10/50/90 [{q10:.3f}, {q50:.3f}, {q90:.3f}] kept mean "
                f"{summary.selected_mean_score:.3f} sum {selection.checksum:016x}")
        if self.sources is not None:
            counts = np.bincount(self.sources[selection.ids], minlength=int(self.sources.max()) + 1)
            record["source_share"] = (counts / max(1, len(selection.ids))).tolist()
        return record

    def rank_order(self, p: int, selection: Selection, rank: int, world: int,
                   micro: int) -> np.ndarray:
        """The ids rank ``rank`` trains in pass ``p``, in order, from where the pass stands.

        One seeded permutation of the selection (the same on every rank), cut into rows of
        ``world x micro``: rank r takes slot r of each row, so every selected id is trained once
        across the group and the ranks' micro batches line up step by step.
        """
        ids = selection.ids
        if len(ids) % (world * micro):
            raise ValueError(f"pass {p} selects {len(ids)} ids, not a multiple of {world} ranks "
                             f"x micro batch {micro}")
        order = make_rng(self.teacher.data_seed, p, PURPOSE_ORDER).permutation(ids)
        rows = order.reshape(-1, world, micro)[self.samples_done // (world * micro):, rank]
        return rows.reshape(-1)

    def score_pool(self, ids: np.ndarray, scorer: Scorer, batch: int) -> None:
        """No-grad scoring of ``ids`` in lockstep: every rank runs the same number of batches
        (ZeRO-3/FSDP all-gather each layer per forward), padded with rows that are dropped."""
        comm = self.comm
        for batch_ids, valid in lockstep_batches(ids, comm.rank, comm.world, batch):
            scores = scorer(batch_ids)
            if isinstance(scores, torch.Tensor):
                scores = scores.detach().float().cpu().numpy()
            self.teacher.record(batch_ids[valid], np.asarray(scores)[valid], self.stamp)

    # ---- scores and the loss ---------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self, enabled: Optional[bool] = None) -> Iterator[None]:
        """Wrap a forward whose outputs will be scored: the attention and gradient signals hook
        it. ``enabled`` defaults to whether training forwards score (free source)."""
        enabled = self.wants_scores() if enabled is None else enabled
        if self.probe is None or not enabled:
            yield
            return
        if self.cfg.signal == "grad_norm":
            # A pool pass runs under no_grad; grad_norm needs the layer outputs to differentiate.
            keep = not torch.is_grad_enabled()
            self._grad_pool = keep
            try:
                with torch.enable_grad() if keep else contextlib.nullcontext():
                    with self.probe.recording(keep_outputs=keep):
                        yield
            finally:
                self._grad_pool = False
            return
        with self.probe.recording(True):
            yield

    def scores(self, token_losses: torch.Tensor, labels: torch.Tensor,
               logits: Optional[torch.Tensor] = None,
               fgrad_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-example scores [B] of the configured signal from one recorded forward.

        ``token_losses`` [B, T] and ``labels`` [B, T] (-100 where a token does not count) are
        aligned with ``logits`` [B, T, V] (the positions that predict them), which only
        ``fgrad_norm`` and ``attention_fgrad`` need, unless a fused loss kernel gives their
        per-token ``fgrad_sq`` (||softmax - onehot||^2) directly. For ``grad_norm`` in a
        training step the scores fill in place during the backward; in a pool pass they are
        computed here.
        """
        cfg = self.cfg
        if cfg.signal == "grad_norm":
            mask = labels != IGNORE_INDEX
            if self._grad_pool:
                return self.probe.score_now(token_losses, mask)
            return self.probe.attach(token_losses, mask)
        if cfg.signal != "loss" and logits is None and fgrad_sq is None:
            raise ConfigError(f"attent.signal: got {cfg.signal!r}, which needs the logits; this "
                              "loop passes per-token losses only; fix: pass logits= or use "
                              "signal 'loss'")
        importance = None
        if cfg.signal == "attention_fgrad":
            importance = self.probe.pop()[:, :token_losses.shape[1]]
        with torch.no_grad():
            return example_scores(cfg.signal, token_losses.detach(), labels,
                                  None if logits is None else logits.detach(), importance,
                                  cfg.score_chunk_tokens, g2=fgrad_sq)

    def update(self, ids, losses: Optional[torch.Tensor] = None, *,
               logits: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
               token_losses: Optional[torch.Tensor] = None,
               fgrad_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Book one micro batch this rank trains; returns the loss to backpropagate.

        Give one of: ``losses`` [B] (per-example losses with grad); ``logits`` [B, T, V] +
        ``labels`` [B, T] in the Hugging Face convention (aligned with the inputs, -100 where a
        token neither trains nor scores; shifted here); or ``token_losses`` [B, T'] + ``labels``
        [B, T'] already aligned (0 where the label is -100), with ``logits`` [B, T', V] (or a
        fused kernel's per-token ``fgrad_sq``) aligned with them when the signal needs logits. The returned loss is the mean over the batch of
        each example's mean token loss, times its selection weight where the selection
        rescales. Scores go to the teacher when training forwards score.
        """
        ids = _as_ids(ids)
        if losses is not None:
            if self.wants_scores():
                if self.cfg.signal != "loss":
                    raise ConfigError(f"attent.signal: got {self.cfg.signal!r}; update(ids, "
                                      "losses) carries per-example losses only; fix: pass "
                                      "logits= and labels= instead, or use signal 'loss'")
                self._keep(ids, losses.detach().float())
            self.trained(len(ids))
            per_example = losses
        else:
            if token_losses is None:
                if logits is None or labels is None:
                    raise TypeError("update() needs losses=, or logits= and labels=, or "
                                    "token_losses= and labels=")
                token_losses, labels = causal_token_losses(logits, labels)
                logits = logits[:, :-1]
            elif labels is None:
                raise TypeError("update(token_losses=...) needs labels= (aligned, -100 where a "
                                "token does not count)")
            self.observe(ids, token_losses, labels, logits, fgrad_sq)
            maskf = (labels != IGNORE_INDEX).to(token_losses.dtype)
            per_example = (token_losses * maskf).sum(dim=1) / maskf.sum(dim=1).clamp_min(1)
        weights = self.teacher.weights_for(ids)
        if weights is not None:
            per_example = per_example * torch.as_tensor(weights, device=per_example.device,
                                                        dtype=per_example.dtype)
        return per_example.mean()

    def observe(self, ids, token_losses: torch.Tensor, labels: torch.Tensor,
                logits: Optional[torch.Tensor] = None,
                fgrad_sq: Optional[torch.Tensor] = None) -> None:
        """Book one micro batch this rank trains, its loss built by the caller: the scores of
        its aligned ``token_losses`` / ``labels`` (and ``logits`` where the signal needs them)
        go to the teacher when training forwards score."""
        ids = _as_ids(ids)
        if self.wants_scores():
            self._keep(ids, self.scores(token_losses, labels, logits, fgrad_sq))
        self.trained(len(ids))

    def record(self, ids, scores: Union[torch.Tensor, np.ndarray]) -> None:
        """Hand scores of ``ids`` to the teacher yourself (e.g. from an extra scoring forward)."""
        ids = _as_ids(ids)
        if isinstance(scores, np.ndarray):
            scores = torch.from_numpy(np.asarray(scores, dtype=np.float32))
        self._keep(ids, scores.detach())

    def _keep(self, ids: np.ndarray, scores: torch.Tensor) -> None:
        if len(ids) != scores.shape[0]:
            raise ValueError(f"{len(ids)} ids but {scores.shape[0]} scores: the batch's ids and "
                             "its outputs do not belong together")
        if self.enabled:
            self._pending.append((ids, scores, self.stamp))

    def trained(self, batch_size: int) -> None:
        """Count one micro batch of ``batch_size`` this rank trained (every rank does)."""
        self.stamp += 1
        self.samples_done += batch_size * self.comm.world
        if self.selection is not None and self.samples_done >= len(self.selection.ids):
            self.pass_index, self.samples_done = self.pass_index + 1, 0

    def weights(self, ids) -> Optional[np.ndarray]:
        """Loss weights of ``ids`` in the current pass (None when all are 1)."""
        return self.teacher.weights_for(_as_ids(ids))

    def flush(self) -> None:
        """Copy the scores kept on the device to the teacher (one host copy for all of them)."""
        if not self._pending:
            return
        host = torch.cat([s.reshape(-1).float() for _, s, _ in self._pending]).cpu().numpy()
        start = 0
        for ids, _, stamp in self._pending:
            self.teacher.record(ids, host[start:start + len(ids)], stamp)
            start += len(ids)
        if self.last_scores is not None:
            self.last_scores.append(host)
        self._pending.clear()

    # ---- state -----------------------------------------------------------------------------
    def position(self) -> dict[str, int]:
        return {"pass_index": self.pass_index, "samples_done": self.samples_done,
                "stamp": self.stamp}

    def save(self, directory: Union[str, Path], extra: Optional[dict] = None) -> None:
        """Collective: write the teacher's state and where training stands into ``directory``.

        Rank 0 writes (every rank its own range too when the score table is sharded)."""
        directory = Path(directory)
        self.flush()
        self.teacher.sync()
        if self.comm.rank == 0 or self.teacher.sharded:
            self.teacher.save(directory, extra={**self.position(), **(extra or {})})
        self.comm.barrier()

    def load(self, directory: Union[str, Path], pass_index: Optional[int] = None) -> dict:
        """Read what :meth:`save` wrote in ``directory``; returns the saved metadata.

        The state is validated before anything of it is used (TeacherStateError names the file
        and the field); ``pass_index``, the pass the trainer resumes, must agree with it."""
        directory = Path(directory)
        meta, arrays = Teacher.read(directory)
        self.teacher.load_state_dict(meta, arrays, pass_index)
        self.pass_index = int(meta.get("pass_index", meta.get("selection_pass", 0)))
        self.samples_done = int(meta.get("samples_done", 0))
        self.stamp = int(meta.get("stamp", 0))
        self.selection = None
        return meta


def _announce(record: dict) -> None:
    if "line" in record:
        print0(record["line"])


def _as_ids(ids) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)
