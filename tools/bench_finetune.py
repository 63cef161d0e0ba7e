"""The paper-shaped fine-tuning comparison in one command: full data against attent-simple on GSM8K.

    python tools/bench_finetune.py --gsm8k data/gsm8k --out runs/bench-ft --seeds 0 1 --bf16

Steps, each skipped when its output already exists under --out (so a rerun resumes):
1. base model: --base-model DIR, or pretrain one with attent-pretrain (--pretrain-model, default
   100m, on the standard-library corpus) and export it with attent-export;
2. data: attent-instruct on GSM8K train (all problems unless --train-limit) and on the test
   problems used for the answer-token validation loss;
3. for each seed, two LoRA fine-tuning arms with the same seed, data order and hyper-parameters:
   ``full`` (--no-teacher) and ``attent`` (the config's "attent" section, attent-simple);
4. evaluation of each arm: answer-token validation loss on the first --test-limit test problems
   and strict exact match of '#### N' by greedy generation on the same problems.
Writes results.json and results.md (time, steps, loss, exact match per arm and seed, and means).

--tiny runs the same pipeline at toy size on CPU (a smoke test of the command, not a result).
"""
from __future__ import annotations

import argparse
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
        "pretrain_epochs": 1, "train_limit": 64, "test_limit": 8, "max_len": 512,
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
    p.add_argument("--deepspeed", default="configs/finetune_zero2.json")
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


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    nproc = a.nproc or max(1, torch.cuda.device_count())
    base = base_model(a, out, nproc)

    from attent_scale import gsm8k, instruct
    data = out / "data"
    common = dict(prompt_field="question", answer_field="answer", max_len=a.max_len)
    if not (data / "train" / instruct.META).exists():
        instruct.build(Path(a.gsm8k) / "train.jsonl", base, data / "train", limit=a.train_limit,
                       **common)
    if not (data / "test" / instruct.META).exists():
        instruct.build(Path(a.gsm8k) / "test.jsonl", base, data / "test", limit=a.test_limit,
                       **common)
    problems = gsm8k.read_problems(Path(a.gsm8k) / "test.jsonl", a.test_limit)

    rows = []
    for seed in a.seeds:
        for arm in ("full", "attent"):
            run = out / "arms" / f"{arm}-s{seed}"
            if not (run / "result.json").exists():
                print(f"fine-tuning {arm} seed {seed} ...", flush=True)
                run.mkdir(parents=True, exist_ok=True)
                wall = launch("attent_scale.finetune", [
                    "--model", str(base), "--train", str(data / "train"),
                    "--deepspeed", str(ROOT / a.deepspeed), "--out", str(run),
                    "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
                    "--grad-accum", str(a.grad_accum), "--lr", str(a.lr), "--seed", str(seed),
                    "--lora-rank", str(a.lora_rank), "--lora-alpha", str(a.lora_alpha),
                    "--no-resume", *(["--bf16"] if a.bf16 else []),
                    *(["--no-teacher"] if arm == "full" else [])], nproc, run / "train.log")
                (run / "wall.json").write_text(json.dumps({"wall_s": wall}))
            res = json.loads((run / "result.json").read_text())
            wall = json.loads((run / "wall.json").read_text())["wall_s"]
            ev_path = run / "eval.json"
            if not ev_path.exists():
                model, tok = gsm8k.load_model(base, run / "final",
                                              dtype=torch.bfloat16 if a.bf16 else None)
                t0 = time.perf_counter()
                loss = gsm8k.answer_loss(model, instruct.load(data / "test"),
                                         batch_size=a.eval_batch_size, pad_id=tok.pad_token_id)
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

    summary = {}
    for arm in ("full", "attent"):
        rs = [r for r in rows if r["arm"] == arm]
        summary[arm] = {k: sum(r[k] for r in rs) / len(rs)
                        for k in ("steps", "train_runtime_s", "wall_s", "answer_loss",
                                  "exact_match", "flexible_match")}
    saving = 1 - summary["attent"]["train_runtime_s"] / summary["full"]["train_runtime_s"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    report = {"device": device, "nproc": nproc, "base_model": str(base), "args": vars(a),
              "rows": rows, "mean": summary, "train_time_saving": saving}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    lines = [f"# GSM8K LoRA fine-tuning: full data vs attent-simple ({device} x {nproc})", "",
             f"Base model `{base}`; {a.epochs} passes, LoRA rank {a.lora_rank}, alpha "
             f"{a.lora_alpha}, lr {a.lr}, micro batch {a.batch_size} x {nproc} ranks x "
             f"{a.grad_accum}; evaluation on the first {len(problems)} test problems.", "",
             "| arm | seed | steps | train time (s) | wall (s) | answer-token val loss | "
             "exact match | flexible match |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['train_runtime_s']:.1f} | "
                     f"{r['wall_s']:.1f} | {r['answer_loss']:.4f} | {r['exact_match']:.3f} | "
                     f"{r['flexible_match']:.3f} |")
    for arm, s in summary.items():
        lines.append(f"| **{arm} (mean)** | | {s['steps']:.0f} | {s['train_runtime_s']:.1f} | "
                     f"{s['wall_s']:.1f} | {s['answer_loss']:.4f} | {s['exact_match']:.3f} | "
                     f"{s['flexible_match']:.3f} |")
    lines += ["", f"Training-time saving of attent-simple: {100 * saving:.1f}%."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
