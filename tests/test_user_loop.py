"""A user's own DeepSpeed script with the teacher switched on by its JSON and one changed call.

tests/user_loop_worker.py is an ordinary script (its model, a map-style dataset, its loop) whose
example i scores a known function of i; it runs on 2 gloo ranks through the two public paths,
``attent_scale.initialize`` and ``AttentSampler`` + ``update``, under ZeRO-1, 2 and 3.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import ROOT, free_port

BASE = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "steps_per_print": 10**6, "zero_optimization": {"stage": 1},
        # lr 0: the scores stay a known function of the id for the whole run.
        "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}}}
SECTION = {"preset": "attent-soft", "selection": {"rescale": True}}
N, PASSES = 96, 3


def run(tmp: Path, name: str, stage: int, path: str, *extra: str, section=SECTION) -> Path:
    out = tmp / name
    out.mkdir(exist_ok=True)
    cfg = {**BASE, "zero_optimization": {"stage": stage}}
    if section is not None:
        cfg["attent"] = section
    (out / "ds.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(ROOT / "tests" / "user_loop_worker.py"),
           "--config", str(out / "ds.json"), "--out", str(out), "--path", path, *extra]
    # Generous: fails on a hang, not on a slow shared machine.
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def steps(out: Path) -> dict[int, dict[int, list[int]]]:
    """pass -> rank -> ids trained, in order."""
    found: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for rank in (0, 1):
        for line in (out / f"steps.rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "ids" in rec:
                found[rec["pass"]][rank].extend(rec["ids"])
    return found


def selections(out: Path) -> dict[int, dict[int, tuple[int, int]]]:
    """pass -> rank -> (checksum, size) of the selection each rank drew."""
    found: dict[int, dict[int, tuple[int, int]]] = defaultdict(dict)
    for rank in (0, 1):
        for line in (out / f"steps.rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "selection" in rec:
                found[rec["selection"]][rank] = (rec["checksum"], rec["selected"])
    return found


def check_run(out: Path) -> dict[int, dict[int, list[int]]]:
    sel, trained = selections(out), steps(out)
    assert sorted(sel) == list(range(PASSES))
    for p in range(PASSES):
        assert sel[p][0] == sel[p][1], f"ranks disagree on pass {p}'s selection"
        size = sel[p][0][1]
        both = trained[p][0] + trained[p][1]
        # every selected id once per pass across the group, the ranks' shares equal
        assert len(both) == len(set(both)) == size
        assert len(trained[p][0]) == len(trained[p][1])
    assert sel[0][0][1] == N and sel[1][0][1] < N  # the teacher selected after the warm-up
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["ids"]) == N
    for i, got, want in zip(scores["ids"], scores["scores"], scores["expected"]):
        assert got == pytest.approx(want, abs=1e-5), f"id {i} holds another id's score"
    return trained


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted ZeRO-1 run through attent_scale.initialize."""
    return check_run(run(tmp_path_factory.mktemp("ref"), "zero1", 1, "initialize"))


@pytest.mark.slow
def test_initialize_under_zero2_stops_and_resumes_to_the_same_ids(reference, tmp_path):
    out = run(tmp_path, "zero2", 2, "initialize", "--stop-after", "16")  # mid pass 1
    assert max(steps(out)) == 1
    run(tmp_path, "zero2", 2, "initialize", "--resume")
    assert check_run(out) == reference


@pytest.mark.slow
def test_initialize_under_zero3_trains_the_same_ids(reference, tmp_path):
    assert check_run(run(tmp_path, "zero3", 3, "initialize")) == reference


@pytest.mark.slow
def test_sampler_path_stops_and_resumes_to_the_same_ids(reference, tmp_path):
    run(tmp_path, "sampler", 2, "sampler", "--stop-after", "16")
    out = run(tmp_path, "sampler", 2, "sampler", "--resume")
    assert check_run(out) == reference


def test_misspelt_section_is_refused_before_anything_starts(tmp_path):
    import attent_scale
    cfg = {**BASE, "attent": {"preset": "attent-soft", "ration": 2}}
    with pytest.raises(attent_scale.ConfigError, match=r"attent\.ration: unknown key"):
        attent_scale.initialize(model=None, config=cfg, training_data=[0] * 8, passes=2)


def test_section_needs_passes_and_data():
    import attent_scale
    cfg = {**BASE, "attent": {"preset": "attent-soft"}}
    with pytest.raises(ValueError, match="passes"):
        attent_scale.initialize(model=None, config=cfg, training_data=[0] * 8)
    with pytest.raises(ValueError, match="training_data"):
        attent_scale.initialize(model=None, config=cfg, passes=2)


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json"])
def test_shipped_configs_are_plain_deepspeed_once_autos_are_filled(name):
    """Without its section a shipped config is an ordinary DeepSpeed config, except for the two
    "auto" schedule lengths, which initialize fills from the plan, and "auto" bf16, which it
    fills from the device (the README names all three)."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from attent_scale import resolve_auto, split_deepspeed_config
    cfg, attent = split_deepspeed_config(ROOT / "configs" / name)
    assert attent is not None and "attent" not in cfg

    def autos(node, path=""):
        if isinstance(node, dict):
            return [a for k, v in node.items() for a in autos(v, f"{path}.{k}".lstrip("."))]
        return [path] if node == "auto" else []
    assert sorted(autos(cfg)) == ["bf16.enabled", "scheduler.params.total_num_steps",
                                  "scheduler.params.warmup_num_steps"]
    resolved = resolve_auto(cfg, 400)
    assert autos(resolved) == []
    params = resolved["scheduler"]["params"]
    assert (params["total_num_steps"], params["warmup_num_steps"]) == (400, 20)
    assert resolved["bf16"]["enabled"] is torch.cuda.is_available()  # False on a CPU machine
    # Without a plan only the device's "auto" is filled.
    assert autos(resolve_auto(cfg, None)) == ["scheduler.params.total_num_steps",
                                              "scheduler.params.warmup_num_steps"]
    DeepSpeedConfig(resolved)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    WarmupCosineLR(opt, **params)
    with pytest.raises(ValueError, match="positive integer"):
        WarmupCosineLR(opt, **cfg["scheduler"]["params"])
