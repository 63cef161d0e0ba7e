"""Exact resume, rank failure, atomic checkpoints and elastic world size, with real gloo ranks.

One reference run trains uninterrupted; every other run here is interrupted (a clean stop, or
SIGKILL of one rank) and resumed, and the ids it trained, counted from the checkpoint each resume
started from, must equal the reference's bit for bit. docs/RELIABILITY.md states the rules.

Plan (1456 sequences, micro batch 8, 2 ranks -> global batch 16, 4 passes):
pass 0 full (91 steps); pool scoring, then pass 1 selects half (45 steps); pass 2 trains the same
selection (one interval of 2 passes); pool scoring, then pass 3 selects again.

Then, on a corpus and model under which the score of sample i is a known function of i: scores
land on their own ids (both jobs, 1 and 2 ranks), and a resume that cannot continue correctly (a
changed setting, a damaged or foreign checkpoint, a disk that fills up during a save) stops with
one line, changing nothing it should not.
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
from conftest import (HANG_TIMEOUT, ROOT, assert_agree_and_exactly_once, free_port, run_job,
                      write_config)

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


def test_a_jobs_process_group_ends_with_its_threads_before_exit(tmp_path):
    """run_main ends the group once the job's body has returned, finished or failed, though the
    body held its groups in a reference cycle to the end: every gloo thread is gone before the
    interpreter exits, where a live one can abort a rank after a successful run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    for case, code in (("ok", 0), ("fail", 1)):
        out = tmp_path / f"{case}.json"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                               "2", "--master_port", str(free_port()),
                               str(ROOT / "tests" / "teardown_worker.py"), case, str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=HANG_TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(out.read_text())
        assert res["code"] == code and not res["initialized"], res
        assert res["running"] > res["before"], f"the group started no thread: {res}"
        assert res["after"] == res["before"], f"{case}: threads outlived run_main: {res}"


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


# ---- score attribution: the score of sample i is a known function of i ----------------------------
# The model's logits do not depend on its input: every token embeds to the same vector, so every
# position of every sequence carries the same hidden state through the (real) decoder block, and
# the head turns it into one fixed row of logits. Sample i holds the token label(i) at every
# position, so its loss is -log softmax(row)[label(i)], and the learning rate is 0, so the row
# never changes. A score recorded against any other id (a neighbour in the batch, another rank's
# sample) differs from that id's own by at least |row[a] - row[b]| for labels a != b: 0.67 here.

VOCAB, SEQ, NUM = 64, 8, 128
LR_ZERO = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
           "steps_per_print": 1000000, "zero_optimization": {"stage": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}},
           "attent": {"preset": "attent-simple"}}


def label(i):
    return (7 * np.asarray(i) + 3) % VOCAB  # neighbours' labels differ by 7


@pytest.fixture(scope="module")
def known(tmp_path_factory) -> dict:
    """MDS shards of our own (DIR/train, DIR/val), a saved model with input-independent logits,
    configs with learning rate 0, and the expected score of every id."""
    import torch
    from streaming import MDSWriter
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("known")
    for split, n in (("train", NUM), ("val", 16)):
        with MDSWriter(out=str(root / "data" / split), columns={"tokens": "ndarray:int32"}) as w:
            for i in range(n):
                w.write({"tokens": np.full(SEQ, label(i), np.int32)})
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=32, max_position_embeddings=SEQ,
        tie_word_embeddings=False))
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.copy_(torch.linspace(-3.0, 3.0, VOCAB)[:, None].expand(VOCAB, 16)
                                   / 16)
        tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
        logits = model(input_ids=tokens).logits.double()
    row = logits[0, 0]
    assert torch.allclose(logits, row.expand_as(logits), atol=1e-5), "logits depend on the input"
    model.save_pretrained(str(root / "model"))
    nll = -torch.log_softmax(row, 0).numpy()
    configs = {}
    for name, edit in (("lr0", {}), ("micro24", {"train_micro_batch_size_per_gpu": 24}),
                       ("micro4", {"train_micro_batch_size_per_gpu": 4}),
                       ("ratio03", {"attent": {"preset": "attent-simple",
                                               "ratio": {"value": 0.3}}}),
                       ("zero3", {"zero_optimization": {"stage": 3}})):
        configs[name] = root / f"{name}.json"
        configs[name].write_text(json.dumps({**LR_ZERO, **edit}))
    return {"root": root, "data": root / "data", "model": root / "model", "cfg": configs,
            "expected": nll[label(np.arange(NUM))]}


def job_args(known: dict, config: str, out: Path, *extra) -> list[str]:
    return ["--deepspeed_config", str(known["cfg"][config]), "--data", str(known["data"]),
            "--init-from", str(known["model"]), "--vocab-size", str(VOCAB), "--out", str(out),
            "--epochs", "2", "--eval-samples", "16", "--eval-every", "0", "--no-plot", *extra]


def assert_scores_are_their_ids_own(tag_dir: Path, expected: np.ndarray) -> None:
    with np.load(tag_dir / "attent_state.npz", allow_pickle=False) as z:
        scores, scored = z["scores"], z["scored"]
    assert scored.all(), f"{np.count_nonzero(~scored)} ids were never scored"
    wrong = np.flatnonzero(np.abs(scores - expected) > 1e-4)
    if len(wrong):
        i = wrong[0]
        raise AssertionError(f"{len(wrong)} of {NUM} ids hold another sample's score, e.g. id "
                             f"{i}: {scores[i]:.4f}, its own {expected[i]:.4f}")


def test_scores_are_recorded_against_their_own_ids_on_two_ranks(known, tmp_path):
    """The DeepSpeed job on 2 ranks: every rank's scores land on its own samples' ids."""
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "attent_scale.pretrain",
                           *job_args(known, "lr0", out, "--save-every", "1000")],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[attent] pass 1 subset" in proc.stdout
    assert_scores_are_their_ids_own(out / "checkpoints" / "final", known["expected"])


# ---- checkpoints a job cannot use, and a disk that fills up ---------------------------------------
# One driver process (tests/entry_driver.py) runs every case through the real main(): a
# reference run, a 1-rank checkpoint of each job stopped in pass 1 (step 20 of 27: 16 steps of
# pass 0, 11 of the teacher's 88-sample pass 1), then resumes of damaged copies and of copies
# with changed settings. A disk fills up for real where a tmpfs can be mounted.

DS, FSDP = "attent-pretrain", "attent-pretrain-fsdp"
MODULES = {DS: "attent_scale.pretrain", FSDP: "attent_scale.pretrain_fsdp"}
STOP = 20


@pytest.fixture(scope="module")
def resumes(known) -> dict:
    from entry_driver import can_mount, run_cases
    root = known["root"] / "resumes"
    root.mkdir()
    mounted = can_mount()
    full = {DS: root / "full-ds", FSDP: root / "full-fsdp"}
    tag = f"step{STOP}"

    def case(name, job=DS, config="lr0", out=None, extra=(), steps=(), watch=True):
        out = out or root / name
        return {"name": name, "module": MODULES[job], "steps": list(steps),
                "argv": job_args(known, config, out, "--log-ids", *extra),
                "watch": str(out) if watch else None}

    def damaged(name, job, *steps, **kw):
        """A copy of the job's base run, prepared by ``steps`` on paths inside it."""
        base, run = root / ("ds-base" if job == DS else "fsdp-base"), root / name
        return case(name, job, steps=[["copy", str(base), str(run)], *[
            [op, str(run / rel), *([str(run / rest[0])] if op == "move" else rest)]
            for op, rel, *rest in steps]], **kw)

    ck = f"checkpoints/{tag}"
    cases = [
        case("reference", watch=False),
        case("ds-base", extra=["--save-every", "8", "--stop-after", str(STOP)], watch=False),
        case("fsdp-base", FSDP, extra=["--save-every", "8", "--stop-after", str(STOP)],
             watch=False),
        # 128 samples in global batches of 24: each full pass leaves 8 out (the remainder rule).
        case("summary-counts", config="micro24", extra=["--epochs", "3"], watch=False),
        # The settings a resume may not change, each from one of the runs.
        damaged("micro-8-to-24", DS, config="micro24"),
        damaged("micro-8-to-4", DS, config="micro4"),
        damaged("ratio-0.7-to-0.3", DS, config="ratio03"),
        damaged("passes-2-to-3", DS, extra=["--epochs", "3"]),
        damaged("fsdp-micro-8-to-24", FSDP, config="micro24"),
        # Damaged or foreign checkpoints.
        damaged("truncated-teacher-state", DS, ["truncate", f"{ck}/attent_state.npz"]),
        damaged("missing-optimizer-file", DS,
                ["delete", f"{ck}/zero_pp_rank_0_mp_rank_00_optim_states.pt"]),
        damaged("garbage-trainer-state", DS, ["write", f"{ck}/trainer_state.json", '{"step": 2']),
        damaged("edited-trainer-state", DS,
                ["edit_json", f"{ck}/trainer_state.json", {"samples_in_pass": "32"}]),
        damaged("zero1-under-zero3", DS, config="zero3"),
        # A checkpoint of 2 ranks (so says its trainer state) resumed on 1 under ZeRO-3.
        damaged("elastic-zero3", DS, ["edit_json", f"{ck}/trainer_state.json", {"world": 2}],
                config="zero3"),
        damaged("fsdp-truncated-teacher-state", FSDP, ["truncate", f"{ck}/attent_state.npz"]),
        damaged("fsdp-missing-shard", FSDP, ["delete", f"{ck}/dcp/__0_0.distcp"]),
        damaged("fsdp-garbage-trainer-state", FSDP,
                ["write", f"{ck}/trainer_state.json", "[1, 2"]),
        damaged("unchanged", DS, ["move", "ids.rank0.jsonl", "ids.base.jsonl"],
                extra=["--save-every", "1000"], watch=False),
        # Streaming's sample order follows the canonical node count: a resume keeps the one the
        # run started with (2 here, as if started on two nodes), whatever the nodes now.
        damaged("canonical-nodes-kept", DS, ["move", "ids.rank0.jsonl", "ids.base.jsonl"],
                ["edit_json", f"{ck}/trainer_state.json", {"canonical_nodes": 2}],
                extra=["--save-every", "1000"], watch=False),
    ]
    mounts = {}
    if mounted:
        # The resumed job's next checkpoint (step 22) cannot fit in the space left; then space
        # is freed and the same command resumes from step 20 and finishes.
        for job in (DS, FSDP):
            mounts[str(full[job])] = "size=2m"
            base = root / ("ds-base" if job == DS else "fsdp-base")
            run = full[job] / "run"
            cases.append(case(f"{job}-disk-full", job, out=run, extra=["--save-every", "2"],
                              steps=[["copy", str(base), str(run)],
                                     ["move", str(run / "ids.rank0.jsonl"),
                                      str(full[job] / "ids.base.jsonl")],
                                     ["fill", str(full[job]), 16384]]))
        run = full[DS] / "run"
        cases.append(case("disk-freed", out=run, extra=["--save-every", "2"],
                          steps=[["move", str(run / "ids.rank0.jsonl"),
                                  str(full[DS] / "ids.full.jsonl")],
                                 ["delete", str(full[DS] / "filler")]]))
        # The tmpfs goes with the driver's mount namespace: keep what the test reads.
        cases.append({"name": "collect", "module": None,
                      "steps": [["copy", str(full[DS]), str(root / "full-ds-kept")]]})
    results = run_cases(cases, root, mounts)
    return {"root": root, "results": results, "mounted": mounted, "full": full, "tag": tag,
            "expected": known["expected"]}


def _refused(resumes, name: str, job: str = DS) -> str:
    """The one line of a refused resume, after checking that it changed nothing in --out."""
    from entry_driver import one_line
    result = resumes["results"][name]
    line = one_line(result, job)
    assert result["changed"] == [], f"{name}: the refused resume changed {result['changed']}"
    return line


def test_base_runs_record_each_ids_own_score_in_both_jobs(resumes, known):
    for name in ("reference", "ds-base", "fsdp-base"):
        r = resumes["results"][name]
        assert r["error"] is None and r["code"] == 0, (name, r["stderr"][-3000:])
    for name in ("ds-base", "fsdp-base"):
        assert_scores_are_their_ids_own(resumes["root"] / name / "checkpoints" / resumes["tag"],
                                        known["expected"])


def test_the_summary_counts_what_the_attent_lines_report(resumes):
    """The run's summary agrees with its [attent] lines and metrics, remainder ids included."""
    import re
    r = resumes["results"]["summary-counts"]
    assert r["code"] == 0 and r["error"] is None, r["stderr"][-3000:]
    lines = re.findall(r"\[attent\] pass (\d+) subset r=0.700 kept (\d+) skipped (\d+) "
                       r"invalid 0 unscored (\d+)", r["stdout"])
    # Pass 0 trains 120 (8 left out, never scored); pass 1 keeps 72 (whole batches of 24 below
    # 0.7 x 128) and skips the other 48 scored ids; pass 2 trains the same selection.
    assert lines == [("1", "72", "48", "8")]
    records = [json.loads(x) for x in (resumes["root"] / "summary-counts" /
                                       "metrics.jsonl").read_text().splitlines()]
    assert [(x["pass"], x["selected"], x["skipped"]) for x in records
            if x["type"] == "selection"] == [(0, 120, 0), (1, 72, 48), (2, 72, 48)]
    summary = next(x for x in records if x["type"] == "summary")
    assert summary["examples_skipped_by_the_teacher"] == 96
    assert re.search(r"examples skipped by the teacher\s+96\n", r["stdout"])


def test_resume_with_a_changed_setting_names_it_from_and_to(resumes):
    root = resumes["root"]
    fix = ("resume with the original settings, or start fresh: another --out, or --no-resume "
           "(which ignores {ckpt})")
    for name, job, changes in (
            ("micro-8-to-24", DS, "micro batch: 8 -> 24; global batch: 8 -> 24; "
                                  "pass sizes: [128, 88] -> [120, 72]"),
            # 88 is whole batches of 4 too: the plan stands, but not the step count it was
            # made for (the learning-rate schedule would end early).
            ("micro-8-to-4", DS, "micro batch: 8 -> 4; global batch: 8 -> 4"),
            ("ratio-0.7-to-0.3", DS, "attent.ratio.value: 0.7 -> 0.3; "
                                     "pass sizes: [128, 88] -> [128, 32]"),
            ("passes-2-to-3", DS, "passes: 2 -> 3; pass sizes: [128, 88] -> [128, 88, 88]"),
            ("fsdp-micro-8-to-24", FSDP, "micro batch: 8 -> 24; global batch: 8 -> 24; "
                                         "pass sizes: [128, 88] -> [120, 72]")):
        ckpt = root / name / "checkpoints"
        assert _refused(resumes, name, job) == (
            f"{job}: the checkpoint in {ckpt} was made with other settings ({changes}); "
            + fix.format(ckpt=ckpt)), name
    # The unchanged resume trains exactly the uninterrupted run's ids: test_exact_resume_... above
    # (and test_disk_full_... below, from this very checkpoint).


def test_damaged_checkpoints_stop_with_one_line_and_change_nothing(resumes):
    root, tag = resumes["root"], resumes["tag"]

    def ck(name):
        return root / name / "checkpoints"

    fresh = "start fresh (--no-resume, or another --out)"
    teacher = ("field '(whole file)': not a readable npz archive (File is not a zip file); the "
               "teacher checkpoint is damaged; fix: resume from an earlier checkpoint")
    for name, job in (("truncated-teacher-state", DS), ("fsdp-truncated-teacher-state", FSDP)):
        assert _refused(resumes, name, job).startswith(
            f"{job}: {ck(name) / tag / 'attent_state.npz'}: {teacher}"), name
    name = "missing-optimizer-file"
    assert _refused(resumes, name) == (
        f"{DS}: checkpoint {ck(name) / tag} is incomplete: "
        f"{ck(name) / tag / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'} is missing; fix: point "
        f"{ck(name) / 'latest'} at an earlier complete tag, or {fresh}")
    name = "fsdp-missing-shard"
    assert _refused(resumes, name, FSDP) == (
        f"{FSDP}: checkpoint {ck(name) / tag} is incomplete: {ck(name) / tag / 'dcp'}/__0_0.distcp "
        f"is missing; fix: point {ck(name) / 'latest'} at an earlier complete tag, or {fresh}")
    for name, job, where in (("garbage-trainer-state", DS, "line 1 column 11 (char 10)"),
                             ("fsdp-garbage-trainer-state", FSDP, "line 1 column 6 (char 5)")):
        assert _refused(resumes, name, job) == (
            f"{job}: {ck(name) / tag / 'trainer_state.json'} (of the checkpoint "
            f"{ck(name) / 'latest'} names) is unreadable (not valid JSON: Expecting ',' "
            f"delimiter: {where}); the checkpoint is damaged; fix: point {ck(name) / 'latest'} "
            f"at an earlier tag, or {fresh}"), name
    name = "edited-trainer-state"
    assert _refused(resumes, name) == (
        f"{DS}: {ck(name) / tag / 'trainer_state.json'}: field 'samples_in_pass': got '32'; "
        "allowed: an integer >= 0; the checkpoint is damaged or was edited; fix: point "
        f"{ck(name) / 'latest'} at an earlier tag, or {fresh}")
    # DeepSpeed itself fails here with a bare AssertionError from its checkpoint file list.
    name = "zero1-under-zero3"
    assert _refused(resumes, name) == (
        f"{DS}: checkpoint {ck(name) / tag} was written under ZeRO stage 1, this job runs stage "
        "3; DeepSpeed cannot load one stage's files into the other's; fix: resume with "
        f"zero_optimization.stage 1 in the config, or {fresh}")
    name = "elastic-zero3"
    assert _refused(resumes, name) == (
        f"{DS}: the checkpoint in {ck(name)} was written by 2 ranks, this job has 1; a resume on "
        "another world size needs ZeRO stage 0-2 and --budget-fraction 1 (see "
        "docs/RELIABILITY.md); resume on the original world size")


def test_unchanged_resume_trains_the_uninterrupted_runs_ids(resumes):
    root = resumes["root"]
    r = resumes["results"]["unchanged"]
    assert r["code"] == 0 and r["error"] is None, r["stderr"][-3000:]
    before = _log(root / "unchanged" / "ids.base.jsonl")
    after = _log(root / "unchanged" / "ids.rank0.jsonl")
    reference = _log(root / "reference" / "ids.rank0.jsonl")
    assert trained(before) + trained(after) == trained(reference)
    assert selections(before) == selections(reference)


def test_the_canonical_node_count_is_recorded_and_kept_on_resume(resumes):
    root, tag = resumes["root"], resumes["tag"]
    base = json.loads((root / "ds-base" / "checkpoints" / tag / "trainer_state.json").read_text())
    assert base["canonical_nodes"] == 1
    r = resumes["results"]["canonical-nodes-kept"]
    assert r["code"] == 0 and r["error"] is None, r["stderr"][-3000:]
    final = root / "canonical-nodes-kept" / "checkpoints" / "final" / "trainer_state.json"
    assert json.loads(final.read_text())["canonical_nodes"] == 2
    # The data really is read in the 2-node order: the rest of pass 1 differs from the same
    # resume with 1 canonical node (test_unchanged_resume_..., which equals the reference).
    kept = _log(root / "canonical-nodes-kept" / "ids.rank0.jsonl")
    same = _log(root / "unchanged" / "ids.rank0.jsonl")
    assert [t[:2] for t in trained(kept)] == [t[:2] for t in trained(same)]
    assert trained(kept) != trained(same)


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_disk_full_during_a_save_says_so_keeps_latest_and_resumes(resumes):
    from entry_driver import one_line
    if not resumes["mounted"]:
        pytest.skip("no mount namespace for a small tmpfs here; "
                    "test_disk_full_during_commit_keeps_latest covers the message")
    results, tag, root = resumes["results"], resumes["tag"], resumes["root"]
    for job in (DS, FSDP):
        r, ckpt = results[f"{job}-disk-full"], resumes["full"][job] / "run" / "checkpoints"
        line = one_line(r, job)
        assert line.startswith(f"{job}: the disk is full: saving checkpoint step22 into "
                               f"{ckpt / 'step22'} failed ("), line
        assert line.endswith(f"bytes free there); 'latest' still names {tag}, from which the same "
                             "command resumes; fix: free space, or use an --out on a larger disk "
                             f"(the incomplete {ckpt / 'step22'} can be deleted), then run the "
                             "same command again"), line
        # Only the failed save's own files and the id log (steps 20 and 21) changed: `latest`
        # still names step 20, whose files are intact.
        assert r["changed"] and all(f.startswith("checkpoints/step22/") or f == "ids.rank0.jsonl"
                                    for f in r["changed"]), r["changed"]
    # Space freed, the same command resumes from the last complete checkpoint and finishes:
    # together with the run before it, exactly the uninterrupted run's ids, step by step.
    freed = results["disk-freed"]
    assert freed["code"] == 0 and freed["error"] is None, freed["stderr"][-3000:]
    assert f"resumed at step {STOP}, pass 1" in freed["stdout"]
    full = root / "full-ds-kept"
    before, after = _log(full / "ids.base.jsonl"), _log(full / "run" / "ids.rank0.jsonl")
    reference = _log(root / "reference" / "ids.rank0.jsonl")
    assert trained(before) + trained(after) == trained(reference)
    assert selections(before) == selections(reference) and not selections(after)
    assert_scores_are_their_ids_own(full / "run" / "checkpoints" / "final",
                                    resumes["expected"])


def test_disk_full_during_commit_keeps_latest(tmp_path, monkeypatch):
    """No process, no tmpfs: the writer itself fails with ENOSPC while a checkpoint is saved."""
    import errno

    from attent_scale import checkpoint
    from attent_scale.checkpoint import CheckpointError, commit, saving

    class Comm:
        rank, world = 0, 1

        def barrier(self):
            pass

    class Teaching:
        comm = Comm()

        def save(self, directory):
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "attent_state.json").write_text("{}")

    save_dir = tmp_path / "checkpoints"
    with saving(save_dir, "step1"):
        commit(Teaching(), save_dir, "step1", {"step": 1})
    assert (save_dir / "latest").read_text() == "step1"
    write_text = Path.write_text

    def no_space(self, *args, **kwargs):
        if "step2" in str(self) or self.name == "latest.tmp":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(CheckpointError) as ei:
        with saving(save_dir, "step2"):
            commit(Teaching(), save_dir, "step2", {"step": 2})
    msg = str(ei.value)
    assert msg.startswith(f"the disk is full: saving checkpoint step2 into {save_dir / 'step2'} "
                          "failed ([Errno 28] No space left on device: ")
    assert "'latest' still names step1, from which the same command resumes" in msg
    assert "\n" not in msg
    assert (save_dir / "latest").read_text() == "step1"
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left on the full disk"

    # torch.save's short write carries no errno: a probe write tells a full disk from the rest.
    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3840 "
                              "vs 3732")
    for full, words in ((True, "the disk is full: "), (False, "a write failed: ")):
        monkeypatch.setattr(checkpoint, "_disk_full", lambda d, full=full: full)
        with pytest.raises(CheckpointError, match=words + "saving checkpoint step3"):
            with saving(save_dir, "step3"):
                raise torch_says
    with pytest.raises(CheckpointError, match=r"^--out cannot be written \(Read-only file "
                                              r"system\): saving checkpoint step4 into "):
        with saving(save_dir, "step4"):
            raise OSError(errno.EROFS, "Read-only file system", str(save_dir / "step4"))
    with pytest.raises(KeyError):  # anything else is not a disk's problem
        with saving(save_dir, "step5"):
            raise KeyError("bug")
    assert (save_dir / "latest").read_text() == "step1"
