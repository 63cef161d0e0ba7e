"""launchers/deepspeed/multinode.sh: a 2-node world on one machine, one DeepSpeed launcher per node.

Each "node" is a separate launcher invocation with its own node rank, both pointing at the same
master address and port, started without ssh (--no_ssh). Real nodes have their own /dev/shm and
temporary directory, where streaming keeps its per-node shared memory and locks; here each node
gets a private /dev/shm in a mount namespace and its own TMPDIR, or the two nodes' streaming
leaders would claim the same segments. Each node also has its own --data cache of the corpus.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, assert_agree_and_exactly_once, free_port, read_ids, write_config

# Run as root, or as a user mapped to root in a new user namespace.
UNSHARE = ["unshare", "--mount", "--propagation", "private"] + \
    ([] if os.geteuid() == 0 else ["--map-root-user"])
PRIVATE_SHM = "mount -t tmpfs -o size=512m tmpfs /dev/shm"


def private_shm_or_skip() -> None:
    try:
        probe = subprocess.run([*UNSHARE, "sh", "-c", PRIVATE_SHM], capture_output=True,
                               text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("unshare (util-linux) is missing: each simulated node needs its own /dev/shm")
    if probe.returncode != 0:
        pytest.skip("cannot give each simulated node its own /dev/shm in a mount namespace "
                    f"({probe.stderr.strip()}); run as root or enable user namespaces")


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
               # By path, not by putting the environment's bin first on PATH: the ranks would then
               # find another ninja than the other tests' jobs, and each ninja takes the other's
               # build of DeepSpeed's shared-memory op for stale and compiles it again.
               "DEEPSPEED": os.path.join(os.path.dirname(sys.executable), "deepspeed")}
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            env.pop(var, None)
        shell = f"{PRIVATE_SHM} && exec bash {shlex.quote(str(script))} {shlex.join(args)}"
        logs.append(node_dir / "launcher.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([*UNSHARE, "sh", "-c", shell], cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        codes = [p.wait(timeout=300) for p in procs]
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
