"""Sharded selection on CPU: latency and peak memory per rank, N from 1e6 up, gloo ranks.

    python tools/bench_select.py --world 4 --sizes 1e6 1e7 1e8 --out runs/bench_select

Each size starts ``--world`` fresh processes (so peak RSS is that size's alone). Every rank fills
its shard of N float64 scores, then times ``sharded_topk`` (hard) and ``sharded_gumbel_topk``
(soft + rescale) of k = ratio x N. Reported per size: the threshold search alone (histogram
rounds + tie counts, what every selection costs) and the whole call including the all-gather of
the k selected ids to every rank (O(k), docs/SCALE.md), slowest rank, best of ``--repeat``; and
the largest peak RSS of a rank. Writes ``select.json`` and ``select.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import numpy as np


def _worker(*args) -> None:
    _measure(*args)
    from attent_scale.comm import shutdown
    shutdown()  # once _measure's objects are gone: see attent_scale.comm.shutdown


def _measure(rank: int, world: int, port: str, n: int, ratio: float, repeat: int,
             gather_ids: bool, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import torch.distributed as dist

    from attent_scale.comm import DistComm
    from attent_scale.policy import PURPOSE_SELECT, make_rng, noise_key, gumbel_noise, gumbel_phi
    from attent_scale.sharded_select import order_key, shard_range, sharded_gumbel_topk, top_mask

    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = DistComm()
    lo, hi = shard_range(n, rank, world)
    ids = np.arange(lo, hi, dtype=np.int64)
    # Losses with few distinct values in the top digits (realistic for the radix rounds).
    scores = np.random.default_rng(rank).gamma(2.0, 1.0, hi - lo)
    k = int(ratio * n)
    out = {}

    def timed(name, fn):
        best = float("inf")
        for _ in range(repeat):
            comm.barrier()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best = min(best, float(comm.all_reduce(np.array([dt]), "max")[0]))
        out[name] = best

    timed("hard_threshold_s", lambda: top_mask(order_key(scores), ids, k, comm))

    def soft_keys():
        keys = gumbel_phi(scores, 1.0) + gumbel_noise(noise_key(make_rng(0, 1, PURPOSE_SELECT)),
                                                      ids)
        top_mask(order_key(keys), ids, k, comm)

    timed("soft_threshold_s", soft_keys)
    if gather_ids:
        from attent_scale.sharded_select import sharded_topk
        timed("hard_total_s", lambda: sharded_topk(scores, ids, k, comm))
        timed("soft_total_s", lambda: sharded_gumbel_topk(
            scores, ids, k, 1.0, make_rng(0, 1, PURPOSE_SELECT), comm, rescale=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out["peak_rss_bytes"] = int(comm.all_reduce(np.array([peak], dtype=np.int64), "max")[0])
    if rank == 0:
        q.put(out)


def run_size(n: int, world: int, ratio: float, repeat: int, gather_ids: bool) -> dict:
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [ctx.Process(target=_worker, args=(r, world, port, n, ratio, repeat, gather_ids, q))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a rank failed at N={n}: exit codes {[p.exitcode for p in procs]}")
    return {"n": n, "world": world, "k": int(ratio * n), **q.get()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4, help="gloo ranks (processes)")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    ap.add_argument("--ratio", type=float, default=0.7, help="k / N")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--gather-ids-up-to", type=float, default=1e8,
                    help="also time the whole call (k ids gathered to every rank) up to this N")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tqdm import tqdm

    rows = []
    for n in tqdm([int(s) for s in args.sizes], desc="sizes"):
        rows.append(run_size(n, args.world, args.ratio, args.repeat,
                             n <= args.gather_ids_up_to))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "rows": rows}
    (args.out / "select.json").write_text(json.dumps(meta, indent=1))
    lines = ["| N | ranks | k | hard threshold s | soft threshold s | hard total s | soft total s "
             "| peak RSS / rank MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key):
            return f"{r[key]:.3f}" if key in r else "-"
        lines.append(f"| {r['n']:.0e} | {r['world']} | {r['k']:.1e} | {f('hard_threshold_s')} | "
                     f"{f('soft_threshold_s')} | {f('hard_total_s')} | {f('soft_total_s')} | "
                     f"{r['peak_rss_bytes'] / 2 ** 20:.0f} |")
    (args.out / "select.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
