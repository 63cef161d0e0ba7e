"""The teacher: a score table, a plan of passes, and the selection of each pass.

The teacher is pure: collectives reach it through a ``comm`` object with two methods,

- ``gather(*arrays) -> tuple of arrays``: concatenate every rank's 1-D arrays in rank order;
- ``agree(value: int, what: str)``: raise if the ranks hold different values,

which :mod:`attent_scale.comm` implements over torch.distributed (with a one-rank short cut). Every
rank calls the teacher's collective methods in the same order because they follow the plan, which
is identical everywhere.

The same class with ``cfg=None`` is the no-teacher job: full passes, the same remainder rule, the
same data order, so a run without the ``attent`` section is a fair plain-DeepSpeed baseline.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import AttentConfig
from .policy import (PURPOSE_POOL, PURPOSE_REMAINDER, PURPOSE_SELECT, Selection, make_rng,
                     round_budget, select_gumbel_topk, select_random, select_topk)
from .schedules import PassPlan, build_plan, full_plan
from .sharded_select import (ShardedScoreTable, ShardFiles, global_max, order_key, quantiles,
                             shard_range, sharded_gumbel_topk, sharded_random, sharded_topk,
                             top_mask)

STATE_VERSION = 1


def use_sharding(mode: str, threshold: int, num_samples: int, world: int) -> bool:
    """``selection.sharding``: shard the score table? (auto: more than one rank and N > threshold)"""
    if mode == "auto":
        return world > 1 and num_samples > threshold
    return mode == "sharded"


class SelectionError(RuntimeError):
    """A selection cannot be made as configured (for example the budget rounds to zero)."""


@dataclass
class PassSummary:
    """What the teacher decided at the start of a pass (one line of the run's log)."""
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
    def __init__(self, cfg: Optional[AttentConfig], num_samples: int, num_passes: int,
                 global_batch: int, comm: Any, data_seed: int = 0):
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
        # Sharded: this rank's ids only (docs/SCALE.md); scores/scored then alias the shard.
        self.table = ShardedScoreTable(num_samples, comm) if self.sharded else None
        n_local = len(self.table.scores) if self.sharded else num_samples
        self.scores = np.full(n_local, np.nan, dtype=np.float64)
        self.scored = np.zeros(n_local, dtype=bool)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.selection: Optional[Selection] = None
        self.selection_pass = -1
        # (size saved, size kept) when a resume on another world size cut the selection.
        self.selection_resized: Optional[tuple[int, int]] = None
        self._weight_of: dict[int, float] = {}

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
            self.table.scores, self.table.scored = self.scores, self.scored
            self.table.merge(*local)
            return
        ids, vals, stamps = self.comm.gather(*local)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n):
            raise ValueError(f"score for sample id outside [0, {self.n}) received")
        # Latest stamp wins; ties (impossible within one step) fall back to rank order.
        order = np.lexsort((np.arange(len(ids)), stamps))[::-1]
        latest, first = np.unique(ids[order], return_index=True)
        self.scores[latest] = vals[order][first]
        self.scored[latest] = True

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

    def _select(self, p: int, step: PassPlan) -> tuple[Selection, PassSummary]:
        if self.sharded:
            return self._select_sharded(p, step)
        cfg = self.cfg
        scores = self.scores.copy()
        invalid = self.scored & ~np.isfinite(scores)
        unscored = ~self.scored
        finite = self.scored & np.isfinite(scores)
        # Never-scored ids (a sampled pool) compete with the best known score: unseen examples
        # are explored rather than starved. Invalid (NaN/inf) ids are never selected.
        fill = scores[finite].max() if finite.any() else 0.0
        scores[unscored] = fill
        candidates = np.flatnonzero(~invalid)
        if cfg.selection.method != "random" and cfg.selection.skip_top > 0 and len(candidates):
            n_skip = int(np.floor(cfg.selection.skip_top * len(candidates)))
            order = np.lexsort((candidates, -scores[candidates]))
            candidates = np.sort(candidates[order[n_skip:]])
        k = round_budget(self.n, step.ratio, self.global_batch)
        k = min(k, (len(candidates) // self.global_batch) * self.global_batch)
        if k == 0:
            raise SelectionError(
                f"selection budget of pass {p} rounds to zero: ratio {step.ratio:.4f} x "
                f"{self.n} samples ({len(candidates)} selectable, {int(invalid.sum())} with NaN/inf "
                f"scores) is less than one global batch of {self.global_batch}; raise "
                "attent.ratio or lower the batch size")
        rng = make_rng(cfg.seed, p, PURPOSE_SELECT)
        cand_scores = scores[candidates]
        method = cfg.selection.method
        if method == "hard":
            sel = select_topk(cand_scores, candidates, k)
        elif method == "soft":
            if cfg.selection.transform == "log":
                # Scores here are losses or norms (>= 0); a zero keeps a tiny, finite chance.
                cand_scores = np.log(np.maximum(cand_scores, 1e-12))
            sel = select_gumbel_topk(cand_scores, candidates, k, cfg.selection.temperature, rng,
                                     rescale=cfg.selection.rescale)
        else:
            sel = select_random(candidates, k, rng)
        seen = scores[finite] if finite.any() else np.zeros(1)
        summary = PassSummary(
            pass_index=p, kind="subset", round=step.round, ratio=step.ratio, selected=k,
            skipped=self.n - k, invalid=int(invalid.sum()), unscored=int(unscored.sum()),
            score_quantiles=[float(v) for v in np.quantile(seen, [0.1, 0.5, 0.9])],
            selected_mean_score=float(np.mean(scores[sel.ids])), checksum=sel.checksum)
        return sel, summary

    def _select_sharded(self, p: int, step: PassPlan) -> tuple[Selection, PassSummary]:
        """:meth:`_select` on this rank's shard: the same rules and, bit for bit, the same ids."""
        cfg, comm = self.cfg, self.comm

        def total(mask: np.ndarray) -> int:
            return int(comm.all_reduce(np.array([np.count_nonzero(mask)], np.int64), "sum")[0])

        ids = self.table.ids
        scores = self.scores.copy()
        invalid = self.scored & ~np.isfinite(scores)
        unscored = ~self.scored
        finite = self.scored & np.isfinite(scores)
        fill = global_max(comm, scores[finite])
        scores[unscored] = 0.0 if fill is None else fill
        cand = ~invalid
        c_ids, c_scores = ids[cand], scores[cand]
        n_cand, n_invalid = total(cand), total(invalid)
        if cfg.selection.method != "random" and cfg.selection.skip_top > 0 and n_cand:
            n_skip = int(np.floor(cfg.selection.skip_top * n_cand))
            skip = top_mask(order_key(c_scores), c_ids, n_skip, comm)
            c_ids, c_scores = c_ids[~skip], c_scores[~skip]
            n_cand -= n_skip
        k = round_budget(self.n, step.ratio, self.global_batch)
        k = min(k, (n_cand // self.global_batch) * self.global_batch)
        if k == 0:
            raise SelectionError(
                f"selection budget of pass {p} rounds to zero: ratio {step.ratio:.4f} x "
                f"{self.n} samples ({n_cand} selectable, {n_invalid} with NaN/inf "
                f"scores) is less than one global batch of {self.global_batch}; raise "
                "attent.ratio or lower the batch size")
        rng = make_rng(cfg.seed, p, PURPOSE_SELECT)
        method = cfg.selection.method
        if method == "hard":
            sel = sharded_topk(c_scores, c_ids, k, comm)
        elif method == "soft":
            if cfg.selection.transform == "log":
                c_scores = np.log(np.maximum(c_scores, 1e-12))
            sel = sharded_gumbel_topk(c_scores, c_ids, k, cfg.selection.temperature, rng, comm,
                                      rescale=cfg.selection.rescale)
        else:
            sel = sharded_random(c_ids, k, rng, comm)
        mine = sel.ids[(sel.ids >= self.table.lo) & (sel.ids < self.table.hi)] - self.table.lo
        kept_sum = comm.all_reduce(np.array([scores[mine].sum()]), "sum")[0]
        seen = scores[finite]
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
                "selection_pass": self.selection_pass}
        arrays = {"scores": self.scores, "scored": self.scored}
        if self.sharded:
            # This rank's ids only; save() writes one file pair per rank (world-size independent).
            meta["shard"] = [self.table.lo, self.table.hi]
        if self.selection is not None:
            arrays["selection_ids"] = self.selection.ids
            arrays["selection_weights"] = self.selection.weights
        return meta, arrays

    def load_state_dict(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"teacher state version {meta.get('version')} is not "
                             f"{STATE_VERSION}; it was written by another attent-scale release")
        if meta["num_samples"] != self.n:
            raise ValueError(f"teacher state is for {meta['num_samples']} samples but the dataset "
                             f"has {self.n}: the checkpoint belongs to another dataset")
        if self.sharded:
            # Whole-table arrays or ShardFiles of any world size: keep only this rank's slice.
            self.table.load_full(arrays["scores"], arrays["scored"])
            self.scores, self.scored = self.table.scores, self.table.scored
        else:
            self.scores = np.array(arrays["scores"], dtype=np.float64)
            self.scored = np.array(arrays["scored"], dtype=bool)
        self.selection_pass = int(meta["selection_pass"])
        if "selection_ids" in arrays:
            self.selection = Selection(np.array(arrays["selection_ids"], dtype=np.int64),
                                       np.array(arrays["selection_weights"], dtype=np.float64))
            self._fit_selection_to_global_batch()

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

        Sharded, EVERY rank must call it: each writes its shard as ``attent_scores.LO-HI.npy`` and
        ``attent_scored.LO-HI.npy``, rank 0 also the JSON (which lists the shards) and the NPZ
        (the selection). :meth:`read` reassembles them for any world size.
        """
        meta, arrays = self.state_dict()
        meta = {**meta, **(extra or {})}
        directory.mkdir(parents=True, exist_ok=True)
        if self.sharded:
            lo, hi = meta.pop("shard")
            np.save(directory / f"attent_scores.{lo}-{hi}.npy", arrays.pop("scores"))
            np.save(directory / f"attent_scored.{lo}-{hi}.npy", arrays.pop("scored"))
            if self.comm.rank != 0:
                return
            meta["score_shards"] = [list(shard_range(self.n, r, self.comm.world))
                                    for r in range(self.comm.world)]
        np.savez(directory / "attent_state.npz", **arrays)
        (directory / "attent_state.json").write_text(json.dumps(meta, indent=1))

    @staticmethod
    def read(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
        meta = json.loads((directory / "attent_state.json").read_text())
        with np.load(directory / "attent_state.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if "score_shards" in meta:  # written sharded: memory-mapped, sliced on demand
            for name, dtype in (("scores", np.float64), ("scored", bool)):
                arrays[name] = ShardFiles(
                    [(lo, hi, np.load(directory / f"attent_{name}.{lo}-{hi}.npy", mmap_mode="r"))
                     for lo, hi in meta["score_shards"]], dtype)
        return meta, arrays
