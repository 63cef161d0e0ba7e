"""The paper-shaped fine-tuning comparison in one command: GSM8K LoRA, full data against teachers.

    python tools/bench_finetune.py --gsm8k data/gsm8k --out runs/bench-ft --seeds 0 1 --bf16

Steps, each skipped when its output already exists under --out (so a rerun resumes):
1. base model: --base-model DIR, or pretrain one with attent-pretrain (--pretrain-model, default
   100m, on the standard-library corpus) and export it with attent-export;
2. data: attent-instruct on GSM8K train (all problems unless --train-limit), as a ``datasets``
   dataset, or as MDS shards where that package is missing; the test problems are tokenized in
   memory for the answer-token validation loss;
3. for each seed, the --arms with the same seed, data order and hyper-parameters:
   ``full`` (all data, --epochs passes), ``attent-simple`` (the paper's recipe), ``random``
   (the budget-matched control: the same subset sizes drawn uniformly), ``attent-soft``, and
   ``full-budget`` (all data but only attent-simple's step count, with its own complete
   learning-rate schedule: the frontier point a teacher must beat at equal compute);
4. evaluation of each arm: answer-token validation loss on the first --test-limit test problems
   and strict exact match of '#### N' by greedy generation on the same problems.
Writes results.json and results.md (per arm and seed, then means with ranges, time saving and
loss change paired with the same seed's full-data run).

--tiny runs the same pipeline at toy size on CPU (a smoke test of the command, not a result).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {"pretrain_model": "tiny", "seq_len": 256, "vocab_size": 512, "max_bytes": 300_000,
        "eval_batch_size": 8,
        "pretrain_epochs": 1, "train_limit": 64, "test_limit": 8, "max_len": 256,
        "max_new_tokens": 32, "batch_size": 4, "lora_rank": 8, "lora_alpha": 16, "epochs": 3}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gsm8k", required=True, help="directory with train.jsonl and test.jsonl")
    p.add_argument("--out", default="runs/bench-finetune")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: GPUs, or 1)")
    p.add_argument("--base-model", default=None, help="skip pretraining: a local HF model dir")
    p.add_argument("--pretrain-model", default="100m")
    p.add_argument("--pretrain-config", default="configs/zero1.json")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--corpus", default=".cache/corpus1024", help="pretraining corpus directory")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-bytes", type=int, default=0, help="pretraining source bytes (0: all)")
    p.add_argument("--deepspeed", default="configs/finetune_zero2.json",
                   help="DeepSpeed JSON of every arm; its 'attent' section is set per arm")
    p.add_argument("--arms", default="full,attent-simple,random,full-budget",
                   help="comma list of full, full-budget, attent-simple, attent-soft, random")
    p.add_argument("--data-format", choices=["auto", "hf", "mds"], default="auto",
                   help="training data format (auto: hf where the datasets package is installed)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="micro batch per rank")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument("--lora-alpha", type=float, default=128)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--train-limit", type=int, default=0, help="first N train problems (0: all)")
    p.add_argument("--test-limit", type=int, default=500, help="first N test problems")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=64, help="generation and loss batch")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tiny", action="store_true", help="toy sizes for a CPU smoke run")
    a = p.parse_args(argv)
    if a.tiny:
        for k, v in TINY.items():
            setattr(a, k, v)
        a.corpus = str(Path(a.out) / "corpus")
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, args: list[str], nproc: int, log: Path) -> float:
    """Run ``python -m module`` on ``nproc`` ranks; returns wall seconds; the log keeps stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "-m", module, *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def base_model(a, out: Path, nproc: int) -> Path:
    if a.base_model:
        return Path(a.base_model)
    base = out / "base"
    if (base / "config.json").exists():
        return base
    cfg = json.loads((ROOT / a.pretrain_config).read_text())
    cfg.pop("attent", None)
    if a.bf16:
        cfg["bf16"] = {"enabled": True}
    (out / "pretrain_ds.json").write_text(json.dumps(cfg, indent=1))
    print(f"pretraining the {a.pretrain_model} base model ...", flush=True)
    wall = launch("attent_scale.pretrain", [
        "--deepspeed_config", str(out / "pretrain_ds.json"), "--model", a.pretrain_model,
        "--data", a.corpus, "--seq-len", str(a.seq_len), "--vocab-size", str(a.vocab_size),
        "--max-bytes", str(a.max_bytes), "--epochs", str(a.pretrain_epochs),
        "--out", str(out / "pretrain"), "--save-every", "1000000000", "--eval-every", "0",
        "--no-plot", "--no-resume"], nproc, out / "pretrain.log")
    from attent_scale.export import export
    export(out / "pretrain", a.corpus, a.pretrain_model, base)
    (out / "pretrain_time.json").write_text(json.dumps({"wall_s": wall}))
    return base


TEACHER_ARMS = ("attent-simple", "attent-soft", "random")
ARMS = ("full", "full-budget", *TEACHER_ARMS)


def arm_list(text: str) -> list[str]:
    arms = [x for x in text.split(",") if x]
    bad = [x for x in arms if x not in ARMS]
    if bad or not arms:
        raise SystemExit(f"--arms {text!r}: unknown {bad}; allowed: {', '.join(ARMS)}")
    if "full-budget" in arms and "attent-simple" not in arms:
        raise SystemExit("--arms: full-budget takes its step budget from attent-simple; add it")
    # full-budget needs attent-simple's step count, so it runs after it.
    return sorted(arms, key=lambda x: x == "full-budget")


def arm_config(a, out: Path, arm: str, seed: int) -> Path:
    """The DeepSpeed JSON of one arm: the --deepspeed file with its 'attent' section replaced."""
    cfg = json.loads((ROOT / a.deepspeed).read_text())
    cfg.pop("attent", None)
    if arm in TEACHER_ARMS:
        cfg["attent"] = {"preset": arm, "seed": seed}
    path = out / "configs" / f"{arm}-s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def test_set(a, base: Path, problems: list[dict]) -> list[dict]:
    """The evaluation problems tokenized in memory (no dataset package needed), prompt masked."""
    from attent_scale import instruct
    tok = instruct.load_tokenizer(base)
    rows = [instruct.encode_example(tok, p["question"], p["answer"], max_len=a.max_len)
            for p in problems]
    return [r for r in rows if r is not None]


def spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def main(argv=None) -> int:
    a = parse_args(argv)
    arms = arm_list(a.arms)
    import torch
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    nproc = a.nproc or max(1, torch.cuda.device_count())
    base = base_model(a, out, nproc)

    from attent_scale import gsm8k, instruct
    fmt = a.data_format
    if fmt == "auto":
        fmt = "hf" if importlib.util.find_spec("datasets") else "mds"
    train = out / f"data-{fmt}" / "train"
    if not (train / instruct.META).exists():
        instruct.build(Path(a.gsm8k) / "train.jsonl", base, train, fmt=fmt, limit=a.train_limit,
                       prompt_field="question", answer_field="answer", max_len=a.max_len)
    problems = gsm8k.read_problems(Path(a.gsm8k) / "test.jsonl", a.test_limit)
    test_rows = test_set(a, base, problems)

    rows = []
    for seed in a.seeds:
        for arm in arms:
            run = out / "arms" / f"{arm}-s{seed}"
            if not (run / "result.json").exists():
                extra = ["--no-teacher"] if arm.startswith("full") else []
                if arm == "full-budget":
                    steps = json.loads((out / "arms" / f"attent-simple-s{seed}" / "result.json")
                                       .read_text())["steps"]
                    extra += ["--max-steps", str(steps)]
                print(f"fine-tuning {arm} seed {seed} ...", flush=True)
                run.mkdir(parents=True, exist_ok=True)
                wall = launch("attent_scale.finetune", [
                    "--model", str(base), "--train", str(train),
                    "--deepspeed", str(arm_config(a, out, arm, seed)), "--out", str(run),
                    "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
                    "--grad-accum", str(a.grad_accum), "--lr", str(a.lr), "--seed", str(seed),
                    "--lora-rank", str(a.lora_rank), "--lora-alpha", str(a.lora_alpha),
                    "--no-resume", *(["--bf16"] if a.bf16 else []), *extra], nproc,
                    run / "train.log")
                (run / "wall.json").write_text(json.dumps({"wall_s": wall}))
            res = json.loads((run / "result.json").read_text())
            wall = json.loads((run / "wall.json").read_text())["wall_s"]
            ev_path = run / "eval.json"
            if not ev_path.exists():
                model, tok = gsm8k.load_model(base, run / "final",
                                              dtype=torch.bfloat16 if a.bf16 else None)
                t0 = time.perf_counter()
                loss = gsm8k.answer_loss(model, test_rows, batch_size=a.eval_batch_size,
                                         pad_id=tok.pad_token_id)
                em = gsm8k.exact_match(model, tok, problems, batch_size=a.eval_batch_size,
                                       max_new_tokens=a.max_new_tokens)
                ev_path.write_text(json.dumps({**loss, **em, "eval_s": time.perf_counter() - t0},
                                              indent=1))
                del model
            ev = json.loads(ev_path.read_text())
            rows.append({"arm": arm, "seed": seed, "steps": res["steps"],
                         "train_runtime_s": res.get("train_runtime"), "wall_s": wall,
                         "answer_loss": ev["answer_loss"], "exact_match": ev["exact_match"],
                         "flexible_match": ev["flexible_match"], "n_test": ev["n"]})
            print(json.dumps(rows[-1]), flush=True)
    report = summarize(a, rows, arms, nproc, base, len(problems))
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(report.pop("markdown"))
    print((out / "results.md").read_text())
    return 0


def frontier_saving(row: dict, short: dict, full: dict) -> float:
    """1 - steps / (steps full-data training needs for ``row``'s loss).

    The frontier is the line through the two full-data runs of the same seed, (steps, loss) of
    ``short`` (full-budget) and ``full``, extended past either end: with two points, linear is
    all the data allows. Positive: the arm reached its loss with fewer steps than full data.
    """
    (s0, l0), (s1, l1) = ((r["steps"], r["answer_loss"]) for r in (short, full))
    if s0 == s1 or l0 == l1:
        raise ValueError(f"the full-data frontier needs two distinct points, got steps {s0}/{s1}, "
                         f"loss {l0}/{l1}")
    needed = s0 + (row["answer_loss"] - l0) * (s1 - s0) / (l1 - l0)
    return 1 - row["steps"] / needed if needed > 0 else float("-inf")


def summarize(a, rows: list[dict], arms: list[str], nproc: int, base: Path, n_test: int) -> dict:
    """Per arm: the seeds' mean and range; against full data: time saving and quality deltas."""
    import torch
    keys = ("steps", "train_runtime_s", "wall_s", "answer_loss", "exact_match", "flexible_match")
    summary = {arm: {k: spread([r[k] for r in rows if r["arm"] == arm]) for k in keys}
               for arm in arms}

    def same(arm: str, r: dict) -> dict:  # the run of ``arm`` with ``r``'s seed
        return next(f for f in rows if f["arm"] == arm and f["seed"] == r["seed"])

    for arm, s in summary.items():
        mine = [r for r in rows if r["arm"] == arm]
        if "full" in summary and arm != "full":
            # Paired by seed: each arm's seed against the full-data run of the same seed.
            s["time_saving"] = spread([1 - r["train_runtime_s"] / same("full", r)["train_runtime_s"]
                                       for r in mine])
            s["loss_delta"] = spread([r["answer_loss"] - same("full", r)["answer_loss"]
                                      for r in mine])
        if {"full", "full-budget"} <= set(summary) and not arm.startswith("full"):
            s["step_saving_at_loss"] = spread([frontier_saving(r, same("full-budget", r),
                                                               same("full", r)) for r in mine])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    rng = lambda d, f: f"{f(d['mean'])} [{f(d['min'])}, {f(d['max'])}]"  # noqa: E731
    pct = lambda x: f"{100 * x:+.1f}%"  # noqa: E731
    lines = [f"# GSM8K LoRA fine-tuning, arms side by side ({device} x {nproc})", "",
             f"{a.epochs} passes, LoRA rank {a.lora_rank}, alpha {a.lora_alpha}, lr {a.lr}, "
             f"micro batch {a.batch_size} x {nproc} ranks x {a.grad_accum}; evaluation on the "
             f"first {n_test} test problems. full-budget: full data, attent-simple's step count, "
             "its own complete schedule.", "",
             "| arm | seed | steps | train time (s) | wall (s) | answer-token val loss | "
             "exact match | flexible match |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['train_runtime_s']:.1f} | "
                     f"{r['wall_s']:.1f} | {r['answer_loss']:.4f} | {r['exact_match']:.3f} | "
                     f"{r['flexible_match']:.3f} |")
    lines += ["", "Means over seeds, [min, max]; saving and loss change paired with the same "
              "seed's full-data run:", "",
              "| arm | steps | train time (s) | time saving | answer-token val loss | "
              "loss change | exact match | step saving at equal loss |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, s in summary.items():
        lines.append(
            f"| {arm} | {s['steps']['mean']:.0f} | {s['train_runtime_s']['mean']:.1f} | "
            f"{rng(s['time_saving'], pct) if 'time_saving' in s else '-'} | "
            f"{rng(s['answer_loss'], lambda x: f'{x:.4f}')} | "
            f"{rng(s['loss_delta'], lambda x: f'{x:+.4f}') if 'loss_delta' in s else '-'} | "
            f"{rng(s['exact_match'], lambda x: f'{x:.3f}')} | "
            f"{rng(s['step_saving_at_loss'], pct) if 'step_saving_at_loss' in s else '-'} |")
    if any("step_saving_at_loss" in s for s in summary.values()):
        lines += ["", "Step saving at equal loss: 1 - the arm's steps over the steps full-data "
                  "training needs for the arm's loss, on the line through the same seed's "
                  "full-budget and full runs (the time-to-quality measure of the harness)."]
    return {"device": device, "nproc": nproc, "base_model": str(base), "args": vars(a),
            "rows": rows, "summary": summary, "markdown": "\n".join(lines) + "\n"}


if __name__ == "__main__":
    sys.exit(main())
