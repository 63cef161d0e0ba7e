"""Consecutive-step throughput of DeepSpeed configs against the plain PyTorch loop, one process.

bench_throughput.py times one step at a time from an idle device, which isolates a kernel's cost
but hides what a running job loses when the host cannot queue work ahead of the GPU: device
synchronisations and per-parameter host work inside ``engine.step()``. This tool times blocks of
``--block`` consecutive steps (as the job runs them), variants interleaved round by round, and
profiles one block per DeepSpeed config to count the host syncs and name the costliest host calls.

Variants (every one with the same model, compiled blocks and fused loss kernel; the teacher's
``loss`` scores on unless said):

- ``today``: ZeRO-1 bf16 as configs/zero1.json was before this tool (DeepSpeed's throughput timer
  on, bf16 overflow scan on);
- ``shipped``: configs/zero1.json as shipped (``timers.throughput.enabled: false``,
  ``bf16.check_grad_overflow: false``), at the first micro batch and the larger one, teacher on
  and off, and under ZeRO-2;
- ``plain``: float32 weights, bf16 autocast, torch fused AdamW, gradient clipping.

    python tools/bench_ds_step.py --out runs/ds-step                      # 100m, 1024, micro 32/64
    python tools/bench_ds_step.py --device cpu --model tiny --seq-len 64 --micro 4 --micro-big 8 \\
        --block 2 --rounds 2 --out runs/ds-step-cpu                        # a smoke run

MFU as in bench_throughput.py (6 N + 12 L T d_attn FLOP per token, 989.4 TFLOP/s for H100/H200).
Writes ds_step.json, ds_step.md and (with --profile) profile.txt into --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_throughput as bt  # noqa: E402

SHIPPED = json.loads((ROOT / "configs" / "zero1.json").read_text())
SHIPPED.pop("attent", None)
# configs/zero1.json before the two keys below were added (DeepSpeed's defaults for them).
TODAY = copy.deepcopy(SHIPPED)
TODAY.pop("timers", None)
TODAY["bf16"] = {"enabled": "auto"}


def engine(args, device, base: dict, zero: int, micro: int, cuda: bool) -> bt.Trainer:
    import deepspeed

    from attent_scale import resolve_auto
    model = bt.new_model(args.model, args.vocab_size, args.seq_len, device)
    if cuda:
        bt.compile_blocks(model)
    cfg = resolve_auto(copy.deepcopy(base), 10**6)
    cfg.update(train_micro_batch_size_per_gpu=micro, steps_per_print=10**9)
    cfg["zero_optimization"] = {"stage": zero}
    cfg["bf16"]["enabled"] = cuda
    eng, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                        config=cfg)
    return bt.Trainer(f"ds-z{zero}", model, engine=eng)


def plain(args, device, cuda: bool) -> bt.Trainer:
    model = bt.new_model(args.model, args.vocab_size, args.seq_len, device)
    if cuda:
        bt.compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.003, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=cuda)
    return bt.Trainer("plain", model, optimizer=opt)


def markdown(meta: dict, rows: list[dict], notes: list[str]) -> str:
    lines = [f"# DeepSpeed step, consecutive steps: {meta['device']}", "",
             f"`{meta['command']}`, started {meta['started']}; torch {meta['torch']}, deepspeed "
             f"{meta['deepspeed']}. Model {meta['model']} ({meta['params_m']:.1f}M), sequence "
             f"{meta['seq_len']}, loss kernel {meta['impl']}, compiled blocks: "
             f"{meta['compiled']}. ms/step: median over {meta['rounds']} interleaved rounds of "
             f"{meta['block']} consecutive steps (min-max); MFU = tokens/s x "
             f"{meta['flops_per_token'] / 1e9:.3f} GFLOP/token / 989.4 TFLOP/s.", "",
             "| variant | micro | teacher | ms/step (min-max) | tokens/s | MFU | x plain |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        rel = f"{r['vs_plain']:.3f}" if r.get("vs_plain") else ""
        lines.append(f"| {r['variant']} | {r['micro']} | {r['teacher']} | {r['ms']:.2f} "
                     f"({r['min']:.2f}-{r['max']:.2f}) | {r['tokens_s']:,.0f} | {mfu} | {rel} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--model", default="100m")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro", type=int, default=32)
    p.add_argument("--micro-big", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--block", type=int, default=8, help="consecutive steps timed together")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--impl", default=None,
                   help="fused loss kernel (default: compiled on CUDA, chunked on CPU)")
    p.add_argument("--profile", action="store_true", help="profile one block per DeepSpeed config")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu for a smoke run")
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    impl = args.impl or ("compiled" if cuda else "chunked")
    bt.single_process_env()
    bt.jit_build_env()
    bt.raise_recompile_limit()
    gen = torch.Generator().manual_seed(0)
    m, mb = args.micro, args.micro_big
    batches = {k: torch.randint(0, args.vocab_size, (k, args.seq_len), generator=gen).to(device)
               for k in {m, mb}}
    # name: (trainer factory, micro, teacher signal)
    specs = {
        "today, ZeRO-1": (lambda: engine(args, device, TODAY, 1, m, cuda), m, "loss"),
        "shipped, ZeRO-1": (lambda: engine(args, device, SHIPPED, 1, m, cuda), m, "loss"),
        "shipped, ZeRO-2": (lambda: engine(args, device, SHIPPED, 2, m, cuda), m, "loss"),
        "plain PyTorch": (lambda: plain(args, device, cuda), m, "loss"),
        "shipped, ZeRO-1, micro big": (lambda: engine(args, device, SHIPPED, 1, mb, cuda), mb,
                                       "loss"),
        "shipped, ZeRO-1, micro big, teacher off": (None, mb, None),  # shares the one above
        "shipped, ZeRO-2, micro big": (lambda: engine(args, device, SHIPPED, 2, mb, cuda), mb,
                                       "loss"),
        "plain PyTorch, micro big": (lambda: plain(args, device, cuda), mb, "loss"),
    }
    trainers = {}
    for name, (make, _, _) in specs.items():
        if make is not None:
            bt.log(f"building {name}")
            trainers[name] = make()
    trainers["shipped, ZeRO-1, micro big, teacher off"] = trainers["shipped, ZeRO-1, micro big"]

    def block(name: str, n: int) -> None:
        _, micro, signal = specs[name]
        for _ in range(n):
            trainers[name].step(batches[micro], "fused", impl=impl, signal=signal)

    for name in specs:  # warm-up, compilation included
        block(name, 3)
    ms: dict[str, list[float]] = {name: [] for name in specs}
    for r in range(args.rounds):
        order = list(specs)[r % len(specs):] + list(specs)[:r % len(specs)]
        for name in order:
            if cuda:
                torch.cuda.synchronize()
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                start.record()
                block(name, args.block)
                stop.record()
                stop.synchronize()
                ms[name].append(start.elapsed_time(stop) / args.block)
            else:
                t = time.perf_counter()
                block(name, args.block)
                ms[name].append((time.perf_counter() - t) * 1e3 / args.block)
    any_model = trainers["plain PyTorch"].model
    fpt = bt.flops_per_token(any_model, args.seq_len)
    rows = []
    for name, v in ms.items():
        micro, signal = specs[name][1], specs[name][2]
        med = statistics.median(v)
        tok_s = micro * args.seq_len / med * 1e3
        rows.append({"variant": name, "micro": micro, "teacher": "loss" if signal else "off",
                     "ms": med, "min": min(v), "max": max(v), "tokens_s": tok_s,
                     "mfu": tok_s * fpt / 989.4e12 if cuda else None})
    plain_ms = {r["micro"]: r["ms"] for r in rows if r["variant"].startswith("plain")}
    for r in rows:
        r["vs_plain"] = r["ms"] / plain_ms[r["micro"]]
    by = {r["variant"]: r for r in rows}
    notes = [
        "today -> shipped (ZeRO-1, micro {}): {:+.1%} tokens/s".format(
            m, by["today, ZeRO-1"]["ms"] / by["shipped, ZeRO-1"]["ms"] - 1),
        "teacher overhead, shipped ZeRO-1 micro {}: {:+.2%} of the step".format(
            mb, by["shipped, ZeRO-1, micro big"]["ms"]
            / by["shipped, ZeRO-1, micro big, teacher off"]["ms"] - 1),
    ]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        text = []
        for name in ("today, ZeRO-1", "shipped, ZeRO-1", "plain PyTorch"):
            with profile(activities=acts) as prof:
                block(name, 3)
                if cuda:
                    torch.cuda.synchronize()
            avg = prof.key_averages()
            syncs = {e.key: e.count for e in avg if "Synchronize" in e.key
                     or e.key == "aten::_local_scalar_dense"}
            notes.append(f"{name}: host syncs in 3 steps {syncs}")
            text.append(f"## {name}\n" + avg.table(sort_by="self_cpu_time_total", row_limit=25,
                                                   max_name_column_width=60))
        (out / "profile.txt").write_text("\n\n".join(text) + "\n")
    import deepspeed
    meta = {"command": " ".join(["bench_ds_step.py"] + sys.argv[1:]),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "model": args.model,
            "params_m": sum(q.numel() for q in any_model.parameters()) / 1e6,
            "seq_len": args.seq_len, "impl": impl, "compiled": cuda, "rounds": args.rounds,
            "block": args.block, "flops_per_token": fpt}
    (out / "ds_step.json").write_text(json.dumps({"meta": meta, "rows": rows, "notes": notes},
                                                 indent=1))
    (out / "ds_step.md").write_text(markdown(meta, rows, notes))
    print(markdown(meta, rows, notes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
