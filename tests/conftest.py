"""Shared fixtures: a tiny prepared corpus and a runner for real multi-process training jobs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY_DS = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "steps_per_print": 1000000,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "torch_adam": True}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                             "warmup_type": "linear"}},
    "zero_optimization": {"stage": 1},
}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """~1.5k sequences of 32 tokens from a slice of the standard library."""
    from attent_scale.data import prepare_corpus
    root = tmp_path_factory.mktemp("corpus") / "tiny"
    prepare_corpus(root, seq_len=32, vocab_size=512, max_bytes=150_000, progress=False)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, stage: int = 1, attent: dict | None = None, **overrides) -> Path:
    cfg = json.loads(json.dumps(TINY_DS))
    cfg["zero_optimization"] = {"stage": stage}
    cfg.update(overrides)
    if attent is not None:
        cfg["attent"] = attent
    path.write_text(json.dumps(cfg))
    return path


def run_job(config: Path, corpus: Path, out: Path, nproc: int = 2, extra: list[str] = (),
            timeout: int = 240, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Run the real pretraining entry point with ``nproc`` CPU ranks over gloo."""
    args = ["--deepspeed_config", str(config), "--data", str(corpus), "--out", str(out),
            "--model", "tiny", "--seq-len", "32", "--vocab-size", "512", "--max-bytes", "150000",
            "--eval-samples", "32", "--eval-every", "0", "--log-ids", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "attent_scale.pretrain", *args]
    elif launcher == "deepspeed":
        # The shipped launcher script; it finds `deepspeed` on PATH, next to this interpreter.
        env.update(NUM_GPUS=str(nproc), CONFIG=str(config), MASTER_PORT=str(free_port()),
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]))
        cmd = ["bash", str(ROOT / "launchers" / "deepspeed" / "pretrain.sh"), *args[2:]]
    else:
        cmd = [sys.executable, "-m", "attent_scale.pretrain", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"job failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_ids(out: Path, nproc: int) -> dict[int, dict]:
    """Per rank: {'passes': {pass: checksum}, 'trained': {pass: [ids in order]}}."""
    logs = {}
    for r in range(nproc):
        passes, trained = {}, {}
        for line in (out / f"ids.rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "selection" in rec:
                passes[rec["pass"]] = (rec["selection"], rec["size"])
            else:
                trained.setdefault(rec["pass"], []).extend(rec["ids"])
        logs[r] = {"passes": passes, "trained": trained}
    return logs
