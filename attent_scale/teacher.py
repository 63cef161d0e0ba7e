"""The teacher: a score table, a plan of passes, and the selection of each pass.

The teacher is pure: collectives reach it through a ``comm`` object with two methods,

- ``gather(*arrays) -> tuple of arrays``: concatenate every rank's 1-D arrays in rank order;
- ``agree(value: int, what: str)``: raise if the ranks hold different values,

which :mod:`attent_scale.comm` implements over torch.distributed (with a one-rank short cut). Every
rank calls the teacher's collective methods in the same order because they follow the plan, which
is identical everywhere.

The same class with ``cfg=None`` is the no-teacher job: full passes, the same remainder rule, the
same data order, so a run without the ``attent`` section is a fair plain-DeepSpeed baseline.

The selection rules live in :mod:`attent_scale.selection_rules` (whole table) and
:mod:`attent_scale.sharded_select` (sharded table); the checkpoint's reading, validation and
identity in :mod:`attent_scale.teacher_state`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import AttentConfig, config_error
from .policy import (PURPOSE_POOL, PURPOSE_REMAINDER, PURPOSE_SELECT, Selection, SelectionError,
                     make_rng, round_budget)
from .schedules import PassPlan, build_plan, full_plan
from .selection_rules import (LOG_FLOOR, candidates, check_reference, check_sources, digest,
                              effective_scores, select_candidates)
from .sharded_select import (ShardedScoreTable, apply_records, global_max, order_key, quantiles,
                             shard_range, sharded_gumbel_topk, sharded_infobatch, sharded_random,
                             sharded_topk, top_mask)
from .teacher_state import (FRESH, JSON_NAME, NPZ_NAME, READ_FROM, SHARDABLE, STATE_VERSION,
                            TeacherStateError, describe_changes, identity, read_state, shard_file,
                            validate_state)

__all__ = ["Teacher", "PassSummary", "SelectionError", "TeacherStateError", "STATE_VERSION",
           "use_sharding"]


def use_sharding(mode: str, threshold: int, num_samples: int, world: int) -> bool:
    """``selection.sharding``: shard the score table? (auto: more than one rank and N > threshold)"""
    if mode == "auto":
        return world > 1 and num_samples > threshold
    return mode == "sharded"


@dataclass
class PassSummary:
    """What the teacher decided at the start of a pass (one line of the run's log).

    ``invalid`` and ``unscored`` count what the selection saw (with ``score: drop`` an example
    scored once is unscored); the quantiles and the kept mean are of the raw signal, so logs of
    different ``score`` modes stay comparable.
    """
    pass_index: int
    kind: str
    round: int
    ratio: float
    selected: int
    skipped: int
    invalid: int
    unscored: int
    score_quantiles: list[float]
    selected_mean_score: float
    checksum: int

    def line(self) -> str:
        q = ", ".join(f"{v:.3f}" for v in self.score_quantiles)
        return (f"[attent] pass {self.pass_index} {self.kind} r={self.ratio:.3f} "
                f"kept {self.selected} skipped {self.skipped} invalid {self.invalid} "
                f"unscored {self.unscored} score q10/50/90 [{q}] "
                f"kept mean {self.selected_mean_score:.3f} sum {self.checksum:016x}")


class Teacher:
    """The score table, the plan, and each pass's selection.

    ``sources``: one non-negative int per sample (e.g. code=0, prose=1), needed by
    ``selection.per_source``. ``reference``: one float per sample (a reference model's loss,
    NaN = unknown), needed by ``score: reducible``. Both in dataset id order.
    """

    def __init__(self, cfg: Optional[AttentConfig], num_samples: int, num_passes: int,
                 global_batch: int, comm: Any, data_seed: int = 0,
                 sources: Optional[np.ndarray] = None, reference: Optional[np.ndarray] = None):
        if num_samples < global_batch:
            raise SelectionError(
                f"the dataset has {num_samples} samples, fewer than one global batch of "
                f"{global_batch} (micro batch x data-parallel ranks x gradient accumulation); "
                "use more data or a smaller batch")
        self.cfg = cfg
        self.n = num_samples
        self.global_batch = global_batch
        self.comm = comm
        self.data_seed = data_seed
        self.plan: list[PassPlan] = build_plan(cfg, num_passes) if cfg else full_plan(num_passes)
        self.sharded = cfg is not None and use_sharding(cfg.selection.sharding,
                                                        cfg.selection.sharding_threshold,
                                                        num_samples, getattr(comm, "world", 1))
        if sources is None and cfg is not None and cfg.selection.per_source:
            # No source ids (a corpus of one kind, or a loop that does not say): one source, so
            # per_source still normalises scores (over everything) and keeps the budget whole.
            sources = np.zeros(num_samples, dtype=np.int64)
        self.sources = None if sources is None else check_sources(sources, num_samples)
        self.reference = None if reference is None else check_reference(reference, num_samples)
        self._digests = (digest(self.sources), digest(self.reference))
        if cfg is not None:
            self._refuse_missing_inputs(cfg, getattr(comm, "world", 1))
        # Sharded: this rank's ids only (docs/SCALE.md); scores/scored then alias the shard.
        keep_prev = cfg is not None and cfg.score == "drop"
        self.table = ShardedScoreTable(num_samples, comm, keep_prev) if self.sharded else None
        n_local = len(self.table.scores) if self.sharded else num_samples
        if self.sharded:
            # Per-sample inputs shrink to this rank's shard (their digests keep the identity);
            # sources serve only per_source, which is refused above when sharded.
            self.sources = None
            if self.reference is not None:
                self.reference = self.reference[self.table.lo:self.table.hi].copy()
        self.scores = np.full(n_local, np.nan, dtype=np.float64)
        self.scored = np.zeros(n_local, dtype=bool)
        # score 'drop': each id's score before its latest one (NaN / False: none yet).
        self.prev_scores = np.full(n_local, np.nan) if keep_prev else None
        self.prev_scored = np.zeros(n_local, dtype=bool) if keep_prev else None
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.selection: Optional[Selection] = None
        self.selection_pass = -1
        # (size saved, size kept) when a resume on another world size cut the selection.
        self.selection_resized: Optional[tuple[int, int]] = None
        self._weight_of: dict[int, float] = {}

    def _refuse_missing_inputs(self, cfg: AttentConfig, world: int) -> None:
        """Config keys this job cannot honour, as one ConfigError (before any model is built)."""
        problems = []
        if cfg.selection.per_source and self.sharded:
            why = ("'sharded'" if cfg.selection.sharding == "sharded" else
                   f"'auto', sharded here ({self.n} samples > sharding_threshold "
                   f"{cfg.selection.sharding_threshold} on {world} ranks)")
            problems.append(
                f"attent.selection.sharding: got {why} but selection.per_source needs the "
                "whole score table on every rank; allowed: 'gather' (or 'auto' below the "
                "threshold) with per_source true; fix: set attent.selection.sharding: 'gather' "
                "(9 bytes x samples per rank) or attent.selection.per_source: false")
        if cfg.score == "reducible" and self.reference is None:
            problems.append(
                "attent.score: got 'reducible' but the job gave the teacher no reference "
                "scores; allowed: 'reducible' only with Teacher(..., reference=<one float per "
                "sample>); fix: pass the reference model's per-sample loss (NaN where unknown) "
                "or set attent.score: 'raw'")
        if problems:
            raise config_error(problems)

    # ---- plan -----------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.cfg is not None

    def pass_size(self, p: int) -> int:
        """Samples trained in pass ``p`` (known before training: fixes the LR schedule)."""
        return round_budget(self.n, self.plan[p].ratio, self.global_batch)

    @property
    def full_pass_size(self) -> int:
        return round_budget(self.n, 1.0, self.global_batch)

    def planned_samples(self) -> int:
        return sum(self.pass_size(p) for p in range(len(self.plan)))

    def planned_steps(self) -> int:
        return self.planned_samples() // self.global_batch

    @property
    def identity(self) -> dict:
        """What the plan and the selections depend on (saved with the state; see
        :func:`attent_scale.teacher_state.describe_changes`)."""
        return identity(self.cfg.model_dump() if self.cfg else None, self.n, len(self.plan),
                        self.global_batch, self.data_seed,
                        [self.pass_size(p) for p in range(len(self.plan))], *self._digests)

    def changes_since(self, meta: dict) -> list[str]:
        """How this run differs from the one that saved ``meta`` ([] = the same plan and rules)."""
        return describe_changes(meta.get("identity"), self.identity)

    # ---- scores ---------------------------------------------------------------------------
    def record(self, ids: np.ndarray, scores: np.ndarray, stamp: int) -> None:
        """Keep this rank's new scores until the next sync (no communication here).

        ``stamp`` orders records in time (the global step): when an id was scored more than once
        since the last sync, possibly on different ranks, the latest score wins.
        """
        if not self.enabled:
            return
        ids = np.asarray(ids, dtype=np.int64).copy()
        self._pending.append((ids, np.asarray(scores, dtype=np.float64).copy(),
                              np.full(len(ids), stamp, dtype=np.int64)))

    def wants_free_scores(self) -> bool:
        return self.enabled and self.cfg.source == "free"

    def sync(self) -> None:
        """Collective: merge every rank's pending scores into every rank's table, in rank order."""
        if not self.enabled:
            return
        parts = self._pending or [(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))]
        local = [np.concatenate([part[i] for part in parts]) for i in range(3)]
        self._pending = []
        if self.sharded:
            t = self.table
            t.scores, t.scored = self.scores, self.scored
            t.prev_scores, t.prev_scored = self.prev_scores, self.prev_scored
            t.merge(*local)
            return
        ids, vals, stamps = self.comm.gather(*local)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n):
            raise ValueError(f"score for sample id outside [0, {self.n}) received")
        # Latest stamp wins; ties (impossible within one step) fall back to rank order.
        prev = None if self.prev_scores is None else (self.prev_scores, self.prev_scored)
        apply_records(self.scores, self.scored, prev, ids, vals, stamps, 0)

    def pool_ids(self, p: int) -> Optional[np.ndarray]:
        """Ids the trainer must score with a no-grad pass before pass ``p`` (None: no pool pass)."""
        if not (self.enabled and self.cfg.source == "pool" and self.plan[p].select):
            return None
        m = self.cfg.pool_size
        if m is None or m >= self.n:
            return np.arange(self.n, dtype=np.int64)
        return np.sort(make_rng(self.cfg.seed, p, PURPOSE_POOL).choice(self.n, m, replace=False))

    # ---- selection ------------------------------------------------------------------------
    def begin_pass(self, p: int) -> tuple[Selection, Optional[PassSummary]]:
        """Collective at the start of pass ``p``: the ids (and loss weights) this pass trains.

        Returns the selection and, when the teacher selected anew, its summary.
        """
        step = self.plan[p]
        summary = None
        if p == self.selection_pass and self.selection is not None:
            sel = self.selection  # resumed inside this pass: keep the ids it started with
        elif step.kind == "full":
            sel = self._full_pass(p)
        elif step.select or self.selection is None:
            self.sync()
            sel, summary = self._select(p, step)
        else:
            sel = self.selection
        self.selection, self.selection_pass = sel, p
        self.comm.agree(sel.checksum, f"selection checksum of pass {p}")
        self._weight_of = ({} if np.all(sel.weights == 1.0) else
                           dict(zip(sel.ids.tolist(), sel.weights.tolist())))
        return sel, summary

    def weights_for(self, ids: np.ndarray) -> Optional[np.ndarray]:
        """Loss weights of the given ids in the current pass (None when all are 1)."""
        if not self._weight_of:
            return None
        return np.array([self._weight_of[int(i)] for i in ids], dtype=np.float64)

    def _full_pass(self, p: int) -> Selection:
        k = round_budget(self.n, 1.0, self.global_batch)
        ids = np.arange(self.n, dtype=np.int64)
        if k < self.n:
            # Remainder rule: drop n - k ids, a different seeded draw each pass, so each pass is a
            # whole number of global batches and nothing is repeated or padded.
            keep = make_rng(self.data_seed, p, PURPOSE_REMAINDER).permutation(self.n)[:k]
            ids = np.sort(keep)
        return Selection(ids, np.ones(len(ids)))

    def _effective(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return effective_scores(self.cfg.score, self.scores, self.scored, self.prev_scores,
                                self.prev_scored, self.reference)

    def _budget(self, p: int, step: PassPlan, n_cand: int, n_invalid: int) -> int:
        k = round_budget(self.n, step.ratio, self.global_batch)
        k = min(k, (n_cand // self.global_batch) * self.global_batch)
        if k == 0:
            raise SelectionError(
                f"selection budget of pass {p} rounds to zero: ratio {step.ratio:.4f} x "
                f"{self.n} samples ({n_cand} selectable, {n_invalid} with NaN/inf "
                f"scores) is less than one global batch of {self.global_batch}; raise "
                "attent.ratio or lower the batch size")
        return k

    def _select(self, p: int, step: PassPlan) -> tuple[Selection, PassSummary]:
        if self.sharded:
            return self._select_sharded(p, step)
        eff, unscored, invalid = self._effective()
        ids, scores, sources = candidates(self.cfg, eff, unscored, invalid, self.sources)
        k = self._budget(p, step, len(ids), int(invalid.sum()))
        sel = select_candidates(self.cfg, p, ids, scores, sources, k)
        # The summary describes the raw signal; never-scored ids count at the best known one.
        finite = self.scored & np.isfinite(self.scores)
        raw = self.scores.copy()
        raw[~self.scored] = raw[finite].max() if finite.any() else 0.0
        seen = self.scores[finite] if finite.any() else np.zeros(1)
        summary = PassSummary(
            pass_index=p, kind="subset", round=step.round, ratio=step.ratio, selected=k,
            skipped=self.n - k, invalid=int(invalid.sum()), unscored=int(unscored.sum()),
            score_quantiles=[float(v) for v in np.quantile(seen, [0.1, 0.5, 0.9])],
            selected_mean_score=float(np.mean(raw[sel.ids])), checksum=sel.checksum)
        return sel, summary

    def _select_sharded(self, p: int, step: PassPlan) -> tuple[Selection, PassSummary]:
        """:meth:`_select` on this rank's shard: the same rules and, bit for bit, the same ids."""
        cfg, comm = self.cfg, self.comm

        def total(mask: np.ndarray) -> int:
            return int(comm.all_reduce(np.array([np.count_nonzero(mask)], np.int64), "sum")[0])

        ids = self.table.ids
        eff, unscored, invalid = self._effective()
        known = ~unscored & ~invalid
        fill = global_max(comm, eff[known])
        scores = eff.copy()
        scores[unscored] = 0.0 if fill is None else fill
        cand = ~invalid
        c_ids, c_scores = ids[cand], scores[cand]
        n_cand, n_invalid = total(cand), total(invalid)
        if cfg.selection.method != "random" and cfg.selection.skip_top > 0 and n_cand:
            n_skip = int(np.floor(cfg.selection.skip_top * n_cand))
            skip = top_mask(order_key(c_scores), c_ids, n_skip, comm)
            c_ids, c_scores = c_ids[~skip], c_scores[~skip]
            n_cand -= n_skip
        k = self._budget(p, step, n_cand, n_invalid)
        rng = make_rng(cfg.seed, p, PURPOSE_SELECT)
        method = cfg.selection.method
        if method == "hard":
            sel = sharded_topk(c_scores, c_ids, k, comm)
        elif method == "soft":
            if cfg.selection.transform == "log":
                c_scores = np.log(np.maximum(c_scores, LOG_FLOOR))
            sel = sharded_gumbel_topk(c_scores, c_ids, k, cfg.selection.temperature, rng, comm,
                                      rescale=cfg.selection.rescale)
        elif method == "infobatch":
            sel = sharded_infobatch(c_scores, c_ids, k, rng, comm, rescale=cfg.selection.rescale)
        else:
            sel = sharded_random(c_ids, k, rng, comm)
        # Summary of the raw signal (another collective only when selection ranks something
        # else; every rank has the same cfg, so all take the same branch).
        finite = self.scored & np.isfinite(self.scores)
        raw_fill = fill if cfg.score == "raw" else global_max(comm, self.scores[finite])
        raw = self.scores.copy()
        raw[~self.scored] = 0.0 if raw_fill is None else raw_fill
        mine = sel.ids[(sel.ids >= self.table.lo) & (sel.ids < self.table.hi)] - self.table.lo
        kept_sum = comm.all_reduce(np.array([raw[mine].sum()]), "sum")[0]
        seen = self.scores[finite]
        qs = quantiles(seen, [0.1, 0.5, 0.9], comm) if total(finite) else [0.0, 0.0, 0.0]
        summary = PassSummary(
            pass_index=p, kind="subset", round=step.round, ratio=step.ratio, selected=k,
            skipped=self.n - k, invalid=n_invalid, unscored=total(unscored),
            score_quantiles=[float(v) for v in qs],
            selected_mean_score=float(kept_sum / k), checksum=sel.checksum)
        return sel, summary

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able scalars, plain arrays). Call :meth:`sync` first so the state is global."""
        if self._pending:
            raise RuntimeError("teacher has unsynced scores; call sync() before state_dict()")
        meta = {"version": STATE_VERSION, "num_samples": self.n, "num_passes": len(self.plan),
                "selection_pass": self.selection_pass, "identity": self.identity}
        arrays = {"scores": self.scores, "scored": self.scored}
        if self.prev_scores is not None:
            arrays["prev_scores"], arrays["prev_scored"] = self.prev_scores, self.prev_scored
        if self.sharded:
            # This rank's ids only; save() writes one file pair per rank (world-size independent).
            meta["shard"] = [self.table.lo, self.table.hi]
        if self.selection is not None:
            arrays["selection_ids"] = self.selection.ids
            arrays["selection_weights"] = self.selection.weights
        return meta, arrays

    def load_state_dict(self, meta: dict, arrays: dict[str, Any],
                        pass_index: Optional[int] = None) -> None:
        """Resume from a saved state, validated first (raises :class:`TeacherStateError`).

        ``pass_index``: the pass the trainer resumes (the one in progress, or the next one). When
        given, the saved selection_pass must be that pass or the one before it; a teacher state
        ahead or behind means the trainer's and the teacher's files come from different
        checkpoints.
        """
        validate_state(meta, arrays)
        where = meta.get(READ_FROM)
        jf = str(Path(where) / JSON_NAME) if where else JSON_NAME
        if meta["num_samples"] != self.n:
            raise TeacherStateError(
                f"{jf}: teacher state is for {meta['num_samples']} samples but the dataset has "
                f"{self.n}: the checkpoint belongs to another dataset; {FRESH}")
        sp = meta["selection_pass"]
        if sp >= len(self.plan):
            raise TeacherStateError(
                f"{jf}: field 'selection_pass': got {sp} but this run plans {len(self.plan)} "
                f"passes (0..{len(self.plan) - 1}); the checkpoint belongs to a longer run; "
                f"fix: resume with its number of passes, or start fresh")
        if pass_index is not None:
            self._check_resume_pass(sp, pass_index, jf)
        if self.sharded:
            # Whole-table arrays or ShardFiles of any world size: keep only this rank's slice.
            self.table.load_full(arrays["scores"], arrays["scored"], arrays.get("prev_scores"),
                                 arrays.get("prev_scored"))
            self.scores, self.scored = self.table.scores, self.table.scored
            self.prev_scores, self.prev_scored = self.table.prev_scores, self.table.prev_scored
        else:
            self.scores = np.array(arrays["scores"], dtype=np.float64)
            self.scored = np.array(arrays["scored"], dtype=bool)
            if self.prev_scores is not None:
                # Saved without them (another score mode): no id has a previous score yet.
                has = "prev_scores" in arrays
                self.prev_scores = (np.array(arrays["prev_scores"], dtype=np.float64) if has
                                    else np.full(self.n, np.nan))
                self.prev_scored = (np.array(arrays["prev_scored"], dtype=bool) if has
                                    else np.zeros(self.n, dtype=bool))
        self.selection_pass = sp
        self.selection = None
        if "selection_ids" in arrays:
            self.selection = Selection(np.array(arrays["selection_ids"], dtype=np.int64),
                                       np.array(arrays["selection_weights"], dtype=np.float64))
            self._fit_selection_to_global_batch()

    def _check_resume_pass(self, sp: int, pass_index: int, jf: str) -> None:
        """The saved selection_pass must be the resumed pass or the one before it.

        (Within one plan the pass before a subset pass that keeps its round's selection is of
        that round, so these two bounds also guarantee the kept selection is the right one.)"""
        n_passes = len(self.plan)
        if not (isinstance(pass_index, int) and 0 <= pass_index <= n_passes):
            raise ValueError(f"pass_index: got {pass_index!r}; allowed: an integer in "
                             f"[0, {n_passes}] (the pass the trainer resumes)")
        head = f"{jf}: field 'selection_pass': got {sp} but the trainer resumes pass {pass_index}"
        fix = ("fix: resume from a checkpoint folder whose trainer and teacher files were "
               "written together (an earlier one if this one is incomplete), or start fresh")
        if sp > pass_index:
            raise TeacherStateError(f"{head}; the teacher state is ahead of the trainer's "
                                    f"progress; {fix}")
        if sp < pass_index - 1:
            raise TeacherStateError(f"{head}; the teacher state is behind: passes "
                                    f"{sp + 1}..{pass_index - 1} never began in it; {fix}")

    def _fit_selection_to_global_batch(self) -> None:
        """After a resume on another world size: cut the kept selection to whole global batches.

        The remainder rule again (a seeded draw of the ids to drop, keyed by the selection's
        pass), so every rank cuts the same ids and no pass pads or repeats.
        """
        sel, k = self.selection, len(self.selection.ids)
        keep = (k // self.global_batch) * self.global_batch
        if keep == k:
            return
        if keep == 0:
            raise SelectionError(
                f"the resumed selection of pass {self.selection_pass} has {k} ids, fewer than one "
                f"global batch of {self.global_batch} on this world size; resume on fewer ranks "
                "or a smaller micro batch")
        order = make_rng(self.data_seed, self.selection_pass, PURPOSE_REMAINDER).permutation(k)
        idx = np.sort(order[:keep])
        self.selection = Selection(sel.ids[idx], sel.weights[idx])
        self.selection_resized = (k, keep)

    def save(self, directory: Path, extra: Optional[dict] = None) -> None:
        """Write the state as ``attent_state.json`` + ``attent_state.npz`` (no pickles).

        Sharded, EVERY rank must call it: each writes its shard of every table field as
        ``attent_<field>.LO-HI.npy``, rank 0 also the JSON (which lists the shards) and the NPZ
        (the selection). :meth:`read` reassembles them for any world size.
        """
        meta, arrays = self.state_dict()
        meta = {**meta, **(extra or {})}
        directory.mkdir(parents=True, exist_ok=True)
        if self.sharded:
            lo, hi = meta.pop("shard")
            fields = [f for f in SHARDABLE if f in arrays]
            for field in fields:
                np.save(directory / shard_file(field, lo, hi), arrays.pop(field))
            if self.comm.rank != 0:
                return
            meta["score_shards"] = [list(shard_range(self.n, r, self.comm.world))
                                    for r in range(self.comm.world)]
            meta["sharded_fields"] = fields
        np.savez(directory / NPZ_NAME, **arrays)
        (directory / JSON_NAME).write_text(json.dumps(meta, indent=1))

    @staticmethod
    def read(directory: Path) -> tuple[dict, dict[str, Any]]:
        """(meta, arrays) of a saved state, validated (:func:`teacher_state.read_state`)."""
        return read_state(Path(directory))
