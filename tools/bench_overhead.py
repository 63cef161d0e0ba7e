"""Throughput and memory of the plugin against plain DeepSpeed, arm by arm, in one invocation.

Each arm is the real pretraining job (``attent_scale.pretrain``) with the same data, model, seed
and DeepSpeed config; only the ``attent`` section differs. Arms run one after another on the same
machine, so their ratios are comparable; absolute figures hold only for the machine that ran them.

    python tools/bench_overhead.py --out runs/overhead --model 100m --seq-len 1024 \
        --vocab-size 8192 --max-bytes 0 --micro 16 --epochs 2 --bf16

Writes ``overhead.json`` and ``overhead.md`` into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_ttq import ds_config  # noqa: E402  (one DeepSpeed config for all tools)
from attent_scale.report import read_metrics  # noqa: E402

ARMS = {
    "plain": None,
    "free-loss": {"preset": "attent-simple", "signal": "loss"},
    "free-fgrad": {"preset": "attent-simple", "signal": "fgrad_norm"},
    "free-attn": {"preset": "attent-simple", "signal": "attention_fgrad"},
    "pool-loss": {"preset": "attent-simple", "source": "pool"},
}


def summary_of(metrics: Path) -> dict:
    """The run's summary record plus its steady-state step throughput.

    Steady state: the median of tokens/s over the 10-step windows between training records, so
    start-up, evaluations and selections (each inside one window at most) do not weigh in.
    """
    records = read_metrics(metrics)
    summary = next(r for r in records if r["type"] == "summary")
    train = [r for r in records if r["type"] == "train"]
    rates = sorted((b["tokens"] - a["tokens"]) / (b["time"] - a["time"])
                   for a, b in zip(train[1:], train[2:]) if b["time"] > a["time"])
    summary["steady_tokens_per_s"] = rates[len(rates) // 2] if rates else float("nan")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/overhead")
    p.add_argument("--data", default=".cache/bench-corpus")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {sorted(ARMS)}")
    p.add_argument("--model", default="100m")
    p.add_argument("--seq-len", type=int, help="corpus option, when --data is built here")
    p.add_argument("--vocab-size", type=int, help="corpus option, when --data is built here")
    p.add_argument("--max-bytes", type=int, help="corpus option (0 = all the source)")
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for i, arm in enumerate(args.arms.split(",")):
        # An arm may be listed twice (e.g. plain first and last, to expose drift).
        name = arm if arm not in rows else f"{arm}#{i}"
        cfg_path = out / f"{name}.json"
        cfg_path.write_text(json.dumps(ds_config(args, ARMS[arm]), indent=1))
        cmd = [sys.executable, "-m", "attent_scale.pretrain", "--deepspeed_config", str(cfg_path),
               "--out", str(out / name), "--data", args.data, "--model", args.model,
               "--epochs", str(args.epochs), "--eval-every", "0", "--eval-samples", "64",
               "--no-resume", "--no-plot"]
        for flag in ("seq_len", "vocab_size", "max_bytes"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if ARMS[arm] is None:
            cmd.append("--no-teacher")
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
        rows[name] = summary_of(out / name / "metrics.jsonl")
    plains = [r["steady_tokens_per_s"] for n, r in rows.items() if n.split("#")[0] == "plain"]
    base = sum(plains) / len(plains) if plains else next(iter(rows.values()))["steady_tokens_per_s"]
    lines = ["| arm | steady tokens/s | vs plain | tokens/s incl. teacher phases | "
             "teacher phases (s) | wall (s) | peak GiB | final val loss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        tps = r["steady_tokens_per_s"]
        lines.append(f"| {name} | {tps:,.0f} | {tps / base:.3f} | "
                     f"{float(r['training_tokens/s']):,.0f} | {r['teacher_time_(s)']} | "
                     f"{r['wall_time_(s)']} | {r['peak_GPU_memory_(GiB)']} | "
                     f"{r['final_validation_loss']} |")
    (out / "overhead.json").write_text(json.dumps(rows, indent=1))
    (out / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
