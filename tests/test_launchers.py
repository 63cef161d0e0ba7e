"""The launcher scripts, run as their users run them.

- launchers/deepspeed/pretrain.sh from a fresh checkout, with the README's own command line and the
  environment in .venv (what `make setup` makes) not on PATH.
- launchers/deepspeed/multinode.sh: a 2-node world on one machine, one DeepSpeed launcher per
  node. Each "node" is a separate launcher invocation with its own node rank, both pointing at the
  same master address and port, started without ssh (--no_ssh). Real nodes have their own
  /dev/shm and temporary directory, where streaming keeps its per-node shared memory and locks;
  here each node gets a private /dev/shm in a mount namespace and its own TMPDIR, or the two
  nodes' streaming leaders would claim the same segments. Each node also has its own --data cache
  of the corpus.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import (HANG_TIMEOUT, PRIVATE_SHM, ROOT, UNSHARE, assert_agree_and_exactly_once,
                      free_port, job_env, private_shm_or_skip, read_ids, write_config)

README_LINE = ("NUM_GPUS=2 CONFIG=configs/zero2.json launchers/deepspeed/pretrain.sh "
               "--out runs/zero2")


def fresh_checkout(tmp_path):
    """The launchers and configs of this checkout, with .venv standing for `make setup`'s."""
    clone = tmp_path / "clone"
    for part in ("launchers", "configs"):
        shutil.copytree(ROOT / part, clone / part)
    (clone / ".venv").symlink_to(sys.prefix)
    return clone


def bare_env() -> dict[str, str]:
    """A shell's environment with no Python environment activated: its bin/ is not on PATH."""
    env = job_env()
    venv_bin = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and os.path.realpath(p) != os.path.realpath(venv_bin))
    for var in ("VENV", "DEEPSPEED", "VIRTUAL_ENV", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    return env


def test_readme_launcher_line_from_a_fresh_checkout(tiny_corpus, tmp_path):
    """The README's two-rank line, verbatim, finds .venv/bin/deepspeed by itself. Inside a private
    /dev/shm: the two ranks on one machine leave nothing there (no DeepSpeed allreduce buffers,
    no streaming segments)."""
    private_shm_or_skip()
    assert README_LINE in (ROOT / "README.md").read_text()
    clone = fresh_checkout(tmp_path)
    env = {**bare_env(), "MASTER_PORT": str(free_port())}  # 29500 may be another job's
    extra = ["--data", str(tiny_corpus), "--model", "tiny", "--epochs", "2", "--eval-samples",
             "32", "--eval-every", "0", "--log-ids", "--no-plot"]
    script = f"{PRIVATE_SHM} && {README_LINE} {shlex.join(extra)}; echo rc=$?; ls -A /dev/shm"
    proc = subprocess.run([*UNSHARE, "bash", "-c", script], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    text = proc.stdout + proc.stderr
    assert "rc=0\n" in proc.stdout, text[-6000:]
    assert "nnodes=1, num_local_procs=2, node_rank=0" in text, text[-3000:]
    assert proc.stdout.split("rc=0\n", 1)[1].split() == [], "left in /dev/shm"
    ids = read_ids(clone / "runs" / "zero2", 2)
    assert assert_agree_and_exactly_once(ids, 2) == [0, 1]


def test_launcher_without_an_environment_says_what_to_do(tmp_path):
    if shutil.which("deepspeed", path="/usr/bin:/bin"):
        pytest.skip("a system-wide deepspeed is on the bare PATH")
    env = {**bare_env(), "PATH": "/usr/bin:/bin", "VENV": str(tmp_path / "no-venv")}
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "deepspeed" / "pretrain.sh"),
                           "--out", str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"pretrain.sh: 'deepspeed' not found, neither in {tmp_path / 'no-venv'}/bin nor on PATH; "
        f"run 'make setup' in {ROOT}, or set VENV to the environment where attent-scale is "
        "installed")
    assert not (tmp_path / "run").exists()


def test_two_nodes_without_ssh_agree_and_partition_ids(tiny_corpus, tmp_path):
    private_shm_or_skip()
    cfg = write_config(tmp_path / "ds.json", stage=2, attent={"preset": "attent-simple"})
    hostfile = tmp_path / "hostfile"
    # Host names are labels here: without ssh nobody connects to them; MASTER_ADDR is explicit.
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out = tmp_path / "out"  # shared by both nodes, as a shared file system would be
    port = str(free_port())
    script = ROOT / "launchers" / "deepspeed" / "multinode.sh"
    procs, logs = [], []
    for node in (0, 1):
        node_dir = tmp_path / f"node{node}"
        (node_dir / "tmp").mkdir(parents=True)
        args = ["--data", str(node_dir / "cache"), "--remote", str(tiny_corpus),
                "--out", str(out), "--model", "tiny", "--epochs", "2", "--eval-samples", "32",
                "--eval-every", "0", "--log-ids", "--no-plot"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
               "HOSTFILE": str(hostfile), "CONFIG": str(cfg), "NODE_RANK": str(node),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "TMPDIR": str(node_dir / "tmp"),
               "VENV": sys.prefix}  # where multinode.sh finds the deepspeed launcher
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            env.pop(var, None)
        shell = f"{PRIVATE_SHM} && exec bash {shlex.quote(str(script))} {shlex.join(args)}"
        logs.append(node_dir / "launcher.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([*UNSHARE, "sh", "-c", shell], cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        codes = [p.wait(timeout=HANG_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)  # its own session: the launcher and its rank
                p.wait()
    tails = "\n".join(f"--- node {n} ---\n{path.read_text()[-3000:]}" for n, path in
                      enumerate(logs))
    assert codes == [0, 0], f"launchers exited with {codes}\n{tails}"
    text = logs[0].read_text()
    # DeepSpeed's launcher reports the world it built from the hostfile and the node rank.
    assert "nnodes=2, num_local_procs=1, node_rank=0" in text, tails
    assert "nnodes=2, num_local_procs=1, node_rank=1" in logs[1].read_text(), tails
    assert "final validation loss" in text, tails
    ids = read_ids(out, 2)
    assert assert_agree_and_exactly_once(ids, 2) == [0, 1]
    assert ids[0]["passes"][1][1] < ids[0]["passes"][0][1], "the teacher skipped nothing"
    for node in (0, 1):  # each node filled its own cache from the remote
        assert list((tmp_path / f"node{node}" / "cache" / "train").glob("shard.*.mds"))
