"""Runs real jobs in a set order inside a private /dev/shm, and lists what they leave there.

    python tests/shm_driver.py SCENARIO SPEC.json RESULT.json     (inside conftest.UNSHARE)
    python tests/shm_driver.py register CORPUS ROUNDS            (a rank, under torchrun)

tests/test_shm.py writes SPEC.json (each job's command, environment and log file) and reads
RESULT.json (exit codes, /dev/shm listings). Jobs are signalled with all their processes, found
through psutil: torchrun starts its ranks in sessions of their own.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

HANG_TIMEOUT = 900
STARTED = "model tiny:"  # printed once the job has opened its data, model and engine


def start(job: dict) -> subprocess.Popen:
    log = open(job["log"], "w")
    return subprocess.Popen(job["cmd"], env=job["env"], cwd=job["cwd"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def run(job: dict) -> int:
    proc = start(job)
    return proc.wait(timeout=HANG_TIMEOUT)


def signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the job's launcher and every process under it (ranks, their helpers)."""
    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for(job: dict, proc: subprocess.Popen, text: str) -> None:
    deadline = time.monotonic() + HANG_TIMEOUT
    while text not in Path(job["log"]).read_text():
        if proc.poll() is not None:
            raise SystemExit(f"{job['log']}: the job ended ({proc.returncode}) before {text!r}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{job['log']}: no {text!r} after {HANG_TIMEOUT} s")
        time.sleep(0.2)


def shm() -> list[str]:
    return sorted(os.listdir("/dev/shm"))


def overlap(spec: dict) -> dict:
    """B starts, cleans and registers its shared memory while A is running (A is paused meanwhile,
    which fixes the order and leaves B the CPU); then both train to the end at the same time."""
    a = start(spec["a"])
    wait_for(spec["a"], a, STARTED)
    signal_tree(a, signal.SIGSTOP)
    b = start(spec["b"])
    try:
        wait_for(spec["b"], b, STARTED)
        during = shm()
    finally:
        signal_tree(a, signal.SIGCONT)
    return {"rc": [a.wait(timeout=HANG_TIMEOUT), b.wait(timeout=HANG_TIMEOUT)],
            "during": during, "after": shm()}


def same_out(spec: dict) -> dict:
    """While A holds --out, B (torchrun) and B1 (one process) try the same --out. Then A is
    killed (SIGKILL, every process) and C, on the same --out, takes over what A left."""
    out = Path(spec["out"])
    a = start(spec["a"])
    wait_for(spec["a"], a, STARTED)
    signal_tree(a, signal.SIGSTOP)  # holds its lock; leaves the CPU to B and B1
    try:
        holder = json.loads((out / "job.lock").read_text())
        before = files(out)
        rc_b, rc_b1 = run(spec["b"]), run(spec["b1"])
        after = files(out)
    finally:
        signal_tree(a, signal.SIGKILL)
    a.wait(timeout=HANG_TIMEOUT)
    killed = shm()
    return {"rc": [a.returncode, rc_b, rc_b1, run(spec["c"])], "holder": holder,
            "out_before_refusals": before, "out_after_refusals": after, "killed": killed,
            "after": shm()}


def files(root: Path) -> dict[str, list]:
    """Every file under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(root.rglob("*")) if p.is_file()}


def register(corpus: str, rounds: int) -> None:
    """One rank: open a dataset ``rounds`` times, each inside a shared-memory session."""
    import torch.distributed as dist

    from attent_scale.comm import make_comm
    from attent_scale.streaming_data import SubsetStreamingDataset, shared_memory_session
    dist.init_process_group("gloo")
    comm = make_comm()
    for _ in range(rounds):
        with shared_memory_session(comm) as track:
            track(SubsetStreamingDataset(local=str(Path(corpus) / "train"), batch_size=8))
    comm.barrier()
    print(f"rank {comm.rank}: {rounds} datasets opened", flush=True)


def race(spec: dict) -> dict:
    """Two worlds of two ranks register datasets at the same moments, round after round."""
    procs = [start(job) for job in spec["jobs"]]
    return {"rc": [p.wait(timeout=HANG_TIMEOUT) for p in procs], "after": shm()}


if __name__ == "__main__":
    if sys.argv[1] == "register":
        register(sys.argv[2], int(sys.argv[3]))
        from attent_scale.comm import shutdown
        shutdown()  # once register's objects are gone: see attent_scale.comm.shutdown
    else:
        spec = json.loads(Path(sys.argv[2]).read_text())
        result = {"overlap": overlap, "same_out": same_out, "race": race}[sys.argv[1]](spec)
        Path(sys.argv[3]).write_text(json.dumps(result))
