"""Selection policies: pure functions of (scores, ids, budget, generator).

Every function breaks ties by sample id, so the result is the same on every rank that holds the same
scores, and each random draw comes from an explicit ``numpy.random.Generator`` built by
:func:`make_rng` from (seed, pass, purpose): no global RNG is touched, and resuming needs no
generator state beyond those integers.

Pure module: numpy only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

# Purposes keep the streams of different draws apart even for the same (seed, pass).
PURPOSE_SELECT = 1
PURPOSE_POOL = 2
PURPOSE_REMAINDER = 3


class SelectionError(RuntimeError):
    """A selection cannot be made as configured (for example the budget rounds to zero)."""


def make_rng(seed: int, pass_index: int, purpose: int,
             source: Optional[int] = None) -> np.random.Generator:
    """The generator of one draw, from (seed, pass, purpose[, source]) and nothing else.

    ``source`` (>= 0) separates the draws of per-source selection; without it the stream is the
    one every earlier release drew, so old selections reproduce. It enters as ``source + 1``:
    SeedSequence zero-pads short entropy, so a literal 0 would replay the sourceless stream.
    """
    if source is not None and source < 0:
        raise ValueError(f"source must be >= 0, got {source}")
    entropy = [seed, pass_index, purpose] + ([] if source is None else [source + 1])
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def round_budget(n: int, ratio: float, multiple: int) -> int:
    """floor(ratio * n) rounded down to a multiple of ``multiple`` (the global batch in samples).

    Rounding down is the remainder rule: every pass is a whole number of global batches, so each
    selected id is trained exactly once and no rank pads or repeats.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    # The small epsilon keeps e.g. 0.29 * 100 = 28.999... from losing a sample; it grows with the
    # product because the float error does (0.29 * 1e8 = 28999999.999999996).
    x = ratio * n
    k = int(np.floor(x + max(1e-9, 1e-12 * x)))
    return (k // multiple) * multiple


@dataclass(frozen=True)
class Selection:
    ids: np.ndarray
    """Selected sample ids, sorted ascending (int64)."""
    weights: np.ndarray
    """Loss weight per selected id (same order), mean 1."""

    @property
    def checksum(self) -> int:
        return selection_checksum(self.ids, self.weights)


def selection_checksum(ids: np.ndarray, weights: np.ndarray | None = None) -> int:
    """63-bit digest of a selection; equal on every rank or the ranks disagree."""
    h = hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=8)
    if weights is not None:
        h.update(np.ascontiguousarray(weights, dtype=np.float64).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def _check(scores: np.ndarray, ids: np.ndarray, k: int) -> None:
    if scores.shape != ids.shape or scores.ndim != 1:
        raise ValueError(f"scores and ids must be 1-D of equal length, got {scores.shape} and "
                         f"{ids.shape}")
    if not 0 <= k <= len(ids):
        raise ValueError(f"budget k={k} must be in [0, {len(ids)}]")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite; drop NaN/inf candidates before selecting")


def _order_desc(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    # lexsort sorts by the last key first: descending key, then ascending id for ties.
    return np.lexsort((ids, -keys))


def _finish(ids: np.ndarray, weights: np.ndarray) -> Selection:
    order = np.argsort(ids, kind="stable")
    return Selection(ids[order].astype(np.int64), weights[order].astype(np.float64))


def select_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> Selection:
    """The k highest scores (the paper's hard selection). Ties go to the lower id."""
    _check(scores, ids, k)
    top = _order_desc(scores, ids)[:k]
    return _finish(ids[top], np.ones(k))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection of uint64 whose outputs pass BigCrush as a counter RNG."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def noise_key(rng: np.random.Generator) -> int:
    """One 64-bit key drawn from ``rng``: it names the noise of one Gumbel-top-k draw."""
    return int(rng.integers(0, 2 ** 64, dtype=np.uint64))


def gumbel_noise(key: int, ids: np.ndarray) -> np.ndarray:
    """Standard Gumbel noise of each id, a pure function of (key, id).

    Counter-based (splitmix64 of key + id) rather than drawn in array order, so a rank holding only
    a shard of the ids computes exactly the noise the whole-array path gives those ids: the sharded
    selection (:mod:`attent_scale.sharded_select`) is bit-identical to this module's.
    """
    x = np.asarray(ids).astype(np.uint64) * _GOLDEN + np.uint64(key)
    bits = _mix64(_mix64(x)) >> np.uint64(11)
    # 53 random bits, centred in their cell: u in (0, 1) exactly, so both logs stay finite.
    u = (bits.astype(np.float64) + 0.5) * (2.0 ** -53)
    return -np.log(-np.log(u))


def gumbel_inclusion(phi: np.ndarray, kappa: float) -> np.ndarray:
    """P(example is in the Gumbel-top-k set | threshold kappa) = 1 - exp(-exp(phi - kappa)).

    kappa is the (k+1)-th largest perturbed key; conditioning on it makes sum(f_i / q_i) over the
    selected set an unbiased estimate of sum(f_i) (Kool, van Hoof & Welling, 2019/2020).
    """
    return -np.expm1(-np.exp(np.minimum(phi - kappa, 50.0)))


def temperature_error(temperature: float, scores: np.ndarray) -> SelectionError:
    """The error for keys score / T that left float64 (the config bound makes this rare)."""
    finite = np.asarray(scores)[np.isfinite(scores)]
    big = float(np.abs(finite).max()) if len(finite) else float("nan")
    return SelectionError(
        f"attent.selection.temperature: got {temperature}; score / temperature is not finite in "
        f"float64 (largest |score| {big:.3g}); allowed: a temperature with |score| / temperature "
        "< 1.8e308; fix: raise attent.selection.temperature or bring the signal to a smaller scale")


def select_gumbel_topk(scores: np.ndarray, ids: np.ndarray, k: int, temperature: float,
                       rng: np.random.Generator, rescale: bool = False) -> Selection:
    """Sample k ids without replacement with probability proportional to exp(score / T).

    Implemented as top-k of score / T + Gumbel noise, the noise of each id keyed by
    (:func:`noise_key` of ``rng``, id). With ``rescale`` the weights are the inverse conditional
    inclusion probabilities, normalised to mean 1 over the selection in id order (a fixed order,
    so a sharded computation can reproduce the same float sum).
    """
    chosen, inv = gumbel_topk_inverse(scores, ids, k, temperature, rng)
    weights = inv / inv.mean() if rescale and 0 < k < len(ids) else np.ones(k)
    return Selection(chosen, weights.astype(np.float64))


def gumbel_topk_inverse(scores: np.ndarray, ids: np.ndarray, k: int, temperature: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gumbel-top-k: (chosen ids ascending, their inverse conditional inclusion probabilities).

    The inverses are not normalised (1 when every id is chosen): per-source selection combines
    them over sources before normalising, which keeps the estimate unbiased across strata.
    """
    _check(scores, ids, k)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    phi = gumbel_phi(scores, temperature)
    keys = phi + gumbel_noise(noise_key(rng), ids)
    if not np.all(np.isfinite(keys)):
        raise temperature_error(temperature, scores)
    order = _order_desc(keys, ids)
    chosen = order[:k]
    chosen = chosen[np.argsort(ids[chosen], kind="stable")]
    inv = np.ones(k)
    if 0 < k < len(ids):
        inv = 1.0 / gumbel_inclusion(phi[chosen], keys[order[k]])
    return ids[chosen].astype(np.int64), inv


def gumbel_phi(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Unperturbed log-weights score / T (float64), shared by the gathered and sharded paths."""
    with np.errstate(over="ignore"):  # an overflow is reported by the callers' key check
        return np.asarray(scores).astype(np.float64) / temperature


def rescale_weights(phi_selected: np.ndarray, kappa: float) -> np.ndarray:
    """Inverse conditional inclusion probabilities of the selection (in id order), mean 1."""
    inv = 1.0 / gumbel_inclusion(phi_selected, kappa)
    return inv / inv.mean()


def select_random(ids: np.ndarray, k: int, rng: np.random.Generator) -> Selection:
    """k ids uniformly without replacement: the budget-matched control.

    Every id has inclusion probability k/n, so rescaled weights are all 1. The k ids with the
    largest counter noise (:func:`gumbel_noise`, keyed by id) rather than a permutation in array
    order, so a rank holding a shard of the ids can take part (sharded_select.sharded_random).
    """
    _check(np.zeros(len(ids)), ids, k)
    return select_topk(gumbel_noise(noise_key(rng), ids), ids, k)


def random_inverse(ids: np.ndarray, k: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """:func:`select_random` with its inverse inclusion probabilities n / k (per-source use)."""
    sel = select_random(ids, k, rng)
    return sel.ids, np.full(k, len(ids) / k if k else 1.0)


# ---- exact mean (InfoBatch's threshold) ---------------------------------------------------------
# InfoBatch splits at the mean score. A float sum depends on the order of its terms, so the
# sharded path (sums per rank, then over ranks) would not reproduce np.mean bit for bit and an
# example close to the mean could land on different sides. Both paths therefore sum exactly, in
# integers: every finite double is m * 2^(e - 53) with |m| < 2^53 and e in [-1073, 1024] (np.frexp),
# i.e. an integer multiple of 2^-1126, and the mean is one correctly rounded division.
EXACT_UNIT_BITS = 1126
"""Exact sums are integers in units of 2^-1126 (the smallest frexp step of a double)."""
_EXP_BINS = 1024 + 1073 + 1
_SUM_CHUNK = 1 << 22


def exact_sum(values: np.ndarray) -> int:
    """sum(values) * 2^1126 as an exact Python int (values finite float64)."""
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("exact_sum needs finite values; drop NaN/inf candidates first")
    total = 0
    for start in range(0, len(v), _SUM_CHUNK):
        m, e = np.frexp(v[start:start + _SUM_CHUNK])
        mant = (m * 2.0 ** 53).astype(np.int64)  # exact: |m| < 1 has 53 significant bits
        # Split the mantissa so each bin's float sum stays an exact integer (< 2^49 per chunk).
        hi, lo = mant >> 26, mant & ((1 << 26) - 1)
        shift = e.astype(np.int64) + 1073  # x = mant * 2^(shift - 1126)
        s_hi = np.bincount(shift, weights=hi, minlength=_EXP_BINS)
        s_lo = np.bincount(shift, weights=lo, minlength=_EXP_BINS)
        for j in np.flatnonzero((s_hi != 0) | (s_lo != 0)).tolist():
            total += ((int(s_hi[j]) << 26) + int(s_lo[j])) << j
    return total


def exact_mean(values: np.ndarray) -> float:
    """The mean of ``values``, correctly rounded (independent of their order or partition)."""
    n = len(values)
    if n == 0:
        raise ValueError("the mean of no values")
    # int / int is correctly rounded in Python, so one rounding for the whole mean.
    return exact_sum(values) / (n << EXACT_UNIT_BITS)


# ---- InfoBatch -----------------------------------------------------------------------------------

def infobatch_inverse(scores: np.ndarray, ids: np.ndarray, k: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """InfoBatch at a fixed budget: (chosen ids ascending, inverse inclusion probabilities).

    "Hard" = score > the (exact) mean score. Every hard id is kept when they fit in k (more than
    k: a uniform k of them); the rest of the budget is a uniform draw from the others. One
    counter-noise key (:func:`gumbel_noise`, keyed by id) serves both draws, so a rank holding a
    shard of the ids reproduces them (sharded_select.sharded_infobatch). Inverses: kept hard ids
    n_hard / kept_hard (1 when all fit), kept easy ids n_easy / kept_easy.
    """
    _check(scores, ids, k)
    ids = np.asarray(ids, dtype=np.int64)
    if k == 0:
        return ids[:0], np.ones(0)
    hard = scores > exact_mean(scores)
    noise = gumbel_noise(noise_key(rng), ids)
    n_hard = int(np.count_nonzero(hard))
    if n_hard >= k:
        chosen = select_topk(noise[hard], ids[hard], k).ids
        return chosen, np.full(k, n_hard / k)
    fill = k - n_hard
    easy = select_topk(noise[~hard], ids[~hard], fill).ids
    chosen = np.concatenate([ids[hard], easy])
    inv = np.concatenate([np.ones(n_hard), np.full(fill, (len(ids) - n_hard) / fill)])
    order = np.argsort(chosen, kind="stable")
    return chosen[order], inv[order]


def select_infobatch(scores: np.ndarray, ids: np.ndarray, k: int, rng: np.random.Generator,
                     rescale: bool = False) -> Selection:
    """InfoBatch-style pruning at budget k (see :func:`infobatch_inverse`).

    With ``rescale`` a kept below-mean id weighs (number below mean) / (number below mean kept)
    and a hard one 1, normalised to mean 1 over the selection in id order: InfoBatch's loss
    rescaling, so the pruned easy examples still count in expectation.
    """
    chosen, inv = infobatch_inverse(scores, ids, k, rng)
    return Selection(chosen, normalised(inv) if rescale else np.ones(len(chosen)))


def normalised(inverse: np.ndarray) -> np.ndarray:
    """Weights of mean 1 over the selection (id order: a fixed float sum for every path)."""
    inverse = np.asarray(inverse, dtype=np.float64)
    return inverse / inverse.mean() if len(inverse) else inverse
