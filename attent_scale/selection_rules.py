"""From a score table to one pass's selection, on the whole table (the gathered path).

The steps, each a pure function of its arrays and the config:

1. :func:`effective_scores`: what selection ranks (``score``: raw / drop / reducible), and which
   ids are invalid (never selected) or unscored (they compete with the best known score);
2. :func:`candidates`: the selectable ids and their selection scores (unscored filled, ``skip_top``
   removed; with ``per_source``: filled, transformed and z-scored within each source);
3. :func:`select_candidates`: the configured method over the candidates at budget k, or, with
   ``per_source``, over each source's share of k (:func:`source_budgets`).

The sharded path (teacher.py) reuses step 1 on its shard; it refuses ``per_source``.

Pure module: numpy only. Every draw comes from :func:`policy.make_rng` of (seed, pass, purpose
[, source]); ties go to the lower id, as everywhere in :mod:`attent_scale.policy`.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from .config import AttentConfig
from .policy import (PURPOSE_SELECT, Selection, gumbel_topk_inverse, infobatch_inverse, make_rng,
                     normalised, random_inverse, select_gumbel_topk, select_infobatch,
                     select_random, select_topk)

LOG_FLOOR = 1e-12
"""Scores are clamped here before the log transform: a zero keeps a tiny, finite chance."""


def effective_scores(mode: str, scores: np.ndarray, scored: np.ndarray,
                     prev_scores: Optional[np.ndarray] = None,
                     prev_scored: Optional[np.ndarray] = None,
                     reference: Optional[np.ndarray] = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(selection score, unscored mask, invalid mask) of each id under ``score: mode``.

    - raw: the latest signal; unscored = never scored.
    - drop: previous signal minus the latest; unscored also when there is no finite previous
      score (scored once, or the previous one was NaN/inf).
    - reducible: signal minus ``reference``; unscored also when the reference is NaN/inf.

    Invalid = not unscored, yet the score is NaN/inf (a NaN signal, or an overflowing
    difference): such ids are never selected, as NaN signals never were.
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    if mode == "raw":
        eff, unscored = scores, ~scored
    elif mode == "drop":
        if prev_scores is None or prev_scored is None:
            raise ValueError("score 'drop' needs the previous score table")
        has_prev = prev_scored & np.isfinite(prev_scores)
        with np.errstate(invalid="ignore", over="ignore"):
            eff = prev_scores - scores
        # A NaN newest score stays invalid (as for raw); a finite one without a previous score
        # is "not yet known".
        unscored = ~scored | (finite & ~has_prev)
    elif mode == "reducible":
        if reference is None:
            raise ValueError("score 'reducible' needs the reference scores")
        with np.errstate(invalid="ignore", over="ignore"):
            eff = scores - reference
        unscored = ~scored | (finite & ~np.isfinite(reference))
    else:
        raise ValueError(f"unknown score mode {mode!r}")
    invalid = ~unscored & ~np.isfinite(eff)
    return eff, unscored, invalid


def zscore(values: np.ndarray) -> np.ndarray:
    """(x - mean) / std over ``values`` (population std); all 0 when they are all equal.

    Compared as max == min, not std == 0: the float mean of equal values need not equal them,
    which would leave a tiny spurious spread.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0 or values.max() == values.min():
        return np.zeros(len(values))
    return (values - values.mean()) / values.std()


def _skip_top(ids: np.ndarray, scores: np.ndarray, share: float) -> np.ndarray:
    """Mask of ids kept after removing the floor(share * n) highest scores (ties: lower id)."""
    keep = np.ones(len(ids), dtype=bool)
    n_skip = int(np.floor(share * len(ids)))
    if n_skip:
        keep[np.lexsort((ids, -scores))[:n_skip]] = False
    return keep


def candidates(cfg: AttentConfig, eff: np.ndarray, unscored: np.ndarray, invalid: np.ndarray,
               sources: Optional[np.ndarray] = None
               ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(candidate ids ascending, their selection scores, their sources or None).

    Without ``per_source``: unscored ids take the best known score (exploration, not
    starvation), then ``skip_top`` removes the highest (non-random methods); the log transform
    is left to :func:`select_candidates`, as before. With ``per_source``: the same within each
    source (best known score of that source, 0 when it has none), then the log transform, then a
    z-score over the source's candidates, then ``skip_top`` within the source.
    """
    sel = cfg.selection
    ids = np.flatnonzero(~invalid).astype(np.int64)
    skip = sel.skip_top if sel.method != "random" else 0.0
    if not sel.per_source:
        scores = np.array(eff, dtype=np.float64)
        known = ~unscored & ~invalid
        scores[unscored] = scores[known].max() if known.any() else 0.0
        scores = scores[ids]
        keep = _skip_top(ids, scores, skip) if skip > 0 else np.ones(len(ids), bool)
        return ids[keep], scores[keep], None
    if sources is None:
        raise ValueError("per_source selection needs the sources of the samples")
    out_ids, out_scores, out_sources = [], [], []
    for s in np.unique(sources[ids]).tolist():
        members = ids[sources[ids] == s]
        vals = np.array(eff[members], dtype=np.float64)
        known = ~unscored[members]
        vals[~known] = vals[known].max() if known.any() else 0.0
        if sel.method == "soft" and sel.transform == "log":
            vals = np.log(np.maximum(vals, LOG_FLOOR))
        z = zscore(vals)
        keep = _skip_top(members, z, skip) if skip > 0 else np.ones(len(members), bool)
        out_ids.append(members[keep])
        out_scores.append(z[keep])
        out_sources.append(np.full(int(keep.sum()), s, dtype=np.int64))
    if not out_ids:
        return ids[:0], np.zeros(0), ids[:0]
    all_ids = np.concatenate(out_ids)
    order = np.argsort(all_ids, kind="stable")
    return all_ids[order], np.concatenate(out_scores)[order], np.concatenate(out_sources)[order]


def source_budgets(source_ids: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """k split over sources in proportion to ``counts``: largest remainder, exact total k.

    Each source first gets floor(k * n_s / n); the seats left go one each to the largest
    remainders (k * n_s mod n), ties to the lower source id. Exact integer arithmetic (Python
    ints), so no float rounding decides a seat.
    """
    counts = [int(c) for c in counts]
    n = sum(counts)
    if not 0 <= k <= n:
        raise ValueError(f"budget k={k} must be in [0, {n}]")
    if n == 0:
        return np.zeros(len(counts), dtype=np.int64)
    base = [k * c // n for c in counts]
    rem = [k * c % n for c in counts]
    seats = k - sum(base)
    for i in sorted(range(len(counts)), key=lambda i: (-rem[i], int(source_ids[i])))[:seats]:
        base[i] += 1
    return np.array(base, dtype=np.int64)


def _choose(cfg: AttentConfig, scores: np.ndarray, ids: np.ndarray, k: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(chosen ids ascending, inverse inclusion probabilities) of one source's share."""
    method = cfg.selection.method
    if method == "hard":
        return select_topk(scores, ids, k).ids, np.ones(k)
    if method == "soft":
        return gumbel_topk_inverse(scores, ids, k, cfg.selection.temperature, rng)
    if method == "infobatch":
        return infobatch_inverse(scores, ids, k, rng)
    return random_inverse(ids, k, rng)


def select_candidates(cfg: AttentConfig, p: int, ids: np.ndarray, scores: np.ndarray,
                      sources: Optional[np.ndarray], k: int) -> Selection:
    """The configured method at budget k over the candidates of :func:`candidates`.

    Per source, each share is drawn with its own generator (seed, pass, PURPOSE_SELECT, source)
    and, with ``rescale``, the inverse inclusion probabilities of all sources are normalised
    together to mean 1 (random: n_s / k_s per source, so the estimate stays unbiased across
    sources whose shares round differently).
    """
    sel = cfg.selection
    if sources is None:
        rng = make_rng(cfg.seed, p, PURPOSE_SELECT)
        if sel.method == "hard":
            return select_topk(scores, ids, k)
        if sel.method == "soft":
            if sel.transform == "log":
                scores = np.log(np.maximum(scores, LOG_FLOOR))
            return select_gumbel_topk(scores, ids, k, sel.temperature, rng, rescale=sel.rescale)
        if sel.method == "infobatch":
            return select_infobatch(scores, ids, k, rng, rescale=sel.rescale)
        return select_random(ids, k, rng)
    source_ids, counts = np.unique(sources, return_counts=True)
    budgets = source_budgets(source_ids, counts, k)
    chosen, inverse = [], []
    for s, k_s in zip(source_ids.tolist(), budgets.tolist()):
        if k_s == 0:
            continue
        mine = sources == s
        rng = make_rng(cfg.seed, p, PURPOSE_SELECT, s)
        c, inv = _choose(cfg, scores[mine], ids[mine], k_s, rng)
        chosen.append(c)
        inverse.append(inv)
    if not chosen:
        return Selection(np.zeros(0, np.int64), np.ones(0))
    all_ids, all_inv = np.concatenate(chosen), np.concatenate(inverse)
    order = np.argsort(all_ids, kind="stable")
    weights = normalised(all_inv[order]) if sel.rescale else np.ones(len(all_ids))
    return Selection(all_ids[order].astype(np.int64), weights)


def check_sources(sources: np.ndarray, n: int) -> np.ndarray:
    """Validated per-sample source ids: 1-D, length n, non-negative integers (they seed draws)."""
    arr = np.asarray(sources)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"sources: got an array of shape {arr.shape} and dtype {arr.dtype}; "
                         f"allowed: one integer source id per sample, shape ({n},); fix: pass "
                         "e.g. np.array([0, 1, 0, ...]) (code=0, prose=1) in dataset id order")
    if n and int(arr.min()) < 0:
        raise ValueError(f"sources: got a negative source id {int(arr.min())}; allowed: "
                         "integers >= 0 (they seed each source's draw); fix: renumber the "
                         "sources 0, 1, 2, ...")
    return arr.astype(np.int64)


def check_reference(reference: np.ndarray, n: int) -> np.ndarray:
    """Validated per-sample reference scores: 1-D float, length n (NaN = unknown)."""
    arr = np.asarray(reference)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"reference: got an array of shape {arr.shape} and dtype {arr.dtype}; "
                         f"allowed: one float per sample, shape ({n},), NaN where unknown; fix: "
                         "pass the reference model's per-sample loss in dataset id order")
    return arr.astype(np.float64)


def digest(array: Optional[np.ndarray]) -> Optional[str]:
    """Short content digest of a per-sample array (None stays None), for checkpoint identity."""
    if array is None:
        return None
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=8).hexdigest()


__all__ = ["effective_scores", "zscore", "candidates", "source_budgets", "select_candidates",
           "check_sources", "check_reference", "digest", "LOG_FLOOR"]
