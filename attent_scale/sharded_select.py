"""Top-k and Gumbel-top-k over a score table sharded by sample id: no rank holds all N scores.

Rank r of W owns the contiguous ids ``[N*r//W, N*(r+1)//W)`` and stores only their scores. A
selection needs, besides that shard, a handful of fixed-size collectives from ``comm``:

- ``all_reduce(array, op)``: element-wise ``"sum"``/``"max"`` of an int64/float64 array;
- ``gather(*arrays)``: concatenate 1-D arrays in rank order (only for the selected ids at the end);
- ``exchange(dest, *arrays)``: all-to-all routing (only :class:`ShardedScoreTable` uses it);

plus ``rank`` and ``world``. :mod:`attent_scale.comm` implements them; tests may pass any object
with the same methods. This module itself stays pure (numpy only).

The k-th largest key is found by radix select on the key's order-preserving 64-bit pattern: each
round all-reduces a histogram of the next ``DIGIT_BITS`` bits among the keys that still tie with
the threshold found so far (4 rounds of 2^16 int64 counts, 512 KiB each, whatever N is). Ties at
the threshold go to the lowest ids, as in :mod:`attent_scale.policy`: because shards are
contiguous and in rank order, one all-reduce of per-rank tie counts tells each rank how many of its
tied ids it keeps. The result is bit-identical to the whole-array functions of
:mod:`attent_scale.policy` (Gumbel noise there is counter-based, keyed by id, for this reason).

NaN keys are never selected (they are not candidates); +-inf are ordinary keys. -0.0 and +0.0 are
equal keys, as they are for the sort of the whole-array path.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .policy import (EXACT_UNIT_BITS, Selection, exact_sum, gumbel_noise, gumbel_phi, noise_key,
                     normalised, rescale_weights, temperature_error)

DIGIT_BITS = 16
"""Bits resolved per radix round: 4 rounds of a 2^16-bin histogram for a 64-bit key."""
CHUNK = 1 << 22
"""Keys processed at once when building histograms: bounds temporaries to a few tens of MiB."""
_SIGN = np.uint64(1 << 63)


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous ids ``[lo, hi)`` that ``rank`` owns (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def owner_of(ids: np.ndarray, n: int, world: int) -> np.ndarray:
    """Rank that owns each id under :func:`shard_range`."""
    bounds = np.array([shard_range(n, r, world)[0] for r in range(world)], dtype=np.int64)
    return np.searchsorted(bounds, ids, side="right") - 1


def order_key(x: np.ndarray) -> np.ndarray:
    """uint64 whose unsigned order is the float order of ``x`` (NaN must be removed first)."""
    # +0.0 turns -0.0 into 0.0 so the two zeros tie, as they do in a float sort.
    b = (np.asarray(x, dtype=np.float64) + 0.0).view(np.uint64)
    # Negative floats: flip every bit (larger magnitude = smaller); positive: set the sign bit.
    flip = (b >> np.uint64(63)) * np.uint64(0xFFFFFFFFFFFFFFFF) | _SIGN
    return b ^ flip


def _total(comm: Any, local: int) -> int:
    return int(comm.all_reduce(np.array([local], dtype=np.int64), "sum")[0])


def kth_largest(ukeys: np.ndarray, k: int, comm: Any) -> tuple[np.uint64, int]:
    """Collective: the k-th largest key over all ranks (1 <= k <= total) and how many exceed it.

    Each round keeps only the local keys that still share the threshold's leading digits, so after
    the first round the work is usually a small fraction of the shard.
    """
    need = k  # rank of the threshold among the keys still in play
    above = 0
    prefix = np.uint64(0)
    cand = ukeys
    bins = 1 << DIGIT_BITS
    mask = np.uint64(bins - 1)
    for shift in range(64 - DIGIT_BITS, -1, -DIGIT_BITS):
        s = np.uint64(shift)
        hist = np.zeros(bins, dtype=np.int64)
        for i in range(0, len(cand), CHUNK):
            digits = ((cand[i:i + CHUNK] >> s) & mask).view(np.int64)
            hist += np.bincount(digits, minlength=bins)
        hist = comm.all_reduce(hist, "sum")
        from_top = np.cumsum(hist[::-1])  # keys with digit >= bins-1-j
        j = int(np.searchsorted(from_top, need))  # first j with from_top[j] >= need
        d = bins - 1 - j
        over = int(from_top[j] - hist[d])  # keys in play whose digit exceeds d
        above += over
        need -= over
        prefix |= np.uint64(d) << s
        parts = [c[((c >> s) & mask) == np.uint64(d)] for c in
                 (cand[i:i + CHUNK] for i in range(0, len(cand), CHUNK))]
        cand = np.concatenate(parts) if parts else cand[:0]
    return prefix, above


def top_mask(ukeys: np.ndarray, ids: np.ndarray, k: int, comm: Any) -> np.ndarray:
    """Collective: which local entries are among the global top k (key desc, then id asc).

    Every id of rank r must be below every id of rank r+1 (contiguous shards), so tie counts in
    rank order are counts in id order.
    """
    return _top(ukeys, ids, k, comm)[0]


def _top(ukeys: np.ndarray, ids: np.ndarray, k: int,
         comm: Any) -> tuple[np.ndarray, np.uint64, int, int]:
    """(local mask of the top k, k-th largest key, keys above it, total keys) over all ranks."""
    total = _total(comm, len(ukeys))
    if not 0 <= k <= total:
        raise ValueError(f"budget k={k} must be in [0, {total}] (the selectable ids)")
    if k == 0:
        return np.zeros(len(ukeys), dtype=bool), np.uint64(0), 0, total
    threshold, above = kth_largest(ukeys, k, comm)
    keep = ukeys > threshold
    tied = np.flatnonzero(ukeys == threshold)
    counts = np.zeros(comm.world, dtype=np.int64)
    counts[comm.rank] = len(tied)
    counts = comm.all_reduce(counts, "sum")
    before = int(counts[:comm.rank].sum())
    take = min(max(k - above - before, 0), len(tied))
    keep[tied[np.argsort(ids[tied], kind="stable")[:take]]] = True
    return keep, threshold, above, total


def _gathered(comm: Any, ids: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    # Local ids ascending + shards in rank order = globally ascending, as policy's Selection.
    order = np.argsort(ids, kind="stable")
    return comm.gather(ids[order].astype(np.int64), *(a[order] for a in arrays))


def _valid(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = ~np.isnan(scores)
    return np.asarray(scores, dtype=np.float64)[ok], np.asarray(ids, dtype=np.int64)[ok]


def sharded_topk(scores: np.ndarray, ids: np.ndarray, k: int, comm: Any) -> Selection:
    """Collective: :func:`policy.select_topk` over the union of every rank's (scores, ids).

    NaN scores are never selected. Every rank returns the same, whole :class:`Selection`.
    """
    scores, ids = _valid(scores, ids)
    keep = top_mask(order_key(scores), ids, k, comm)
    (sel,) = _gathered(comm, ids[keep])
    return Selection(sel, np.ones(len(sel)))


def sharded_gumbel_topk(scores: np.ndarray, ids: np.ndarray, k: int, temperature: float,
                        rng: np.random.Generator, comm: Any, rescale: bool = False) -> Selection:
    """Collective: :func:`policy.select_gumbel_topk` over every rank's (scores, ids).

    ``rng`` must be in the same state on every rank (built from the same seed): it only supplies
    the noise key, and each rank computes the noise of its own ids from (key, id).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scores, ids = _valid(scores, ids)
    phi = gumbel_phi(scores, temperature)
    keys = phi + gumbel_noise(noise_key(rng), ids)
    # Agreed before any selection collective: every rank raises, none is left waiting.
    if _total(comm, int(np.count_nonzero(~np.isfinite(keys)))):
        raise temperature_error(temperature, _global_abs_max(comm, scores))
    ukeys = order_key(keys)
    keep, threshold, _, total = _top(ukeys, ids, k, comm)
    if not (rescale and 0 < k < total):
        (sel,) = _gathered(comm, ids[keep])
        return Selection(sel, np.ones(len(sel)))
    # kappa, the (k+1)-th largest key: the k-th itself when more than k keys reach it, else the
    # largest key below it. Both in one max all-reduce of two floats.
    at = keys[ukeys == threshold]
    below = keys[ukeys < threshold]
    local = np.array([at[0] if len(at) else -np.inf, below.max() if len(below) else -np.inf,
                      float(np.count_nonzero(ukeys >= threshold))])
    t_float, below_max = comm.all_reduce(local[:2], "max")
    at_or_above = _total(comm, int(local[2]))
    kappa = float(t_float if at_or_above > k else below_max)
    sel, phi_sel = _gathered(comm, ids[keep], phi[keep])
    return Selection(sel, rescale_weights(phi_sel, kappa))


def _global_abs_max(comm: Any, scores: np.ndarray) -> np.ndarray:
    finite = scores[np.isfinite(scores)]
    local = float(np.abs(finite).max()) if len(finite) else 0.0
    return comm.all_reduce(np.array([local]), "max")


EXACT_LIMBS = 72
"""32-bit limbs of an exact sum: in units of 2^-1126, |sum| < 2^(2098 + 53 + 64) for up to 2^64
finite doubles, within the 2304 bits of 72 limbs."""


def sharded_exact_mean(values: np.ndarray, comm: Any) -> float:
    """Collective: :func:`policy.exact_mean` of the union of every rank's values, bit for bit.

    Each rank's exact integer sum travels as signed 32-bit limbs in int64, so one sum all-reduce
    adds them without rounding (and without overflow for fewer than 2^31 ranks).
    """
    values = np.asarray(values, dtype=np.float64)
    # Agreed first: a rank raising alone would leave the others waiting in the all-reduce.
    if _total(comm, int(np.count_nonzero(~np.isfinite(values)))):
        raise ValueError("sharded_exact_mean needs finite values; drop NaN/inf candidates first")
    local = exact_sum(values)
    sign, mag = (-1 if local < 0 else 1), abs(local)
    limbs = np.array([sign * ((mag >> (32 * i)) & 0xFFFFFFFF) for i in range(EXACT_LIMBS)] +
                     [len(values)], dtype=np.int64)
    summed = comm.all_reduce(limbs, "sum").tolist()
    total = sum(int(v) << (32 * i) for i, v in enumerate(summed[:-1]))
    n = int(summed[-1])
    if n == 0:
        raise ValueError("the mean of no values")
    return total / (n << EXACT_UNIT_BITS)


def sharded_infobatch(scores: np.ndarray, ids: np.ndarray, k: int, rng: np.random.Generator,
                      comm: Any, rescale: bool = False) -> Selection:
    """Collective: :func:`policy.select_infobatch` over every rank's (scores, ids), bit for bit.

    The exact mean makes "hard" the same set on any partition; the draws are the top-k of the
    same per-id counter noise as the whole-array path, within the hard or the easy ids.
    """
    scores, ids = _valid(scores, ids)
    total = _total(comm, len(ids))
    if not 0 <= k <= total:
        raise ValueError(f"budget k={k} must be in [0, {total}] (the selectable ids)")
    if k == 0:
        return Selection(np.zeros(0, np.int64), np.ones(0))
    hard = scores > sharded_exact_mean(scores, comm)
    noise = order_key(gumbel_noise(noise_key(rng), ids))
    n_hard = _total(comm, int(np.count_nonzero(hard)))
    keep = np.zeros(len(ids), dtype=bool)
    inv = np.ones(len(ids))
    if n_hard >= k:
        keep[hard] = top_mask(noise[hard], ids[hard], k, comm)
        inv[:] = n_hard / k
    else:
        fill = k - n_hard
        keep[~hard] = top_mask(noise[~hard], ids[~hard], fill, comm)
        keep[hard] = True
        inv[~hard] = (total - n_hard) / fill
    sel, inv_sel = _gathered(comm, ids[keep], inv[keep])
    return Selection(sel, normalised(inv_sel) if rescale else np.ones(len(sel)))


def latest_records(ids: np.ndarray, vals: np.ndarray,
                   stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct id: (ids ascending, latest value, has an earlier record, that record's value).

    Latest = largest stamp; within one stamp the later record (higher rank, then later in the
    rank's list) wins. The runner-up is what ``score: drop`` calls the previous score when an id
    was scored twice between two syncs.
    """
    order = np.lexsort((np.arange(len(ids)), stamps))[::-1]
    ids_o, vals_o = ids[order], vals[order]
    by_id = np.argsort(ids_o, kind="stable")  # keeps latest-first within each id
    ids_s, vals_s = ids_o[by_id], vals_o[by_id]
    start = np.flatnonzero(np.r_[True, ids_s[1:] != ids_s[:-1]]) if len(ids_s) else \
        np.zeros(0, np.int64)
    count = np.diff(np.r_[start, len(ids_s)])
    second = count >= 2
    runner_up = np.full(len(start), np.nan)
    runner_up[second] = vals_s[start[second] + 1]
    return ids_s[start], vals_s[start], second, runner_up


def apply_records(scores: np.ndarray, scored: np.ndarray,
                  prev: Optional[tuple[np.ndarray, np.ndarray]], local_ids: np.ndarray,
                  vals: np.ndarray, stamps: np.ndarray, offset: int) -> None:
    """Write records (ids ``offset``-based) into a score table in place; keep the previous
    score in ``prev = (prev_scores, prev_scored)`` when given (``score: drop``)."""
    ids, latest, second, runner_up = latest_records(local_ids, vals, stamps)
    at = ids - offset
    if prev is not None:
        prev_scores, prev_scored = prev
        # The previous score: the runner-up of this batch, else what the table held.
        before = np.where(second, runner_up, scores[at])
        prev_scores[at] = before
        prev_scored[at] = second | scored[at]
    scores[at] = latest
    scored[at] = True


class ShardedScoreTable:
    """This rank's shard of the score table, and the routing of new scores to their owners.

    Memory per rank: 9 bytes per owned id (float64 score + scored flag), i.e. 9 N / world bytes;
    18 with ``keep_prev`` (``score: drop`` keeps each id's previous score too).
    """

    def __init__(self, n: int, comm: Any, keep_prev: bool = False):
        self.n, self.comm = n, comm
        self.lo, self.hi = shard_range(n, comm.rank, comm.world)
        self.scores = np.full(self.hi - self.lo, np.nan, dtype=np.float64)
        self.scored = np.zeros(self.hi - self.lo, dtype=bool)
        self.prev_scores = np.full(self.hi - self.lo, np.nan) if keep_prev else None
        self.prev_scored = np.zeros(self.hi - self.lo, dtype=bool) if keep_prev else None

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.lo, self.hi, dtype=np.int64)

    def merge(self, ids: np.ndarray, vals: np.ndarray, stamps: np.ndarray) -> None:
        """Collective: route (id, score, stamp) records to their owners; the latest stamp wins.

        Records arrive in source-rank order, each source's in the order it recorded them, so the
        tie rule (later rank wins within one stamp) is the gathered table's.
        """
        ids = np.asarray(ids, dtype=np.int64)
        bad = int(np.count_nonzero((ids < 0) | (ids >= self.n)))
        # Agree before routing so every rank raises, rather than the others hanging.
        if _total(self.comm, bad):
            raise ValueError(f"score for sample id outside [0, {self.n}) received")
        dest = owner_of(ids, self.n, self.comm.world)
        ids, vals, stamps = self.comm.exchange(dest, ids, np.asarray(vals, np.float64),
                                               np.asarray(stamps, np.int64))
        prev = None if self.prev_scores is None else (self.prev_scores, self.prev_scored)
        apply_records(self.scores, self.scored, prev, ids, vals, stamps, self.lo)

    def load_full(self, scores: np.ndarray, scored: np.ndarray,
                  prev_scores: Optional[np.ndarray] = None,
                  prev_scored: Optional[np.ndarray] = None) -> None:
        """Take this rank's slice of whole-table arrays (e.g. a checkpoint from another world)."""
        self.scores = np.array(scores[self.lo:self.hi], dtype=np.float64)
        self.scored = np.array(scored[self.lo:self.hi], dtype=bool)
        if self.prev_scores is not None:
            if prev_scores is None:  # saved without them: no id has a previous score yet
                self.prev_scores = np.full(self.hi - self.lo, np.nan)
                self.prev_scored = np.zeros(self.hi - self.lo, dtype=bool)
            else:
                self.prev_scores = np.array(prev_scores[self.lo:self.hi], dtype=np.float64)
                self.prev_scored = np.array(prev_scored[self.lo:self.hi], dtype=bool)


def global_max(comm: Any, values: np.ndarray) -> Optional[float]:
    """Collective: the largest value over ranks, None when every rank's array is empty."""
    local = float(values.max()) if len(values) else -np.inf
    present = _total(comm, int(len(values) > 0))
    out = float(comm.all_reduce(np.array([local], dtype=np.float64), "max")[0])
    return out if present else None


def order_statistic(ukeys_keys: tuple[np.ndarray, np.ndarray], j: int, comm: Any) -> float:
    """Collective: the j-th smallest (0-based) value over ranks, from (order keys, float values)."""
    ukeys, vals = ukeys_keys
    total = _total(comm, len(ukeys))
    threshold, _ = kth_largest(ukeys, total - j, comm)
    hit = vals[ukeys == threshold]
    local = float(hit[0]) if len(hit) else -np.inf
    return float(comm.all_reduce(np.array([local], dtype=np.float64), "max")[0])


def quantiles(values: np.ndarray, qs: list[float], comm: Any) -> list[float]:
    """Collective: ``np.quantile(all values, qs)`` (linear method) without gathering the values.

    Uses numpy's own formulas for the virtual index and the interpolation, so the result equals
    the gathered computation up to float rounding (for the log line, not the selection).
    """
    values = np.asarray(values, dtype=np.float64)
    n = _total(comm, len(values))
    if n == 0:
        return [float("nan")] * len(qs)
    pair = (order_key(values), values)
    out = []
    for q in qs:
        virtual = n * q + (1 - q) - 1  # numpy's (alpha=1, beta=1) virtual index
        lo = int(np.floor(virtual))
        gamma = virtual - lo
        lo = min(max(lo, 0), n - 1)
        a = order_statistic(pair, lo, comm)
        b = order_statistic(pair, min(lo + 1, n - 1), comm)
        diff = b - a
        out.append(float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma))
    return out


__all__ = ["shard_range", "owner_of", "order_key", "kth_largest", "top_mask", "sharded_topk",
           "sharded_gumbel_topk", "sharded_infobatch", "sharded_exact_mean", "sharded_random",
           "ShardedScoreTable", "latest_records", "apply_records", "global_max", "quantiles",
           "ShardFiles"]


def sharded_random(ids: np.ndarray, k: int, rng: np.random.Generator, comm: Any) -> Selection:
    """Collective: :func:`policy.select_random` (top k of per-id counter noise) over every rank."""
    ids = np.asarray(ids, dtype=np.int64)
    return sharded_topk(gumbel_noise(noise_key(rng), ids), ids, k, comm)


class ShardFiles:
    """Whole-table view of score shards saved as ``.npy`` files by ranks of any world size.

    Slicing reads only the files that overlap the slice (memory-mapped), so a rank re-sharding a
    checkpoint touches only its own range; ``np.asarray`` materialises the whole table.
    """

    def __init__(self, parts: list[tuple[int, int, np.ndarray]], dtype: Any):
        self.parts = sorted(parts, key=lambda p: p[0])
        self.dtype = np.dtype(dtype)
        self.shape = (self.parts[-1][1] if self.parts else 0,)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, s: slice) -> np.ndarray:
        lo, hi, _ = s.indices(len(self))
        out = [a[max(lo, a_lo) - a_lo:min(hi, a_hi) - a_lo]
               for a_lo, a_hi, a in self.parts if a_lo < hi and a_hi > lo]
        return np.concatenate(out).astype(self.dtype) if out else np.zeros(0, self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = self[0:len(self)]
        return full if dtype is None else full.astype(dtype)
