"""launchers/slurm/pretrain.sbatch on a real single-node SLURM cluster started by this test.

The fixture starts munged, slurmctld and slurmd (Debian's slurm-wlm and munge packages) as root,
with every key, socket, pid, spool, state and log file in a temporary directory, submits the
template as a 2-task CPU job, and stops the daemons it started. The test never installs anything:
.ci/run installs the packages where it can; without them the test skips and says why.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (HANG_TIMEOUT, ROOT, assert_agree_and_exactly_once, free_port, read_ids,
                      write_config)

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel")
# Daemons live in sbin, which a non-login PATH can miss.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def _slurm_or_skip() -> dict[str, str]:
    """Paths of the SLURM and munge programs; the test skips, saying why, where they are missing.

    Installing system packages is not a test's business (it would change the machine under
    every other job on it): .ci/run does it, as root, before the suite starts."""
    missing = [b for b in DAEMONS + CLIENTS if _which(b) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing); install the "
                    "slurm-wlm and munge packages as root (.ci/run does, with apt-get)")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs as the submitting user")
    return {b: _which(b) for b in DAEMONS + CLIENTS}


def _read_pid(path: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.1)
    raise FileNotFoundError(path)


def _start(d: Path, name: str, cmd: list[str], env: dict) -> int:
    """Start a daemon that forks into the background; return its pid from its pid file."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    log = d / f"{name}.log"
    try:
        if done.returncode != 0:
            raise FileNotFoundError
        return _read_pid(d / f"{name}.pid")
    except FileNotFoundError:
        pytest.fail(f"{name} did not start ({done.returncode}): {done.stderr.strip()}\n" +
                    (log.read_text()[-2000:] if log.exists() else ""))


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster (this machine, 2 CPUs); yields the environment its clients need."""
    bins = _slurm_or_skip()
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    (d / "spool").mkdir()
    (d / "state").mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    (d / "slurm.conf").write_text(f"""\
ClusterName=attenttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=30 State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    pids: list[int] = []
    try:
        # --force: munged refuses a socket under a directory not everyone can enter, and
        # pytest's temporary directories are private to their owner.
        pids.append(_start(d, "munged", [
            bins["munged"], "--force", f"--key-file={key}", f"--socket={d}/munge.sock",
            f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
            f"--seed-file={d}/munged.seed"], env))
        for daemon in ("slurmctld", "slurmd"):
            pids.append(_start(d, daemon, [bins[daemon], "-f", str(d / "slurm.conf")], env))
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run([bins["sinfo"], "-h", "-o", "%t"], env=env,
                                   capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the node never became idle (state {state!r}):\n" + "\n".join(
                (d / f"{n}.log").read_text()[-1500:] for n in DAEMONS
                if (d / f"{n}.log").exists()))
        yield {"env": env, "bins": bins, "dir": d}
    finally:
        if len(pids) == len(DAEMONS):
            try:  # no job may outlive its cluster
                subprocess.run([bins["scancel"], "--user", "root"], env=env,
                               capture_output=True, timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for pid in reversed(pids):  # slurmd, slurmctld, then munged they authenticate with
            _stop(pid)


TRAIN_ARGS = ["--model", "tiny", "--epochs", "2", "--eval-samples", "32", "--eval-every", "0",
              "--log-ids", "--no-plot"]


def submit(slurm: dict, template: str, sbatch_opts: list[str], env: dict, args: list[str],
           log: Path) -> str:
    """sbatch a template from the repository root, wait for the job, return its output."""
    env = {**slurm["env"], "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "NODE_RANK", "HOSTFILE", "PYTHON", "DEEPSPEED"):
        env.pop(var, None)  # the template must set or find these, not inherit them from us
    cmd = [slurm["bins"]["sbatch"], "--parsable", *sbatch_opts, f"--output={log}",
           f"--time={HANG_TIMEOUT // 60}",
           str(ROOT / "launchers" / "slurm" / template), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"sbatch refused the job: {done.stderr}"
    job = done.stdout.strip().split(";")[0]
    # Polled here rather than with `sbatch --wait`, whose growing poll interval adds ~20 s a job.
    deadline, state = time.monotonic() + HANG_TIMEOUT, ""
    while time.monotonic() < deadline:
        info = subprocess.run([slurm["bins"]["scontrol"], "show", "job", "-o", job], env=env,
                              capture_output=True, text=True, timeout=30).stdout
        state = re.search(r"JobState=(\S+)", info).group(1) if "JobState=" in info else "?"
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "?"):
            break
        time.sleep(0.5)
    else:
        subprocess.run([slurm["bins"]["scancel"], job], env=env, capture_output=True, timeout=30)
        pytest.fail(f"the job did not finish in {HANG_TIMEOUT} s:\n" +
                    (log.read_text()[-4000:] if log.exists() else "(no output)"))
    text = log.read_text() if log.exists() else ""
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text[-6000:]}"
    assert "final validation loss" in text, text[-3000:]
    return text


def test_sbatch_template_runs_two_tasks_that_agree(slurm, tiny_corpus, tmp_path):
    """pretrain.sbatch: srun starts one task per rank; the template maps SLURM's variables."""
    cfg = write_config(tmp_path / "ds.json", stage=1, attent={"preset": "attent-simple"})
    out = tmp_path / "run"
    text = submit(slurm, "pretrain.sbatch", ["-N", "1", "-n", "2"],
                  {"VENV": sys.prefix, "CONFIG": str(cfg)},  # the template finds its python
                  ["--data", str(tiny_corpus), "--out", str(out), *TRAIN_ARGS],
                  tmp_path / "job.out")
    assert "2 ranks on 1 nodes (2 per node)" in text, text[-3000:]
    ids = read_ids(out, 2)
    assert assert_agree_and_exactly_once(ids, 2) == [0, 1]
    assert ids[0]["passes"][1][1] < ids[0]["passes"][0][1], "the teacher skipped nothing"


def test_per_node_template_starts_deepspeed_launcher_on_the_node(slurm, tiny_corpus, tmp_path):
    """pretrain_per_node.sbatch: one srun task per node runs multinode.sh without ssh, which
    starts PROCS_PER_NODE ranks there; here one node with two CPU ranks."""
    cfg = write_config(tmp_path / "ds.json", stage=2, attent={"preset": "attent-simple"})
    out = tmp_path / "run"
    # multinode.sh finds the deepspeed launcher in VENV (see launchers/env.sh).
    text = submit(slurm, "pretrain_per_node.sbatch", ["-N", "1", "-c", "2"],
                  {"PROCS_PER_NODE": "2", "CONFIG": str(cfg), "VENV": sys.prefix},
                  ["--data", str(tiny_corpus), "--out", str(out), *TRAIN_ARGS],
                  tmp_path / "job.out")
    assert "nnodes=1, num_local_procs=2, node_rank=0" in text, text[-3000:]
    assert assert_agree_and_exactly_once(read_ids(out, 2), 2) == [0, 1]


def test_bare_srun_without_rank_variables_is_refused(tmp_path):
    """In an srun step of several tasks, a trainer without RANK must not run as a world of one."""
    cfg = write_config(tmp_path / "ds.json")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "attent_scale.pretrain", "--deepspeed_config",
                           str(cfg), "--out", str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode != 0
    assert "srun started 2 tasks but RANK is unset" in proc.stderr
    assert not (tmp_path / "run").exists()
