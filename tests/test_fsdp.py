"""The FSDP2 loop (pretrain_fsdp.py) with two real CPU ranks over gloo, and its config reader.

fully_shard runs on CPU with gloo as it does on GPUs with NCCL (parameters are DTensors on a CPU
device mesh; all-gather and reduce-scatter go through gloo), so these are the same checks as the
DeepSpeed ones in test_multirank.py: agreement, exactly-once, lockstep pool scoring, exact resume.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attent_scale.config import ConfigError
from attent_scale.fsdp_plugin import WarmupCosine, parse_train_config
from attent_scale.policy import selection_checksum
from conftest import ROOT, free_port, read_ids, write_config

MICRO = 32  # large micro batches keep the step count, and so the test time, small
# Pool scoring over 65 candidates with micro batch 32 on 2 ranks: rank 0 scores 33 ids (2
# batches), rank 1 scores 32 (1 batch). FSDP2 all-gathers each block's parameters in every
# forward, so without lockstep padding rank 0's second forward would wait for rank 1 forever.
UNEVEN_POOL = {
    "source": "pool", "pool_size": 65, "warmup_passes": 1, "signal": "fgrad_norm",
    "ratio": {"schedule": "constant", "value": 0.5},
    "interval": {"schedule": "fixed", "every": 1},
    "selection": {"method": "soft", "temperature": 0.5},
}
EPOCHS = 3


def run_fsdp(config: Path, corpus: Path, out: Path, extra: list[str] = (),
             launcher: bool = False, timeout: int = 240) -> subprocess.CompletedProcess:
    """Two CPU ranks of attent_scale.pretrain_fsdp, by torchrun or by the shipped launcher."""
    args = ["--data", str(corpus), "--out", str(out), "--model", "tiny", "--eval-samples", "32",
            "--eval-every", "0", "--log-ids", "--no-plot", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    if launcher:
        # The script finds `torchrun` on PATH, next to this interpreter.
        env.update(NPROC_PER_NODE="2", CONFIG=str(config), MASTER_PORT=str(free_port()),
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]))
        cmd = ["bash", str(ROOT / "launchers" / "torchrun" / "pretrain_fsdp.sh"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "attent_scale.pretrain_fsdp",
               "--config", str(config), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"job failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def check_agreement_and_exactly_once(logs: dict, passes: int) -> None:
    assert sorted(logs[0]["trained"]) == list(range(passes))
    for p in range(passes):
        sums = {logs[r]["passes"][p] for r in (0, 1)}
        assert len(sums) == 1, f"pass {p}: ranks logged different selections {sums}"
        checksum, size = sums.pop()
        union = np.concatenate([logs[r]["trained"][p] for r in (0, 1)])
        assert len(union) == size
        assert len(np.unique(union)) == size, f"pass {p}: an id was trained twice"
        assert selection_checksum(np.sort(union), np.ones(size)) == checksum


def test_fsdp_two_ranks_agree_train_each_selected_id_once_and_resume_exactly(tiny_corpus,
                                                                             tmp_path):
    cfg = write_config(tmp_path / "fsdp.json", stage=3, attent=UNEVEN_POOL,
                       train_micro_batch_size_per_gpu=MICRO)
    common = ["--epochs", str(EPOCHS)]
    full = tmp_path / "full"
    proc = run_fsdp(cfg, tiny_corpus, full, extra=common, launcher=True)
    assert "FSDP2 over 2 ranks" in proc.stdout
    logs = read_ids(full, 2)
    check_agreement_and_exactly_once(logs, EPOCHS)
    assert logs[0]["passes"][1][1] < logs[0]["passes"][0][1], "the teacher skipped nothing"
    # Pool scoring before each subset pass re-selects from the current model: pass 2 differs.
    assert logs[0]["passes"][1][0] != logs[0]["passes"][2][0]

    # Stop three steps into the first subset pass, then resume with the same command: pass 2's
    # selection comes from pool scores of the resumed model, so it only matches if model and
    # optimizer state came back exactly.
    steps_pass0 = len(logs[0]["trained"][0]) // MICRO
    cut = tmp_path / "cut"
    run_fsdp(cfg, tiny_corpus, cut, extra=[*common, "--stop-after", str(steps_pass0 + 3)])
    tag = (cut / "checkpoints" / "latest").read_text()
    assert tag == f"step{steps_pass0 + 3}"
    assert (cut / "checkpoints" / tag / "dcp" / ".metadata").exists()
    resumed = run_fsdp(cfg, tiny_corpus, cut, extra=common)
    assert "resumed at step" in resumed.stdout
    again = read_ids(cut, 2)
    for r in range(2):
        assert again[r]["trained"] == logs[r]["trained"], f"rank {r} trained other ids"
        assert again[r]["passes"] == logs[r]["passes"]


def test_fsdp_plain_job_without_attent_section_trains_full_passes_and_learns(tiny_corpus,
                                                                            tmp_path):
    # Gradient accumulation over 2 micro batches: one reduce-scatter and optimizer step per window.
    cfg = write_config(tmp_path / "fsdp.json", train_micro_batch_size_per_gpu=16,
                       gradient_accumulation_steps=2)
    out = tmp_path / "plain"
    proc = run_fsdp(cfg, tiny_corpus, out, extra=["--epochs", "2"])
    assert "off (plain FSDP2)" in proc.stdout
    meta = json.loads((tiny_corpus / "meta.json").read_text())
    logs = read_ids(out, 2)
    check_agreement_and_exactly_once(logs, 2)
    full = (meta["num_train"] // 64) * 64
    assert [logs[0]["passes"][p][1] for p in (0, 1)] == [full, full]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if r["type"] == "summary")
    assert summary["optimizer_steps"] == 2 * full // 64
    evals = [r["val_loss"] for r in records if r["type"] == "eval"]
    assert evals[-1] < evals[0] - 0.5, evals


def test_fsdp_config_reports_every_problem_and_notes_deepspeed_only_keys():
    base = json.loads(json.dumps({"train_micro_batch_size_per_gpu": 8,
                                  "optimizer": {"type": "AdamW",
                                                "params": {"lr": 1e-3, "torch_adam": True}},
                                  "zero_optimization": {"stage": 3},
                                  "bf16": {"enabled": True}}))
    tc = parse_train_config(base, world=2, cuda=False)
    assert (tc.micro_batch, tc.grad_accum, tc.global_batch) == (8, 1, 16)
    assert tc.adam == {"lr": 1e-3} and tc.decoupled_weight_decay and not tc.bf16
    assert any("zero_optimization" in n for n in tc.notes)
    assert any("bf16" in n for n in tc.notes)
    assert parse_train_config(base, world=2, cuda=True).bf16

    bad = {**base, "train_batch_size": 64, "fp16": {"enabled": True},
           "optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "momentum": 0.9}},
           "scheduler": {"type": "OneCycle", "params": {}}}
    with pytest.raises(ConfigError) as err:
        parse_train_config(bad, world=2, cuda=False)
    text = str(err.value)
    for key in ("train_batch_size: got 64", "optimizer.type: got 'Lamb'", "['momentum']",
                "scheduler.type: got 'OneCycle'", "fp16.enabled"):
        assert key in text, text
    assert "5 problems" in text


@pytest.mark.parametrize("warmup_type", ["linear", "log"])
def test_warmup_cosine_has_deepspeeds_shape(warmup_type):
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    import torch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ours = WarmupCosine(total_num_steps=50, warmup_num_steps=7, warmup_min_ratio=0.1,
                        cos_min_ratio=0.05, warmup_type=warmup_type)
    theirs = WarmupCosineLR(opt, total_num_steps=50, warmup_num_steps=7, warmup_min_ratio=0.1,
                            cos_min_ratio=0.05, warmup_type=warmup_type)
    for step in range(60):
        theirs.last_batch_iteration = step
        assert ours.ratio(step) == pytest.approx(theirs.get_lr_ratio(), abs=1e-12), step


def test_fsdp_bad_config_fails_at_start_naming_the_key(tmp_path):
    cfg = tmp_path / "fsdp.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 0,
                               "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "attent_scale.pretrain_fsdp", "--config",
                           str(cfg), "--out", str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "train_micro_batch_size_per_gpu: got 0" in proc.stderr, proc.stderr[-2000:]
    assert "optimizer.type: got 'SGD'" in proc.stderr
    assert not (tmp_path / "run").exists(), "the job started before the config was checked"
