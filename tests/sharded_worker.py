"""One gloo rank of tests/test_sharded_select.py: runs every case on its shard, saves the results.

Usage: python sharded_worker.py RANK WORLD PORT OUT_DIR [CHECKPOINT_IN]
Every rank builds the same whole-array inputs from fixed seeds and keeps only its own ids, so the
parent can compute the whole-array reference from the same :func:`cases`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

N = 203  # not a multiple of 2 or 4: shards of unequal size


def case_scores(seed: int, n: int = N) -> np.ndarray:
    """Scores with many ties (a few distinct values), NaN, +-0.0 and duplicates of a value."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, n).astype(np.float64) * 0.25 - 0.5
    s[rng.choice(n, 15, replace=False)] = np.nan
    s[rng.choice(n, 6, replace=False)] = -0.0
    s[rng.choice(n, 4, replace=False)] = rng.normal(size=4)  # a few unique values
    return s


def cases() -> list[tuple[str, int, str, dict]]:
    """(name, data seed, method, options incl. k); k counts the non-NaN ids of that data."""
    out = []
    for seed in (1, 2):
        valid = int(np.count_nonzero(~np.isnan(case_scores(seed))))
        for k in (0, 1, 37, 100, valid - 1, valid):
            out.append((f"hard-{seed}-{k}", seed, "hard", {"k": k}))
        for k in (1, 60, valid - 1, valid):
            out.append((f"soft-{seed}-{k}", seed, "soft", {"k": k, "t": 0.5, "rescale": True}))
        out.append((f"soft-norescale-{seed}", seed, "soft", {"k": 50, "t": 2.0, "rescale": False}))
        out.append((f"soft-log-{seed}", seed, "soft",
                    {"k": 70, "t": 0.7, "rescale": True, "log": True}))
        out.append((f"random-{seed}", seed, "random", {"k": 80}))
        # InfoBatch: budgets below, at and above the number of above-mean ids
        hard = int(np.count_nonzero(case_scores(seed) > np.nanmean(case_scores(seed))))
        for k in (1, hard - 1, hard, hard + 1, 120, valid):
            out.append((f"infobatch-{seed}-{k}", seed, "infobatch", {"k": k, "rescale": True}))
        out.append((f"infobatch-norescale-{seed}", seed, "infobatch", {"k": 90, "rescale": False}))
    return out


TEACHER_METHODS = ("hard", "infobatch", "soft")
"""Teachers the gloo ranks run sharded (soft last: the resume case reuses its config)."""


def teacher_section(method: str, sharding: str) -> dict:
    """The teacher of the multi-rank cases; infobatch also ranks by ``score: drop``."""
    return {"seed": 4, "warmup_passes": 1, "ratio": {"value": 0.5},
            "score": "drop" if method == "infobatch" else "raw",
            "selection": {"method": method, "sharding": sharding, "skip_top": 0.05,
                          "rescale": method != "hard",
                          "transform": "log" if method == "soft" else "identity"}}


def teacher_records(n: int, world: int, rank: int):
    """Score records of three steps, split over ranks, with repeats (latest stamp wins)."""
    rng = np.random.default_rng(5)
    for stamp in range(3):
        ids = rng.choice(n, n // 2, replace=True)  # duplicate ids within and across ranks
        vals = np.round(rng.normal(size=len(ids)), 1) + 2.0  # ties, all > 0 (log transform)
        vals[rng.choice(len(ids), 3, replace=False)] = np.nan
        yield stamp, ids[rank::world], vals[rank::world]


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import torch.distributed as dist

    from attent_scale.comm import DistComm
    from attent_scale.config import parse_attent
    from attent_scale.policy import PURPOSE_SELECT, make_rng
    from attent_scale.sharded_select import (quantiles, shard_range, sharded_exact_mean,
                                             sharded_gumbel_topk, sharded_infobatch,
                                             sharded_random, sharded_topk)
    from attent_scale.teacher import Teacher

    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = DistComm()
    res: dict[str, np.ndarray] = {}
    lo, hi = shard_range(N, rank, world)
    for name, seed, method, o in cases():
        scores = case_scores(seed)[lo:hi]
        ids = np.arange(lo, hi)
        rng = make_rng(seed, 3, PURPOSE_SELECT)
        if method == "hard":
            sel = sharded_topk(scores, ids, o["k"], comm)
        elif method == "soft":
            if o.get("log"):
                scores = np.log(np.maximum(np.abs(scores), 1e-12))
            sel = sharded_gumbel_topk(scores, ids, o["k"], o["t"], rng, comm, o["rescale"])
        elif method == "infobatch":
            sel = sharded_infobatch(scores, ids, o["k"], rng, comm, o["rescale"])
        else:
            sel = sharded_random(ids[~np.isnan(scores)], o["k"], rng, comm)
        res[f"{name}/ids"], res[f"{name}/weights"] = sel.ids, sel.weights
    x = case_scores(1)
    res["exact_mean"] = np.array([sharded_exact_mean(x[lo:hi][~np.isnan(x[lo:hi])], comm)])
    res["quantiles"] = np.array(quantiles(
        case_scores(1)[lo:hi][~np.isnan(case_scores(1)[lo:hi])], [0.1, 0.5, 0.9], comm))

    # The collectives themselves.
    res["sum"] = comm.all_reduce(np.arange(4, dtype=np.int64) * (rank + 1), "sum")
    res["max"] = comm.all_reduce(np.array([rank * 1.5, -rank]), "max")
    dest = np.arange(10) % world
    res["got_ids"], res["got_src"] = comm.exchange(dest, np.arange(10) + 100 * rank,
                                                   np.full(10, float(rank)))

    # The teacher, sharded, through sync -> select -> save (and resume from a whole-table file).
    for method in TEACHER_METHODS:
        cfg = parse_attent(teacher_section(method, "sharded"))
        t = Teacher(cfg, N, 3, 4, comm)
        assert t.sharded
        for stamp, ids, vals in teacher_records(N, world, rank):
            t.record(ids, vals, stamp)
        sel, summary = t.begin_pass(1)
        res[f"teacher-{method}/ids"], res[f"teacher-{method}/weights"] = sel.ids, sel.weights
        res[f"teacher-{method}/summary"] = np.array(
            [summary.invalid, summary.unscored, summary.selected_mean_score,
             *summary.score_quantiles])
        t.save(out / f"ckpt-{method}")
        dist.barrier()
    if len(sys.argv) > 5:  # a checkpoint written by one whole-table rank: re-shard and select
        t = Teacher(cfg, N, 3, 4, comm)
        t.load_state_dict(*Teacher.read(Path(sys.argv[5])))
        res["resumed/ids"] = t.begin_pass(2)[0].ids
    np.savez(out / f"rank{rank}.npz", **res)


if __name__ == "__main__":
    main()
    from attent_scale.comm import shutdown
    shutdown()  # once main's objects (model, groups) are gone: see attent_scale.comm.shutdown
