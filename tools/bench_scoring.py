"""The teacher's share of step time, measured inside one process with CUDA events.

Whole-run throughput on a shared host drifts by more than the teacher costs, so this tool times
the pieces side by side, interleaved round by round on the same engine and batch:

- a plain DeepSpeed training step (forward, loss, backward, optimizer step);
- each free-score signal computed from that step's logits (loss, fgrad_norm, attention_fgrad,
  the last including the attention probe's extra work in the forward);
- a no-grad forward (what a pool pass costs per batch without scoring) and the same with scores.

    python tools/bench_scoring.py --model 100m --seq-len 1024 --vocab-size 8192 --micro 16 \
        --out runs/scoring

Writes scoring.json and scoring.md into --out. Needs a GPU (CPU timings mean nothing here).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, reps: int = 1) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/scoring")
    p.add_argument("--model", default="100m")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_scoring needs a GPU")

    from attent_scale.attention import AttentionImportance
    from attent_scale.deepspeed_plugin import build_engine
    from attent_scale.loop import single_process_env
    from attent_scale.model import build_model
    from attent_scale.signals import causal_token_losses
    from attent_scale.signals import example_scores
    import deepspeed

    single_process_env()
    deepspeed.init_distributed(dist_backend="nccl")
    torch.cuda.set_device(0)
    model = build_model(args.model, args.vocab_size, args.seq_len, seed=0)
    probe = AttentionImportance(model, [-1])
    engine = build_engine(model, {
        "train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}})
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.micro, args.seq_len), generator=gen).cuda()

    state = {}

    def train_step(record: bool = False):
        with probe.recording(record):
            logits = engine(input_ids=tokens).logits
        ce, labels = causal_token_losses(logits, tokens)
        engine.backward(ce.mean())
        engine.step()
        state.update(logits=logits.detach(), ce=ce.detach(), labels=labels)

    def score(signal: str):
        imp = probe.pop()[:, :-1] if signal == "attention_fgrad" else None
        return example_scores(signal, state["ce"], state["labels"], state["logits"][:, :-1], imp)

    @torch.no_grad()
    def nograd_forward(signal=None):
        logits = engine(input_ids=tokens).logits
        ce, labels = causal_token_losses(logits, tokens)
        if signal:
            example_scores(signal, ce, labels, logits[:, :-1])

    for _ in range(5):
        train_step()
    samples = {k: [] for k in ("step", "step+probe", "loss", "fgrad_norm", "attention_fgrad",
                               "nograd_forward", "nograd_forward+loss", "nograd_forward+fgrad")}
    for _ in range(args.rounds):
        samples["step"].append(timed(train_step))
        samples["loss"].append(timed(lambda: score("loss")))
        samples["fgrad_norm"].append(timed(lambda: score("fgrad_norm")))
        samples["step+probe"].append(timed(lambda: train_step(record=True)))
        samples["attention_fgrad"].append(timed(lambda: score("attention_fgrad")))
        engine.eval()
        samples["nograd_forward"].append(timed(nograd_forward))
        samples["nograd_forward+loss"].append(timed(lambda: nograd_forward("loss")))
        samples["nograd_forward+fgrad"].append(timed(lambda: nograd_forward("fgrad_norm")))
        engine.train()
    ms = {k: statistics.median(v) for k, v in samples.items()}
    step = ms["step"]
    probe_cost = ms["step+probe"] - step
    shares = {
        "free loss": ms["loss"] / step,
        "free fgrad_norm": ms["fgrad_norm"] / step,
        "free attention_fgrad (probe + score)": (probe_cost + ms["attention_fgrad"]) / step,
        "pool: no-grad forward + loss vs plain no-grad forward":
            ms["nograd_forward+loss"] / ms["nograd_forward"],
        "pool: no-grad forward + fgrad vs plain no-grad forward":
            ms["nograd_forward+fgrad"] / ms["nograd_forward"],
        "pool forward (loss) vs training step": ms["nograd_forward+loss"] / step,
    }
    tokens_per_step = args.micro * args.seq_len
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "args": vars(args), "median_ms": ms,
              "shares": shares, "plain_tokens_per_s": tokens_per_step / step * 1e3,
              "n_params": sum(p.numel() for p in model.parameters())}
    (out / "scoring.json").write_text(json.dumps(result, indent=1))
    lines = [f"{result['device']}, {args.model} ({result['n_params'] / 1e6:.1f}M), micro batch "
             f"{args.micro} x {args.seq_len} tokens, bf16, ZeRO-1; medians of {args.rounds} "
             "interleaved rounds", "", "| piece | ms | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / step:.3f} of a step |" for k, v in ms.items()]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in shares.items()]
    (out / "scoring.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
