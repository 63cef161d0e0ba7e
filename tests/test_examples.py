"""The README's example scripts, run as a user would: 2 CPU ranks under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port


def torchrun(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(ROOT / "examples" / script), *args]
    # Generous: fails on a hang, not on a slow shared machine.
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
def test_deepspeed_example_selects_and_checkpoints_the_teacher(tmp_path):
    out = torchrun("deepspeed_gpt2.py", "--deepspeed_config", str(ROOT / "examples/ds_config.json"),
                   "--checkpoint", str(tmp_path / "ckpt"))
    assert out.count("[attent] pass") == 2 and "epoch 2:" in out
    tag = (tmp_path / "ckpt" / "latest").read_text().strip()
    state = json.loads((tmp_path / "ckpt" / tag / "attent_state.json").read_text())
    assert state["pass_index"] == 3 and state["selection_pass"] == 2


@pytest.mark.slow
def test_ddp_sampler_example_selects(tmp_path):
    out = torchrun("ddp_sampler.py", "--config", str(ROOT / "examples/ds_config.json"))
    assert out.count("[attent] pass") == 2 and "epoch 2:" in out
