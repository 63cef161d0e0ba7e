"""Scaling of plain DeepSpeed and of the plugin over 1, 2 and 4 GPUs, ZeRO-2 and ZeRO-3.

Whole-run throughput on a shared host drifts by more than the teacher costs (docs/BENCHMARKS.md
§1b), so, as in bench_scoring.py, each world size is one torchrun launch that times both arms on
the same engine and batches, interleaved block by block:

- plain: forward, mean loss, backward, optimizer step (what the job does without ``attent``);
- teacher: the same step through the public ``Teaching.update`` with free ``loss`` scores,
  the scores kept on the device and flushed to the teacher every 10 steps,
  as the job does between its logging points.

The selection at a pass end (gather every rank's scores, then select) is timed on its own, for a
score table of ``--pass-samples`` examples, and spread over that pass's optimizer steps.

    python tools/bench_scaling.py --out runs/scaling --gpus 1,2,4 --zero 2,3

Writes scaling.json and scaling.md into --out. Needs GPUs (CPU timings mean nothing here).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLUSH_EVERY = 10  # steps between host copies of queued scores (the job's logging interval)


def worker(args) -> None:
    import deepspeed

    from attent_scale import Teaching, causal_token_losses
    from attent_scale.comm import make_comm
    from attent_scale.deepspeed_plugin import build_engine
    from attent_scale.model import build_model

    cuda = args.device == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()
    comm = make_comm()
    world = comm.world
    model = build_model(args.model, args.vocab_size, args.seq_len, seed=0)
    engine = build_engine(model, {
        "train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9, "bf16": {"enabled": cuda}, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}})
    gen = torch.Generator().manual_seed(1000 + comm.rank)  # each rank its own batches
    batches = [torch.randint(0, args.vocab_size, (args.micro, args.seq_len), generator=gen).to(device)
               for _ in range(4)]
    global_batch = args.micro * world
    pass_samples = args.pass_samples - args.pass_samples % global_batch
    teaching = Teaching({"preset": "attent-simple"}, pass_samples, 2, global_batch, comm=comm)
    state = {"step": 0}

    def step(score: bool) -> None:
        i = state["step"]
        tokens = batches[i % len(batches)]
        if score:
            # Ids of this rank's rows, as the streaming partition hands them out.
            ids = (np.arange(args.micro) + (i * world + comm.rank) * args.micro) % pass_samples
            with teaching.recording():
                logits = engine(input_ids=tokens).logits
            loss = teaching.update(ids, logits=logits, labels=tokens)
        else:
            ce, _ = causal_token_losses(engine(input_ids=tokens).logits, tokens)
            loss = ce.mean()
        engine.backward(loss)
        engine.step()
        state["step"] = i + 1
        if score and state["step"] % FLUSH_EVERY == 0:
            teaching.flush()

    def block(score: bool) -> float:
        synchronize()
        comm.barrier()
        start = time.perf_counter()
        for _ in range(args.block):
            step(score)
        synchronize()
        return (time.perf_counter() - start) / args.block * 1e3

    for _ in range(3):
        block(False)
        block(True)
    plain, taught = [], []
    for r in range(args.rounds):
        # Alternate which arm goes first, so a drift within a round favours neither.
        first, second = (plain, taught) if r % 2 == 0 else (taught, plain)
        first.append(block(first is taught))
        second.append(block(second is taught))
    teaching.flush()
    teaching.teacher.sync()

    # The pass end: every rank's scores for a whole pass, gathered, then the selection.
    rng = np.random.default_rng(comm.rank)
    mine = np.arange(comm.rank, pass_samples, world)
    ends = []
    for _ in range(5):
        teaching.teacher.record(mine, rng.random(len(mine)), 10**6)
        synchronize()
        comm.barrier()
        start = time.perf_counter()
        teaching.teacher.begin_pass(1)  # gathers the pending scores, selects, checks the checksum
        teaching.teacher.selection_pass = -1  # select again next time, not reuse
        ends.append((time.perf_counter() - start) * 1e3)

    if comm.rank == 0:
        ms_plain, ms_taught = statistics.median(plain), statistics.median(taught)
        pass_end = statistics.median(ends)
        steps_per_pass = pass_samples // global_batch
        tokens = args.micro * args.seq_len * world
        result = {
            "gpus": world, "zero": args.zero_stage,
            "device": torch.cuda.get_device_name(0) if cuda else "CPU (smoke run, not a timing)",
            "plain_ms": ms_plain, "teacher_ms": ms_taught, "pass_end_ms": pass_end,
            "steps_per_pass": steps_per_pass, "pass_samples": pass_samples,
            "plain_tokens_per_s": tokens / ms_plain * 1e3,
            # The teacher arm's throughput with its pass-end selection spread over the pass.
            "teacher_tokens_per_s": tokens / (ms_taught + pass_end / steps_per_pass) * 1e3,
            "plain_blocks_ms": plain, "teacher_blocks_ms": taught,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        }
        Path(args.result).write_text(json.dumps(result, indent=1))
    comm.barrier()


def paired_cost(row: dict, base: dict, resamples: int = 2000) -> tuple[dict, dict]:
    """The teacher's relative step cost at this world size, and its efficiency ratio to ``base``.

    Each round timed a plain and a teacher block back to back, so their ratio cancels the slow
    drift of a shared host that made the blocks of one arm scatter by about 15%. The medians get
    percentile-bootstrap intervals (resampling rounds, a fixed generator: reruns print the same).
    """
    rng = np.random.default_rng(0)

    def ratios(r):
        extra = r["pass_end_ms"] / r["steps_per_pass"]
        return ((np.asarray(r["teacher_blocks_ms"]) + extra) / np.asarray(r["plain_blocks_ms"]))

    mine, ref = ratios(row), ratios(base)
    boot_mine = np.median(rng.choice(mine, (resamples, len(mine))), axis=1)
    boot_ref = np.median(rng.choice(ref, (resamples, len(ref))), axis=1)
    interval = lambda x: {"low": float(np.percentile(x, 2.5)),  # noqa: E731
                          "high": float(np.percentile(x, 97.5))}
    cost = {"median": float(np.median(mine)), **interval(boot_mine)}
    # The base row against itself is 1 by definition, not a ratio of two independent resamples.
    eff = boot_ref / boot_mine if row is not base else np.ones(resamples)
    ratio = {"median": float(np.median(ref) / np.median(mine)), **interval(eff)}
    return cost, ratio


def orchestrate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for zero in [int(z) for z in args.zero.split(",")]:
        for n in [int(g) for g in args.gpus.split(",")]:
            result = out / f"zero{zero}_gpus{n}.json"
            if args.reuse and result.exists():
                rows.append(json.loads(result.read_text()))
                continue
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                   "--master_port", str(29500 + 10 * n + zero), str(Path(__file__).resolve()),
                   "--worker", "--zero-stage", str(zero), "--result", str(result),
                   *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k in ("model", "seq_len", "vocab_size", "micro", "rounds", "block",
                              "pass_samples", "device")]]
            print(f"== ZeRO-{zero}, {n} GPU(s): {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
            rows.append(json.loads(result.read_text()))
    lines = [f"{rows[0]['device']}, {args.model}, micro batch {args.micro} x {args.seq_len} "
             f"tokens per GPU, bf16; {args.rounds} rounds of interleaved blocks of {args.block} "
             "steps. Cost = median over rounds of (teacher block ms / the same round's plain "
             "block ms), plus the pass end spread over its pass; efficiency ratio = the 1-GPU "
             "cost over this cost (1.0: the plugin scales exactly as plain DeepSpeed). 95% "
             "bootstrap intervals in brackets.", "",
             "| ZeRO | GPUs | plain ms/step | teacher ms/step | pass end ms (per pass) | "
             "plain tokens/s | teacher cost | efficiency ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["zero"] == r["zero"] and b["gpus"] == min(
            x["gpus"] for x in rows if x["zero"] == r["zero"]))
        cost, ratio = paired_cost(r, base)
        r["teacher_cost"], r["efficiency_ratio"] = cost, ratio
        lines.append(f"| {r['zero']} | {r['gpus']} | {r['plain_ms']:.2f} | {r['teacher_ms']:.2f} | "
                     f"{r['pass_end_ms']:.1f} ({r['steps_per_pass']} steps) | "
                     f"{r['plain_tokens_per_s']:,.0f} | {cost['median']:.4f} "
                     f"[{cost['low']:.4f}, {cost['high']:.4f}] | {ratio['median']:.4f} "
                     f"[{ratio['low']:.4f}, {ratio['high']:.4f}] |")
    (out / "scaling.json").write_text(json.dumps(rows, indent=1))
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("--gpus", default="1,2,4", help="world sizes, comma list")
    p.add_argument("--zero", default="2,3", help="ZeRO stages, comma list")
    p.add_argument("--model", default="100m")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--block", type=int, default=5, help="steps per timed block")
    p.add_argument("--pass-samples", type=int, default=1_000_000,
                   help="examples per pass for the pass-end gather and selection")
    p.add_argument("--reuse", action="store_true",
                   help="keep the (stage, GPUs) results already in --out and run only the missing "
                        "ones (a run cut short by a time limit goes on; all present: report only)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke run of the tool itself over gloo (its timings mean nothing)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero-stage", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.reuse:
        raise SystemExit("bench_scaling needs GPUs (--device cpu only checks the tool runs)")
    if args.worker:
        worker(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
