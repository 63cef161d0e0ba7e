"""attent_scale/runlock.py: one job per output directory, with real processes holding the lock.

Jobs take the lock through runlock.lock_output_dir; tests/test_shm.py shows it with real training
jobs (a refused second job, a killed holder taken over). Here the rules one by one, each holder a
separate Python process.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from attent_scale import runlock
from conftest import ROOT

HOLD = """
import sys, time
from pathlib import Path
from attent_scale.runlock import lock_output_dir

class WorldOfOne:  # what comm.LocalComm answers, without importing torch
    rank = 0
    def max_int(self, value):
        return value

lock_output_dir(Path(sys.argv[1]), WorldOfOne(), "holder")
print("held", flush=True)
if sys.argv[2] == "raise":
    raise RuntimeError("the job failed")
time.sleep(float(sys.argv[2]))
"""


def python(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", HOLD, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def holding(out, seconds: float = 60) -> subprocess.Popen:
    """A process that holds ``out``'s lock (returns once it does)."""
    proc = python(str(out), str(seconds))
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def test_second_job_is_refused_with_who_holds_it_and_exit_code_2(tmp_path):
    holder = holding(tmp_path)
    try:
        record = json.loads((tmp_path / "job.lock").read_text())
        second = python(str(tmp_path), "0")
        _, err = second.communicate(timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2
    assert record["pid"] == holder.pid and "lock_output_dir" in record["command"]
    assert err.strip() == (
        f"holder: {tmp_path} is in use by another job: {tmp_path / 'job.lock'} is held by pid "
        f"{holder.pid} on host {record['host']} since {record['since']} ({record['command']}); "
        "use another --out, or wait for that job to end")


def test_released_at_normal_end_and_on_failure(tmp_path):
    for how in ("0", "raise"):
        proc = python(str(tmp_path), how)
        out, err = proc.communicate(timeout=60)
        assert out.strip() == "held" and proc.returncode == (0 if how == "0" else 1), err
        assert not (tmp_path / "job.lock").exists(), how


def test_lock_of_a_killed_job_is_taken_over_with_a_note(tmp_path):
    holder = holding(tmp_path)
    holder.send_signal(signal.SIGKILL)  # no exit handler runs: the record stays
    holder.wait()
    assert json.loads((tmp_path / "job.lock").read_text())["pid"] == holder.pid
    lock = runlock.acquire(tmp_path)
    try:
        assert lock.note.startswith(f"took over {tmp_path / 'job.lock'} from pid {holder.pid} ")
        assert lock.note.endswith("which ended without releasing it")
        assert json.loads((tmp_path / "job.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / "job.lock").exists()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """DataLoader workers are forked from rank 0: a POSIX lock is not inherited, so a worker
    that outlives its rank cannot hold the directory."""
    code = ("import os, sys, time\n"
            "from attent_scale.runlock import acquire\n"
            "lock = acquire(sys.argv[1])\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    os.closerange(0, 3)  # lets the test read the parent's output to its end\n"
            "    time.sleep(60)\n"
            "    os._exit(0)\n"
            "print(os.getpid(), child, flush=True)\n"
            "os._exit(0)  # the parent dies without releasing; its child lives on\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, text=True,
                            capture_output=True, timeout=60)
    assert parent.returncode == 0, parent.stderr
    parent_pid, child_pid = parent.stdout.split()
    try:
        os.kill(int(child_pid), 0)  # still running
        lock = runlock.acquire(tmp_path)
    finally:
        os.kill(int(child_pid), signal.SIGKILL)
    assert lock.note and f"pid {parent_pid} " in lock.note
    lock.release()


def test_record_of_another_host_is_not_taken_over(tmp_path):
    """A crashed node's record on a shared filesystem: this host cannot check its pid."""
    record = {**runlock.holder_record(["attent-pretrain", "--out", "x"]), "host": "node-b",
              "boot_id": "another-kernel", "pid": 4242}
    (tmp_path / "job.lock").write_text(json.dumps(record))
    with pytest.raises(runlock.RunLockHeld) as err:
        runlock.acquire(tmp_path)
    assert str(err.value) == (
        f"{tmp_path} may be in use by another job: {tmp_path / 'job.lock'} names pid 4242 on "
        f"host node-b since {record['since']} (attent-pretrain --out x), which this host cannot "
        "check (another host, or this one before a reboot); if that job is no longer running, "
        f"delete {tmp_path / 'job.lock'}")
    (tmp_path / "job.lock").unlink()  # what the message says to do
    runlock.acquire(tmp_path).release()


def test_filesystem_without_locks_falls_back_to_exclusive_create(tmp_path, monkeypatch):
    """Where lockf fails with ENOLCK (NFSv3 without lockd), the file's existence is the lock:
    a live holder on this host is refused, an ended one is taken over."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(runlock.fcntl, "lockf", no_locks)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # What a holder on such a filesystem leaves: its record, no lock.
        record = {**runlock.holder_record(["job", "A"]), "pid": holder.pid,
                  "pid_start": runlock.process_start(holder.pid)}
        (tmp_path / "job.lock").write_text(json.dumps(record))
        with pytest.raises(runlock.RunLockHeld, match=f"is held by pid {holder.pid} "):
            runlock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    lock = runlock.acquire(tmp_path)
    assert lock.note and f"from pid {holder.pid} " in lock.note and "which has ended" in lock.note
    lock.release()
    assert not (tmp_path / "job.lock").exists()
