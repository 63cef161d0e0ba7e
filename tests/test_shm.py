"""Several jobs on one node: shared memory, one job per --out, and nothing left behind.

Each test runs real jobs inside a private /dev/shm (conftest.UNSHARE), driven in a set order by
tests/shm_driver.py, so what the jobs leave there can be counted exactly and other jobs on this
machine neither disturb the test nor are disturbed by it. docs/RELIABILITY.md lists the cases.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from attent_scale.startup import HARMLESS, machine_has_no_gpu
from conftest import (HANG_TIMEOUT, PRIVATE_SHM, ROOT, UNSHARE, assert_agree_and_exactly_once,
                      free_port, job_command, job_env, private_shm_or_skip, read_ids,
                      write_config)

ATTENT = {"preset": "attent-simple"}


def drive(scenario: str, spec: dict, tmp_path: Path) -> dict:
    """Run a scenario of tests/shm_driver.py in a private /dev/shm; return its result.

    The jobs also get a temporary directory of their own, where streaming keeps its file locks
    (each one makes the prefix scan skip its prefix): so prefixes start at 0, as on a fresh node.
    """
    (tmp_path / "tmp").mkdir()
    for job in spec.get("jobs", []) + [v for v in spec.values() if isinstance(v, dict)]:
        job["env"]["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    driver = [sys.executable, str(ROOT / "tests" / "shm_driver.py"), scenario,
              str(tmp_path / "spec.json"), str(tmp_path / "result.json")]
    proc = subprocess.run([*UNSHARE, "sh", "-c", f"{PRIVATE_SHM} && exec {shlex.join(driver)}"],
                          capture_output=True, text=True, timeout=3 * HANG_TIMEOUT)
    logs = "\n".join(f"--- {p.name} ---\n{p.read_text()[-3000:]}"
                     for p in sorted(tmp_path.glob("*.log")))
    assert proc.returncode == 0, f"driver failed: {proc.stderr[-3000:]}\n{logs}"
    return {**json.loads((tmp_path / "result.json").read_text()), "logs": logs}


def job(tmp_path: Path, name: str, cfg: Path, corpus: Path, out: Path, launcher="torchrun",
        epochs: int = 2, nproc: int = 2) -> dict:
    cmd, env = job_command(cfg, corpus, out, nproc=nproc, launcher=launcher,
                           extra=["--epochs", str(epochs), "--no-plot"])
    return {"cmd": cmd, "env": env, "cwd": str(ROOT), "log": str(tmp_path / f"{name}.log")}


def test_two_jobs_on_one_node_keep_their_shared_memory(tiny_corpus, tmp_path):
    """A (DeepSpeed launcher) and B (torchrun) read the same --data into different --out. B starts,
    cleans and registers its streaming memory while A runs; both then train at the same time. Both
    finish, every selected id is trained exactly once in each, no segment of A was lost, and
    /dev/shm is empty afterwards: no streaming segments, no DeepSpeed allreduce buffers, no
    locks. On a machine without GPU, B's ranks print none of the silenced start-up warnings."""
    private_shm_or_skip()
    cfg = write_config(tmp_path / "ds.json", stage=2, attent=ATTENT)
    res = drive("overlap", {
        "a": job(tmp_path, "a", cfg, tiny_corpus, tmp_path / "a", launcher="deepspeed"),
        "b": job(tmp_path, "b", cfg, tiny_corpus, tmp_path / "b"),
    }, tmp_path)
    assert res["rc"] == [0, 0], res["logs"]
    # Both jobs' datasets (train and val) held their own prefixes while both ran.
    assert sum(n.endswith("_locals") for n in res["during"]) == 4, res["during"]
    for out in ("a", "b"):
        assert assert_agree_and_exactly_once(read_ids(tmp_path / out, 2), 2) == [0, 1]
    # A segment unlinked under a live job shows when that job exits: Python's resource tracker
    # then reports it as leaked.
    assert "leaked shared_memory" not in res["logs"] and "Traceback" not in res["logs"], \
        res["logs"]
    assert res["after"] == [], res["after"]
    if machine_has_no_gpu():  # B's log is its ranks' alone (torchrun does not import DeepSpeed)
        b_log = (tmp_path / "b.log").read_text()
        for _, start, _, _ in HARMLESS:
            assert start not in b_log, f"not silenced: {start}"
        assert "all_gather_into_tensor` is deprecated" not in b_log


def test_registration_race_between_two_jobs(tiny_corpus, tmp_path):
    """Two 2-rank worlds open a streaming dataset 12 times each, at the same moments. Without the
    node's registration lock both leaders pick one prefix: FileExistsError on '<prefix>_locals',
    or a rank finds the other job's prefix."""
    private_shm_or_skip()
    jobs = []
    for name in ("w0", "w1"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(ROOT / "tests" / "shm_driver.py"),
               "register", str(tiny_corpus), "12"]
        jobs.append({"cmd": cmd, "env": job_env(), "cwd": str(ROOT),
                     "log": str(tmp_path / f"{name}.log")})
    res = drive("race", {"jobs": jobs}, tmp_path)
    assert res["rc"] == [0, 0], res["logs"]
    assert res["logs"].count("12 datasets opened") == 4, res["logs"]
    assert res["after"] == [], res["after"]


def test_one_job_per_out_dir_and_a_killed_jobs_leftovers(tiny_corpus, tmp_path):
    """While A trains into --out, a second job there is refused with one line naming A (torchrun:
    non-zero exit; one process: exit code 2) and writes nothing. A is then killed with SIGKILL:
    its lock record and shared memory stay behind. C on the same --out takes the lock over with a
    note, removes A's segments, trains, and leaves /dev/shm empty."""
    private_shm_or_skip()
    cfg = write_config(tmp_path / "ds.json", stage=1, attent=ATTENT)
    out = tmp_path / "out"
    res = drive("same_out", {
        "out": str(out),
        "a": job(tmp_path, "a", cfg, tiny_corpus, out, epochs=3),
        "b": job(tmp_path, "b", cfg, tiny_corpus, out),
        "b1": job(tmp_path, "b1", cfg, tiny_corpus, out, launcher="python", nproc=1),
        "c": job(tmp_path, "c", cfg, tiny_corpus, out, epochs=2),
    }, tmp_path)
    logs = {n: (tmp_path / f"{n}.log").read_text() for n in ("a", "b", "b1", "c")}
    rc_a, rc_b, rc_b1, rc_c = res["rc"]
    assert rc_a == -9, logs["a"][-3000:]
    refusal = (f"attent-pretrain: {out} is in use by another job: {out / 'job.lock'} is held by "
               f"pid {res['holder']['pid']} on host {res['holder']['host']} since "
               f"{res['holder']['since']} (")
    for name, rc in (("b", rc_b), ("b1", rc_b1)):
        lines = [line for line in logs[name].splitlines() if "in use by another job" in line]
        assert rc != 0 and len(lines) == 1, logs[name][-3000:]
        assert lines[0].startswith(refusal) and "attent_scale.pretrain" in lines[0] and \
            lines[0].endswith("; use another --out, or wait for that job to end"), lines[0]
    assert rc_b1 == 2, logs["b1"][-3000:]
    # A was paused meanwhile: any change in --out came from the refused jobs.
    assert res["out_after_refusals"] == res["out_before_refusals"]
    # What SIGKILL left: A's lock record and its streaming segments (two datasets).
    assert sum(n.endswith("_locals") for n in res["killed"]) == 2, res["killed"]
    assert rc_c == 0, logs["c"][-3000:]
    assert "note: took over" in logs["c"] and "which ended without releasing it" in logs["c"], \
        logs["c"][-3000:]
    assert logs["c"].count("shared-memory segments of prefix") == 2, logs["c"][-3000:]
    assert res["after"] == [], res["after"]
    assert not (out / "job.lock").exists()
