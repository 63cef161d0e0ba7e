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

import numpy as np

# Purposes keep the streams of different draws apart even for the same (seed, pass).
PURPOSE_SELECT = 1
PURPOSE_POOL = 2
PURPOSE_REMAINDER = 3


def make_rng(seed: int, pass_index: int, purpose: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, pass_index, purpose])))


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


def select_gumbel_topk(scores: np.ndarray, ids: np.ndarray, k: int, temperature: float,
                       rng: np.random.Generator, rescale: bool = False) -> Selection:
    """Sample k ids without replacement with probability proportional to exp(score / T).

    Implemented as top-k of score / T + Gumbel noise, the noise of each id keyed by
    (:func:`noise_key` of ``rng``, id). With ``rescale`` the weights are the inverse conditional
    inclusion probabilities, normalised to mean 1 over the selection in id order (a fixed order,
    so a sharded computation can reproduce the same float sum).
    """
    _check(scores, ids, k)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    phi = gumbel_phi(scores, temperature)
    keys = phi + gumbel_noise(noise_key(rng), ids)
    order = _order_desc(keys, ids)
    chosen = order[:k]
    chosen = chosen[np.argsort(ids[chosen], kind="stable")]
    weights = np.ones(k)
    if rescale and 0 < k < len(ids):
        weights = rescale_weights(phi[chosen], keys[order[k]])
    return Selection(ids[chosen].astype(np.int64), weights.astype(np.float64))


def gumbel_phi(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Unperturbed log-weights score / T (float64), shared by the gathered and sharded paths."""
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
