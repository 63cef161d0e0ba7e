"""RHO-LOSS reference scores: a small model trained on a holdout scores every training sample.

RHO-LOSS ranks an example by its *reducible* loss, the training model's loss minus the loss of a
reference model trained on held-out data from the same distribution: an example the reference
cannot learn either (noise, an encoded blob) then no longer looks "hard". This tool makes the
reference side for one prepared corpus:

1. holdout = the corpus's validation sequences after the first ``--holdout-skip`` ones. The
   time-to-quality benchmark skips the sequences its evaluation reads (``--eval-samples``), so
   the reference never saw what the benchmark measures on;
2. a model of a named shape (``attent_scale.model.build_model``) is trained on the holdout for
   ``--epochs`` passes: AdamW, linear warm-up over 5% of the steps, cosine to 10% of ``--lr``,
   gradient clipping at 1, as the benchmark's jobs are configured;
3. every training sample is scored with it (no-grad forward, mean token cross-entropy of the
   next-token prediction, the job's ``loss`` signal) in sample-id order: the global index the
   training job's dataset gives a sample (shards in index.json order, samples in shard order).

    python tools/reference_scores.py --data DIR --out DIR/reference --model small --epochs 2 \\
        --holdout-skip 256 --bf16

Writes into --out ``reference.npy`` (float32, one value per training sample) and, last, as the
mark of a complete run, ``reference.json``: the cost of making it (optimizer steps, tokens
trained and scored, seconds, the model's parameters) for the benchmark to count against the
arms that use it, and the reference's losses. The training job takes the file as
``--reference-scores DIR/reference.npy``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: python tools/reference_scores.py

FORMAT = "attent-reference-v1"
WARMUP_SHARE = 0.05
MIN_LR_RATIO = 0.1


def read_meta(data: Path) -> dict:
    """The corpus's meta.json (num_train, num_val, seq_len, vocab_size, token column)."""
    try:
        meta = json.loads((data / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"reference_scores: --data {data}: no readable meta.json ({exc}); give "
                         "a corpus prepared with attent-prepare") from None
    missing = [k for k in ("num_train", "num_val", "seq_len", "vocab_size") if k not in meta]
    if missing:
        raise SystemExit(f"reference_scores: --data {data}: meta.json lacks {', '.join(missing)}; "
                         "prepare the corpus again with attent-prepare")
    return meta


def iter_shards(split_dir: Path, column: str) -> Iterator[np.ndarray]:
    """Each MDS shard of a split as one [samples, seq_len] array, in index.json order.

    Read with streaming's shard readers, not a StreamingDataset: no shared memory is registered,
    so this runs safely beside training jobs on the same node.
    """
    from streaming.base.format import reader_from_json
    index = json.loads((split_dir / "index.json").read_text())
    for shard in index["shards"]:
        if column not in shard["column_names"]:
            raise SystemExit(f"reference_scores: {split_dir}: shards have columns "
                             f"{shard['column_names']}, no {column!r}; pass --token-column")
        reader = reader_from_json(str(split_dir), None, shard)
        if shard.get("compression") or shard.get("format") != "mds":
            yield np.stack([np.asarray(reader.get_item(i)[column])
                            for i in range(reader.samples)])
            continue
        # get_item opens the file once per sample (ms each): read the shard once and cut it at
        # the offsets its header holds (uint32 count, then count + 1 offsets), as get_item does.
        raw = (split_dir / shard["raw_data"]["basename"]).read_bytes()
        offsets = np.frombuffer(raw, np.uint32, count=reader.samples + 1, offset=4)
        yield np.stack([np.asarray(reader.decode_sample(raw[b:e])[column])
                        for b, e in zip(offsets[:-1], offsets[1:])])


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over WARMUP_SHARE of ``total`` steps, then cosine to MIN_LR_RATIO."""
    warm = max(1, round(WARMUP_SHARE * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sample_losses(model, tokens, autocast) -> "torch.Tensor":  # noqa: F821
    """Per-sample mean next-token cross-entropy [B] (float32)."""
    import torch.nn.functional as F
    with autocast():
        logits = model(input_ids=tokens).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                         reduction="none")
    return ce.view(tokens.shape[0], -1).mean(dim=1)


def build_parser() -> argparse.ArgumentParser:
    from attent_scale.model import MODEL_SHAPES
    p = argparse.ArgumentParser(prog="reference_scores.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="prepared corpus (DIR/train, DIR/val)")
    p.add_argument("--out", required=True, help="where reference.npy and reference.json go")
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="small",
                   help="shape of the reference model")
    p.add_argument("--epochs", type=int, default=2, help="passes over the holdout")
    p.add_argument("--micro", type=int, default=16, help="training batch (sequences)")
    p.add_argument("--score-batch", type=int, default=64, help="sequences per scoring forward")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--seed", type=int, default=0, help="model init and holdout order")
    p.add_argument("--holdout-skip", type=int, default=0,
                   help="leave out the first N validation sequences (those an evaluation reads)")
    p.add_argument("--token-column", default=None,
                   help="MDS column of the token ids (default: meta.json's, else 'tokens')")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    return p


def main(argv=None) -> int:
    import contextlib

    import torch

    from attent_scale.model import build_model
    args = build_parser().parse_args(argv)
    for flag in ("epochs", "micro", "score_batch"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"reference_scores: --{flag.replace('_', '-')}: got "
                             f"{getattr(args, flag)}; allowed: an integer >= 1")
    if args.holdout_skip < 0:
        raise SystemExit(f"reference_scores: --holdout-skip: got {args.holdout_skip}; allowed: "
                         "an integer >= 0")
    data, out = Path(args.data).expanduser().resolve(), Path(args.out).expanduser().resolve()
    meta = read_meta(data)
    column = args.token_column or meta.get("token_column") or "tokens"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    val = np.concatenate(list(iter_shards(data / "val", column)))
    holdout = val[args.holdout_skip:]
    if len(holdout) < 1:
        raise SystemExit(f"reference_scores: the validation split of {data} has {len(val)} "
                         f"sequences and --holdout-skip {args.holdout_skip} leaves none for the "
                         "reference; lower --holdout-skip (the benchmark: --eval-samples) or "
                         "prepare the corpus with a larger --val-fraction")
    seq_len = holdout.shape[1]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def autocast():
        if args.bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    model = build_model(args.model, meta["vocab_size"], seq_len, args.seed).to(device)
    total = sum(p.numel() for p in model.parameters())
    compute = total - model.get_input_embeddings().weight.numel()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    per_epoch = math.ceil(len(holdout) / args.micro)
    steps = args.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    gen = torch.Generator().manual_seed(args.seed)
    tokens_trained = 0
    losses: list[float] = []
    sync()
    t0 = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(holdout), generator=gen).numpy()
        for b in range(per_epoch):
            ids = order[b * args.micro:(b + 1) * args.micro]
            batch = torch.from_numpy(holdout[ids].astype(np.int64)).to(device)
            loss = sample_losses(model, batch, autocast).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tokens_trained += batch.numel()
            losses.append(loss.item())  # a host sync per step: a small model, a short run
    sync()
    train_s = time.perf_counter() - t0

    model.eval()
    scores: list[np.ndarray] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for shard in iter_shards(data / "train", column):
            for b in range(0, len(shard), args.score_batch):
                batch = torch.from_numpy(shard[b:b + args.score_batch].astype(np.int64)).to(device)
                scores.append(sample_losses(model, batch, autocast).float().cpu().numpy())
        ref = np.concatenate(scores).astype(np.float32)
        skipped = val[:args.holdout_skip]
        eval_loss: Optional[float] = None
        if len(skipped):
            parts = [sample_losses(model, torch.from_numpy(
                skipped[b:b + args.score_batch].astype(np.int64)).to(device), autocast)
                for b in range(0, len(skipped), args.score_batch)]
            eval_loss = float(torch.cat(parts).mean())
    sync()
    score_s = time.perf_counter() - t0
    if len(ref) != meta["num_train"]:
        raise SystemExit(f"reference_scores: scored {len(ref)} training samples but meta.json "
                         f"says {meta['num_train']}: the shards do not belong to this corpus; "
                         "prepare it again")
    if not np.isfinite(ref).all():
        raise SystemExit(f"reference_scores: {int((~np.isfinite(ref)).sum())} reference scores "
                         "are not finite (the reference diverged); lower --lr")

    out.mkdir(parents=True, exist_ok=True)
    (out / "reference.json").unlink(missing_ok=True)  # written last: it marks a complete run
    tmp = out / f".reference.{os.getpid()}.npy"
    np.save(tmp, ref)
    os.replace(tmp, out / "reference.npy")
    report = {
        "format": FORMAT,
        "corpus_fingerprint": meta.get("fingerprint"),
        "num_train": int(len(ref)),
        "model": args.model,
        "params": {"total": int(total), "compute": int(compute)},
        "seed": args.seed, "lr": args.lr, "epochs": args.epochs, "micro": args.micro,
        "bf16": args.bf16, "device": str(device),
        "holdout": {"split": "val", "skip": args.holdout_skip, "sequences": int(len(holdout)),
                    "seq_len": int(seq_len)},
        "train": {"optimizer_steps": steps, "tokens": int(tokens_trained), "seconds": train_s,
                  "first_loss": losses[0], "final_loss": float(np.mean(losses[-per_epoch:]))},
        "score": {"samples": int(len(ref)), "tokens": int(len(ref) * seq_len),
                  "seconds": score_s},
        "eval_loss": eval_loss,  # on the skipped validation sequences (what evaluation reads)
        "scores": {"mean": float(ref.mean()), "min": float(ref.min()), "max": float(ref.max())},
    }
    tmp = out / f".reference.{os.getpid()}.json"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out / "reference.json")
    print(f"reference_scores: {args.model} trained {steps} steps on {len(holdout)} holdout "
          f"sequences ({train_s:.1f} s), scored {len(ref)} training samples ({score_s:.1f} s); "
          f"mean score {ref.mean():.4f}; wrote {out / 'reference.npy'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
