"""Cost of the grad_norm signal as a share of a plain DeepSpeed step, timed inside one process.

Like tools/bench_scoring.py, the pieces are timed side by side, interleaved round by round on the
same engine and batch (whole-run throughput on a shared host drifts by more than this costs):

- a plain training step (forward, loss, backward, optimizer step), no hooks recording;
- the same step with the grad_norm probe recording (free source: per-example norms computed in
  the hooks of the training backward), for each layer selection in --layers;
- a no-grad forward with loss scores (what a pool pass costs per batch with the loss signal);
- a pool pass batch with grad_norm (forward with a graph, backward to the layers' outputs only).

    python tools/bench_gradnorm.py --model 100m --seq-len 1024 --vocab-size 8192 --micro 16 \
        --out runs/gradnorm
    python tools/bench_gradnorm.py --model tiny --seq-len 64 --micro 4 --device cpu --rounds 2 \
        --out runs/gradnorm-smoke          # CPU smoke check; its timings mean nothing

Writes gradnorm.json and gradnorm.md into --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (last_blocks, include_head); "all" is every block.
SELECTIONS = {"head": (0, True), "last2+head": (2, True), "all": (-1, True)}


def make_timer(device: torch.device):
    def timed(fn) -> float:
        if device.type != "cuda":
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop)
    return timed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gradnorm")
    p.add_argument("--model", default="100m")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--layers", default="head,last2+head,all",
                   help=f"comma-separated layer selections from {sorted(SELECTIONS)}")
    p.add_argument("--chunk-elements", type=int, default=1 << 24)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gradnorm: no GPU; pass --device cpu for a smoke check")
    selections = args.layers.split(",")
    bad = [s for s in selections if s not in SELECTIONS]
    if bad:
        raise SystemExit(f"--layers: unknown {bad}; allowed: {sorted(SELECTIONS)}")

    import deepspeed

    from attent_scale.deepspeed_plugin import build_engine
    from attent_scale.grad_norm import GradNormProbe
    from attent_scale.loop import single_process_env
    from attent_scale.model import MODEL_SHAPES, build_model
    from attent_scale.signals import causal_token_losses
    from attent_scale.signals import example_scores

    single_process_env()
    cuda = args.device == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
    model = build_model(args.model, args.vocab_size, args.seq_len, seed=0)
    n_blocks = MODEL_SHAPES[args.model][1]
    probes = {}
    for name in selections:
        blocks, head = SELECTIONS[name]
        probes[name] = GradNormProbe(model, n_blocks if blocks < 0 else blocks, head,
                                     chunk_elements=args.chunk_elements)
    ds = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
          "steps_per_print": 10**9, "zero_optimization": {"stage": 1},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    if cuda:
        ds["bf16"] = {"enabled": True}
    engine = build_engine(model, ds)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.micro, args.seq_len),
                           generator=gen).to(device)
    timed = make_timer(device)
    last: dict[str, torch.Tensor] = {}

    def train_step(probe=None):
        with probe.recording() if probe else torch.enable_grad():
            logits = engine(input_ids=tokens).logits
        ce, labels = causal_token_losses(logits, tokens)
        if probe:
            last["free"] = probe.attach(ce, torch.ones_like(labels, dtype=torch.bool))
        engine.backward(ce.mean())
        engine.step()

    @torch.no_grad()
    def pool_loss():
        logits = engine(input_ids=tokens).logits
        ce, labels = causal_token_losses(logits, tokens)
        example_scores("loss", ce, labels, logits[:, :-1])

    @torch.no_grad()
    def pool_grad_norm(probe):
        with torch.enable_grad():
            with probe.recording(keep_outputs=True):
                # Past the engine, as attent-pretrain's pool pass: DeepSpeed's forward would take
                # this backward for a training one.
                logits = engine.module(input_ids=tokens).logits
            ce, labels = causal_token_losses(logits, tokens)
        last["pool"] = probe.score_now(ce, torch.ones_like(labels, dtype=torch.bool))

    def peak(fn) -> float:
        if not cuda:
            return float("nan")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30

    for _ in range(3):
        train_step()
        for probe in probes.values():
            train_step(probe)
    samples: dict[str, list[float]] = {"step": [], "pool: no-grad forward + loss": []}
    for name in selections:
        samples[f"step + grad_norm[{name}]"] = []
        samples[f"pool: grad_norm[{name}]"] = []
    for _ in range(args.rounds):
        samples["step"].append(timed(train_step))
        for name, probe in probes.items():
            samples[f"step + grad_norm[{name}]"].append(timed(lambda: train_step(probe)))
        engine.eval()
        samples["pool: no-grad forward + loss"].append(timed(pool_loss))
        for name, probe in probes.items():
            samples[f"pool: grad_norm[{name}]"].append(timed(lambda: pool_grad_norm(probe)))
        engine.train()
    ms = {k: statistics.median(v) for k, v in samples.items()}
    step = ms["step"]
    memory = {"step": peak(train_step)}
    for name, probe in probes.items():
        memory[f"step + grad_norm[{name}]"] = peak(lambda: train_step(probe))
        engine.eval()
        memory[f"pool: grad_norm[{name}]"] = peak(lambda: pool_grad_norm(probe))
        engine.train()
    shares = {}
    for name in selections:
        shares[f"free grad_norm[{name}]: extra share of a step"] = \
            ms[f"step + grad_norm[{name}]"] / step - 1.0
        shares[f"pool grad_norm[{name}] vs pool loss forward"] = \
            ms[f"pool: grad_norm[{name}]"] / ms["pool: no-grad forward + loss"]
        shares[f"pool grad_norm[{name}] vs training step"] = ms[f"pool: grad_norm[{name}]"] / step
    methods = {name: sorted(set(probe.chosen.values())) for name, probe in probes.items()}
    finite = bool(torch.isfinite(last["free"]).all() and torch.isfinite(last["pool"]).all())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name(0) if cuda else "CPU (smoke check; timings mean nothing)"
    result = {"device": dev_name, "torch": torch.__version__, "args": vars(args),
              "median_ms": ms, "shares": shares, "peak_gib": memory,
              "layers": {n: len(p.layers) for n, p in probes.items()}, "methods": methods,
              "scores_finite": finite, "n_params": sum(q.numel() for q in model.parameters())}
    (out / "gradnorm.json").write_text(json.dumps(result, indent=1))
    lines = [f"{dev_name}, {args.model} ({result['n_params'] / 1e6:.1f}M), micro batch "
             f"{args.micro} x {args.seq_len} tokens, {'bf16' if cuda else 'fp32'}, ZeRO-1; medians "
             f"of {args.rounds} interleaved rounds; layers per selection {result['layers']}, "
             f"methods used {methods}", "",
             "| piece | ms | share of a plain step | peak GiB |", "|---|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / step:.3f} | {memory.get(k, float('nan')):.2f} |"
              for k, v in ms.items()]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in shares.items()]
    (out / "gradnorm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
