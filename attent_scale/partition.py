"""Id partitioning for passes that every rank must run in lockstep (pool scoring, evaluation).

Under ZeRO-3 and FSDP every forward all-gathers each layer's parameters, a collective: a rank that
runs one forward fewer than the others hangs the job. So each rank gets the same number of
equally-sized batches; ranks with fewer ids pad with dummy rows flagged invalid, whose results are
thrown away.

Pure module: numpy only.
"""
from __future__ import annotations

import math

import numpy as np


def lockstep_batches(ids: np.ndarray, rank: int, world: int, batch_size: int
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's share of ``ids`` as ``(batch_ids, valid)`` pairs, the same count on every rank.

    Rank r takes ids[r::world] (every id on exactly one rank). Every batch has exactly
    ``batch_size`` rows; padding rows repeat a real id and have ``valid`` False. With no ids at
    all, there are no batches.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return []
    per_rank = math.ceil(len(ids) / world)
    n_batches = math.ceil(per_rank / batch_size)
    mine = ids[rank::world]
    filler = mine[0] if len(mine) else ids[0]
    padded = np.full(n_batches * batch_size, filler, dtype=np.int64)
    padded[:len(mine)] = mine
    valid = np.zeros(n_batches * batch_size, dtype=bool)
    valid[:len(mine)] = True
    return [(padded[i:i + batch_size], valid[i:i + batch_size])
            for i in range(0, n_batches * batch_size, batch_size)]
