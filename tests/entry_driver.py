"""Runs the pretraining jobs' ``main(argv)`` for many cases in one process (a test tool).

A job that fails at start spends nearly all its time importing torch, DeepSpeed, streaming and
transformers (about 9 s on an idle CPU, several times that on a loaded one). Here the imports
are paid once, and each case costs only what the job itself does. Every case gets what a fresh
process would: its own environment, its own run lock (released afterwards) and its own stdout and
stderr, captured at the file descriptors, so the progress bar and library warnings are in them
too. Its exit code is what the process would exit with: main's return value, or the code of the
SystemExit it raised. The one thing the cases share is the process group (one rank, gloo): once
DeepSpeed has built an engine it keeps references to the group it ran in, so the jobs' own
shutdown is skipped and the first case's group serves them all.

    python tests/entry_driver.py CASES.json RESULTS.json

Tests call :func:`run_cases`, which runs this script in a subprocess, in a private mount namespace
with small tmpfs mounts when a case needs a full or read-only disk.

CASES.json is a list of cases, run in order:

    {"name": str, "module": "attent_scale.pretrain" | "attent_scale.pretrain_fsdp" | null,
     "argv": [...], "env": {VAR: value, or null to unset}, "steps": [[op, arg...], ...],
     "watch": DIR}

``steps`` prepare the case, on absolute paths: ["copy", SRC, DST] (a run directory, without its
job.lock), ["move", SRC, DST], ["truncate", FILE] (to half its size), ["delete", FILE],
["write", FILE, TEXT], ["edit_json", FILE, {key: value}], ["fill", DIR, BYTES] (fill DIR's
filesystem until BYTES are free). A case without a module only runs its steps.

RESULTS.json maps each name to {"code", "stdout", "stderr", "changed", "error"}: ``changed`` lists
the files under ``watch`` created, removed or rewritten by the case (job.lock aside), ``error``
the traceback of an exception main let out (a bug: the process would have printed it).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
LOCK_NAME = "job.lock"  # attent_scale.runlock.LOCK_NAME; this module imports nothing heavy


# ---- the test's side ----------------------------------------------------------------------------

def can_mount() -> bool:
    """Whether a private mount namespace with tmpfs mounts can be made here (root, or user
    namespaces)."""
    from conftest import PRIVATE_SHM, UNSHARE
    try:
        probe = subprocess.run([*UNSHARE, "sh", "-c", PRIVATE_SHM], capture_output=True,
                               timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def run_cases(cases: list[dict], workdir: Path, mounts: Optional[dict] = None) -> dict:
    """Run the cases in one driver process; returns RESULTS (see the module doc).

    ``mounts``: {directory: tmpfs options}, made in a private mount namespace (with a private
    /dev/shm too) before the driver starts; :func:`can_mount` says whether that is possible.
    """
    from conftest import HANG_TIMEOUT, PRIVATE_SHM, UNSHARE, job_env
    cases_file, results_file = workdir / "cases.json", workdir / "results.json"
    cases_file.write_text(json.dumps(cases))
    cmd = [sys.executable, str(Path(__file__).resolve()), str(cases_file), str(results_file)]
    if mounts:
        script = " && ".join([PRIVATE_SHM] + [
            f"mount -t tmpfs -o {shlex.quote(opts)} tmpfs {shlex.quote(str(d))}"
            for d, opts in mounts.items()] + ["exec " + shlex.join(cmd)])
        for d in mounts:
            Path(d).mkdir(parents=True, exist_ok=True)
        cmd = [*UNSHARE, "sh", "-c", script]
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True,
                          timeout=HANG_TIMEOUT)
    if proc.returncode != 0 or not results_file.exists():
        raise AssertionError(f"the driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return json.loads(results_file.read_text())


def one_line(result: dict, job: str, code: int = 1) -> str:
    """The single message line a failed case printed (asserting there is exactly one, the exit
    code, and no traceback)."""
    assert result["error"] is None, f"main let an exception out:\n{result['error']}"
    lines = [ln for ln in result["stderr"].splitlines() if ln.startswith(f"{job}: ")]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert len(lines) == 1, f"want one line from {job}, got {lines}:\n{result['stderr'][-3000:]}"
    assert result["code"] == code, (result["code"], lines[0])
    return lines[0]


# ---- the driver's side --------------------------------------------------------------------------

def share_process_group() -> None:
    """One process group for every case (see the module doc)."""
    import torch.distributed as dist

    from attent_scale import comm
    init = dist.init_process_group

    def init_once(*args, **kwargs):
        if not dist.is_initialized():
            init(*args, **kwargs)

    dist.init_process_group = init_once  # the FSDP2 job calls it unconditionally
    comm.shutdown = lambda: None  # the jobs import it at call time


def track_locks() -> list:
    """Collect every run lock the jobs take, so each case can release its own."""
    from attent_scale import runlock
    locks, acquire = [], runlock.acquire

    def tracked(*args, **kwargs):
        lock = acquire(*args, **kwargs)
        locks.append(lock)
        return lock

    runlock.acquire = tracked  # lock_output_dir looks it up at call time
    return locks


def snapshot(root: Path) -> dict[str, str]:
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def fill(directory: Path, left: int) -> None:
    """Leave ``left`` bytes free on ``directory``'s filesystem (a tmpfs of the test's)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (1 << 16, 1 << 12):  # unbuffered: a close cannot fail on a full disk
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - left))


def prepare(steps: list) -> None:
    for op, *args in steps:
        paths = args[:2] if op in ("copy", "move") else args[:1]
        if not all(os.path.isabs(a) for a in paths):
            raise ValueError(f"step {op} {paths}: paths must be absolute (the driver's cwd is "
                             "the checkout)")
        if op == "copy":
            shutil.copytree(args[0], args[1], ignore=shutil.ignore_patterns(LOCK_NAME))
        elif op == "move":
            os.replace(args[0], args[1])
        elif op == "truncate":
            os.truncate(args[0], os.path.getsize(args[0]) // 2)
        elif op == "delete":
            os.remove(args[0])
        elif op == "write":
            Path(args[0]).write_text(args[1])
        elif op == "edit_json":
            path = Path(args[0])
            path.write_text(json.dumps({**json.loads(path.read_text()), **args[1]}))
        elif op == "fill":
            fill(Path(args[0]), int(args[1]))
        else:
            raise ValueError(f"unknown step {op!r}")


def run_case(case: dict, locks: list) -> dict:
    if case.get("module") is None:  # steps only: e.g. copying out of a tmpfs that ends with us
        prepare(case.get("steps", []))
        return {"code": None, "error": None}
    module = importlib.import_module(case["module"])
    saved_env = dict(os.environ)
    for key, value in (case.get("env") or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    watch = Path(case["watch"]) if case.get("watch") else None
    result = {"code": None, "error": None}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        prepare(case.get("steps", []))
        before = snapshot(watch) if watch else {}
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            result["code"] = module.main(case["argv"])
        except SystemExit as exc:
            # What the interpreter does with it: a message is printed and exits 1.
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
                result["code"] = 1
            else:
                result["code"] = 0 if exc.code is None else exc.code
        except BaseException:  # noqa: BLE001 - recorded: the test asserts there is none
            result["error"] = traceback.format_exc()
            result["code"] = 1
        finally:
            # A process's progress bars end with it; left open, they would redraw in later cases.
            from tqdm import tqdm
            for bar in list(getattr(tqdm, "_instances", ())):
                bar.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        for name, f in (("stdout", out), ("stderr", err)):
            f.seek(0)
            result[name] = f.read().decode(errors="replace")
    while locks:
        locks.pop().release()
    os.environ.clear()
    os.environ.update(saved_env)
    if watch:
        after = snapshot(watch)
        result["changed"] = sorted(k for k in set(before) | set(after)
                                   if before.get(k) != after.get(k))
    return result


def main() -> int:
    sys.path.insert(0, str(ROOT))
    share_process_group()
    locks = track_locks()
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = {}
    for case in cases:
        results[case["name"]] = run_case(case, locks)
        # Written after every case: a hang or crash still leaves what ran before it.
        Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
