"""Exact resume, rank failure, atomic checkpoints and elastic world size, with real gloo ranks.

One reference run trains uninterrupted; every other run here is interrupted (a clean stop, or
SIGKILL of one rank) and resumed, and the ids it trained, counted from the checkpoint each resume
started from, must equal the reference's bit for bit. docs/RELIABILITY.md states the rules.

Plan (1456 sequences, micro batch 8, 2 ranks -> global batch 16, 4 passes):
pass 0 full (91 steps); pool scoring, then pass 1 selects half (45 steps); pass 2 trains the same
selection (one interval of 2 passes); pool scoring, then pass 3 selects again.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from attent_scale.policy import round_budget, selection_checksum
from conftest import ROOT, assert_agree_and_exactly_once, free_port, run_job, write_config

POOL_EVERY_2 = {
    "source": "pool", "warmup_passes": 1, "signal": "loss",
    "ratio": {"schedule": "constant", "value": 0.5},
    "interval": {"schedule": "fixed", "every": 2},
    "selection": {"method": "soft", "temperature": 0.5},
}
EPOCHS = ["--epochs", "4", "--no-plot"]
KILL_EXIT_BOUND_S = 60


# ---- logs ---------------------------------------------------------------------------------------

def read_log(out: Path, rank: int) -> list[dict]:
    path = out / f"ids.rank{rank}.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    # Read while the job writes: a line without its newline is still being written.
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def take_logs(out: Path, name: str) -> dict[int, list[dict]]:
    """This run's records per rank; the files move aside so the next run starts new ones."""
    logs = {}
    for r in (0, 1):
        logs[r] = read_log(out, r)
        if (out / f"ids.rank{r}.jsonl").exists():
            os.replace(out / f"ids.rank{r}.jsonl", out / f"ids.{name}.rank{r}.jsonl")
    return logs


def trained(records: list[dict], before: float = float("inf")) -> list[tuple]:
    """(pass, step, ids) of every micro batch trained in an optimizer step < ``before``: the
    steps a checkpoint at ``before`` holds (later ones were lost with the crash)."""
    return [(r["pass"], r["step"], tuple(r["ids"])) for r in records
            if "ids" in r and r["step"] < before]


def selections(records: list[dict]) -> dict[int, tuple]:
    return {r["pass"]: (r["selection"], r["size"]) for r in records if "selection" in r}


def as_read_ids(per_rank: dict[int, list[tuple]], sels: dict[int, tuple]) -> dict:
    """The shape conftest.read_ids returns, for assert_agree_and_exactly_once."""
    out = {}
    for r, rows in per_rank.items():
        t: dict[int, list] = {}
        for p, _, ids in rows:
            t.setdefault(p, []).extend(ids)
        out[r] = {"passes": sels, "trained": t}
    return out


def latest(out: Path) -> str:
    path = out / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else ""


# ---- a job we can kill ----------------------------------------------------------------------------

def start_job(config: Path, corpus: Path, out: Path, extra=()) -> subprocess.Popen:
    """run_job's 2-rank torchrun command, started in the background (output to files)."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["--deepspeed_config", str(config), "--data", str(corpus), "--out", str(out),
            "--model", "tiny", "--eval-samples", "32", "--eval-every", "0", "--log-ids", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "attent_scale.pretrain", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(out / "stdout.txt", "w"),
                            stderr=open(out / "stderr.txt", "w"))


def worker(job: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            if (child.environ().get("RANK") == str(rank)
                    and "attent_scale.pretrain" in " ".join(child.cmdline())):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker process of rank {rank} under torchrun {job.pid}")


def kill_rank_when(job: subprocess.Popen, rank: int, ready, timeout: float = 240) -> float:
    """SIGKILL one rank's worker as soon as ``ready()``; returns seconds until torchrun exited."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert job.poll() is None, "the job ended before the kill point"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.01)
    worker(job, rank).send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
        job.wait(timeout=KILL_EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(f"the job hung for {KILL_EXIT_BOUND_S}s after a rank was killed")
    return time.monotonic() - killed


# ---- shared runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory) -> dict:
    """The uninterrupted reference and a run stopped right after pass 1's selection."""
    root = tmp_path_factory.mktemp("reliability")
    cfg = write_config(root / "ds.json", stage=1, attent=POOL_EVERY_2)
    ref = root / "reference"
    run_job(cfg, tiny_corpus, ref, extra=EPOCHS)
    ref_logs = {r: read_log(ref, r) for r in (0, 1)}
    steps0 = len({rec["step"] for rec in ref_logs[0] if rec.get("pass") == 0 and "ids" in rec})
    steps1 = len({rec["step"] for rec in ref_logs[0] if rec.get("pass") == 1 and "ids" in rec})
    # Right after a selection: one optimizer step into the first subset pass.
    after_selection = root / "after_selection"
    run_job(cfg, tiny_corpus, after_selection, extra=[*EPOCHS, "--stop-after", str(steps0 + 1)])
    return {"cfg": cfg, "ref": ref_logs, "steps0": steps0, "steps1": steps1,
            "after_selection": after_selection, "corpus": tiny_corpus}


def test_exact_resume_rank_kill_and_atomic_checkpoints(runs, tmp_path):
    cfg, ref, corpus = runs["cfg"], runs["ref"], runs["corpus"]
    steps0, steps1 = runs["steps0"], runs["steps1"]
    assert_agree_and_exactly_once(as_read_ids({r: trained(ref[r]) for r in (0, 1)},
                                              selections(ref[0])), 2)
    out = Path(shutil.copytree(runs["after_selection"], tmp_path / "job"))
    committed = {r: [] for r in (0, 1)}
    seen_selections = []

    def commit(logs, upto):
        for r in (0, 1):
            committed[r] += trained(logs[r], upto)
            seen_selections.append(selections(logs[r]))

    a = take_logs(out, "a")
    commit(a, float("inf"))  # stopped cleanly: everything it trained is in its checkpoint
    assert latest(out) == f"step{steps0 + 1}"

    # B: resume from right after the selection, checkpoint mid-interval (pass 2), then SIGKILL
    # rank 1 a few steps later: those steps are lost and must be trained again, once.
    mid = steps0 + steps1 + steps1 // 2
    job = start_job(cfg, corpus, out, [*EPOCHS, "--save-every", str(mid)])
    waited = kill_rank_when(job, 1, lambda: latest(out) == f"step{mid}" and any(
        rec.get("step", -1) >= mid + 2 for rec in read_log(out, 1)))
    assert job.returncode != 0 and waited < KILL_EXIT_BOUND_S
    assert "resumed at step" in (out / "stdout.txt").read_text()
    assert latest(out) == f"step{mid}"
    commit(take_logs(out, "b"), mid)

    # C: resume mid-interval with a checkpoint due at the end of pass 2; kill rank 1 the moment
    # its directory appears, i.e. while it is being written (DeepSpeed's files first, `latest`
    # last). D: the same again, but killed once `latest` names it: during the pool-scoring pass
    # that precedes pass 3's selection.
    end2 = steps0 + 2 * steps1
    for name, ready in (
            ("c", lambda: (out / "checkpoints" / f"step{end2}").exists()),
            ("d", lambda: "resumed at step" in (out / "stdout.txt").read_text()
             and latest(out) == f"step{end2}")):
        job = start_job(cfg, corpus, out, [*EPOCHS, "--save-every", str(end2)])
        kill_rank_when(job, 1, ready)
        assert job.returncode != 0
        logs = take_logs(out, name)
        assert all(3 not in selections(logs[r]) and not any(t[0] == 3 for t in trained(logs[r]))
                   for r in (0, 1)), f"run {name}: the kill came after pass 3's selection"
        last = latest(out)
        assert last in (f"step{mid}", f"step{end2}"), last  # never a torn checkpoint
        commit(logs, int(last.removeprefix("step")))
    assert last == f"step{end2}"

    # A kill between DeepSpeed's files and the `latest` pointer leaves a newer, torn tag that
    # nothing names; resume must use the last complete checkpoint.
    torn = out / "checkpoints" / f"step{end2 + 7}"
    torn.mkdir()
    for f in (out / "checkpoints" / last).glob("*.pt"):
        (torn / f.name).write_bytes(f.read_bytes()[:100])

    # E: resume to the end.
    proc = run_job(cfg, corpus, out, extra=EPOCHS)
    assert f"resumed at step {end2}" in proc.stdout
    commit(take_logs(out, "e"), float("inf"))

    for r in (0, 1):
        assert committed[r] == trained(ref[r]), f"rank {r}: the resumed runs trained other ids"
    ref_sel = selections(ref[0])
    for sel in seen_selections:
        assert sel == {p: ref_sel[p] for p in sel}, "a resumed run selected differently"
    assert 3 in {p for sel in seen_selections for p in sel}, "pass 3 was never selected"
    assert_agree_and_exactly_once(as_read_ids(committed, ref_sel), 2)


def _pass_ids(logs: list[list[dict]], p: int) -> np.ndarray:
    return np.concatenate([[i for rec in log if rec.get("pass") == p and "ids" in rec
                            for i in rec["ids"]] for log in logs] + [np.zeros(0, np.int64)])


def test_resume_two_rank_checkpoint_on_one_rank(runs, tmp_path):
    """2 -> 1: the in-progress pass (16 samples in, a whole global batch of 8) continues."""
    out = Path(shutil.copytree(runs["after_selection"], tmp_path / "job"))
    before = take_logs(out, "two")
    proc = run_job(runs["cfg"], runs["corpus"], out, nproc=1, launcher="python", extra=EPOCHS)
    assert "elastic resume: checkpoint of 2 ranks, now 1" in proc.stdout
    assert "pass 1 continues after its first 16 samples" in proc.stdout
    after = read_log(out, 0)
    ref_sel = selections(runs["ref"][0])
    # The carried-over selection trains pass 1's rest and pass 2 (same interval), unchanged.
    assert selections(after)[2] == ref_sel[2] == ref_sel[1]
    checksum, size = ref_sel[1]
    for p in (1, 2):
        ids = _pass_ids([before[0], before[1], after], p)
        assert len(ids) == size == len(np.unique(ids)), f"pass {p} not exactly once"
        assert selection_checksum(np.sort(ids), np.ones(size)) == checksum
    # Pass 3 selects anew with this world's global batch.
    meta = json.loads((runs["corpus"] / "meta.json").read_text())
    ids3 = _pass_ids([after], 3)
    assert len(ids3) == round_budget(meta["num_train"], 0.5, 8) == len(np.unique(ids3))
    assert selection_checksum(np.sort(ids3), np.ones(len(ids3))) == selections(after)[3][0]


def test_resume_one_rank_checkpoint_on_two_ranks(runs, tmp_path):
    """1 -> 2: the kept selection (a multiple of 8) is cut to whole batches of 16 and the pass
    in progress (40 samples in) ends at the checkpoint; later passes train exactly once."""
    meta = json.loads((runs["corpus"] / "meta.json").read_text())
    n = meta["num_train"]
    out = tmp_path / "job"
    steps0 = (n // 8 * 8) // 8
    run_job(runs["cfg"], runs["corpus"], out, nproc=1, launcher="python",
            extra=[*EPOCHS, "--stop-after", str(steps0 + 5)])
    one = take_logs(out, "one")[0]
    tag = out / "checkpoints" / latest(out)
    with np.load(tag / "attent_state.npz", allow_pickle=False) as z:
        kept = z["selection_ids"]
    assert len(kept) == round_budget(n, 0.5, 8) and len(kept) % 16, "the case needs a cut"

    proc = run_job(runs["cfg"], runs["corpus"], out, extra=EPOCHS)
    assert "elastic resume: checkpoint of 1 ranks, now 2" in proc.stdout
    cut = len(kept) // 16 * 16
    assert f"pass 1 ends here, {len(kept) - 40} of its {len(kept)} selected ids untrained" \
        in proc.stdout
    assert f"cut from {len(kept)} to {cut} ids" in proc.stdout
    two = {r: read_log(out, r) for r in (0, 1)}
    assert len(_pass_ids([one], 1)) == 40 and len(_pass_ids([two[0], two[1]], 1)) == 0
    ids2 = _pass_ids([two[0], two[1]], 2)
    assert len(ids2) == cut == len(np.unique(ids2))
    assert np.isin(ids2, kept).all(), "pass 2 must train the carried-over selection"
    assert_agree_and_exactly_once(as_read_ids({r: trained(two[r]) for r in (0, 1)},
                                              selections(two[0])), 2)
