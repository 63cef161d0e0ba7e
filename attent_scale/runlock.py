"""One job per output directory: ``OUT/job.lock``, taken at start and released at the end.

Two jobs writing one ``--out`` would interleave their metrics and id logs, and one would resume
from a checkpoint the other is still writing. Rank 0 of each job takes the lock before anything
is trained or written there. A second job stops with one line naming the holder (host, pid, start
time, command) and the fix, and exit code 2.

The lock is a POSIX record lock (``fcntl.lockf``) on the file, held for the job's lifetime, and
the file holds a JSON record of its holder. The kernel drops the lock when the holding process
ends, however it ends (SIGKILL included), so on one host a lock never outlives its job. The record
of a killed job stays behind; the next job takes the lock over and prints a note. At a normal end,
or on an exception, the file is removed.

Why a POSIX lock rather than ``flock``: a POSIX lock belongs to the process, so DataLoader workers
forked from rank 0 do not inherit it and cannot keep it held after rank 0 has died. It is also the
lock type that NFS carries to the server (NLM for NFSv3, byte-range locks in NFSv4).

Limits on shared filesystems:
- NFSv3 needs lockd on both sides, Lustre the ``flock`` mount option (with ``localflock`` a lock
  is seen only on its own client), and some FUSE filesystems have no locks. Where the filesystem
  refuses locks (ENOLCK, EOPNOTSUPP, ENOSYS), the file is created with O_EXCL instead. Then the
  file's existence is the lock, and a leftover file is taken over only if its holder ran on this
  host and has ended.
- A holder on another host (or on this host before a reboot) cannot be checked from here. When
  its record remains but its lock is gone, because the host crashed or the filesystem keeps locks
  per client, the job refuses and says to delete the file once that job is known to be over.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = "job.lock"
# Filesystems without POSIX locks answer with one of these; then the file's existence is the lock.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLockHeld(RuntimeError):
    """Another job holds the output directory (the message says who and what to do)."""


# ---- who is running where ------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def boot_id() -> str:
    """The running kernel's id (Linux): pids are comparable only between equal boot ids."""
    return _read("/proc/sys/kernel/random/boot_id")


def pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if unknown): tells a reused pid."""
    stat = _read(f"/proc/{pid}/stat")
    # The command name (field 2) is in parentheses and may contain spaces; field 22 is starttime.
    return stat[stat.rfind(")") + 2:].split()[19] if ")" in stat else ""


def holder_record(command: Optional[list[str]] = None) -> dict:
    """This process as a lock holder: where it runs, since when, and what it runs."""
    pid = os.getpid()
    if command is None:
        command = getattr(sys, "orig_argv", sys.argv)  # with the interpreter and its -m
    return {"host": socket.gethostname(), "pid": pid,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": shlex.join(command),
            "boot_id": boot_id(), "pid_ns": pid_namespace(), "pid_start": process_start(pid)}


def same_kernel(record: dict) -> bool:
    """Whether the record was written under the kernel running now (this host, no reboot since)."""
    return bool(record.get("boot_id")) and record.get("boot_id") == boot_id() and \
        record.get("host") == socket.gethostname()


def holder_alive(record: dict) -> Optional[bool]:
    """Whether the record's process still runs; None where this process cannot tell (another
    host, a reboot since, or another pid namespace)."""
    if not same_kernel(record) or record.get("pid_ns") != pid_namespace():
        return None
    pid = int(record.get("pid", 0))
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    # A pid reused by a later process is not the holder.
    return process_start(pid) == record.get("pid_start") or not record.get("pid_start")


def describe(record: dict, command: bool = True) -> str:
    if not record:
        return "another job (its record is not written yet)"
    who = f"pid {record.get('pid')} on host {record.get('host')} since {record.get('since')}"
    return f"{who} ({record.get('command')})" if command else who


# ---- the lock -----------------------------------------------------------------------------------

class RunLock:
    """The held lock of one output directory. ``note`` says whether a stale one was taken over."""

    def __init__(self, path: Path, fd: int, note: Optional[str]):
        self.path, self._fd, self.note = path, fd, note
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the file and drop the lock (idempotent; also runs at exit)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Removed while still locked, and only if the path is still this file: a job that
            # opened it meanwhile finds it gone after locking and starts again with a new one.
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _load(data: bytes) -> dict:
    try:
        record = json.loads(data.decode() or "{}")
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


def _held(path: Path, record: dict) -> RunLockHeld:
    return RunLockHeld(f"{path.parent} is in use by another job: {path} is held by "
                       f"{describe(record)}; use another --out, or wait for that job to end")


def _unverifiable(path: Path, record: dict, why: str) -> RunLockHeld:
    return RunLockHeld(f"{path.parent} may be in use by another job: {path} names "
                       f"{describe(record)}, {why}; if that job is no longer running, delete "
                       f"{path}")


def acquire(out: Path, command: Optional[list[str]] = None) -> RunLock:
    """Take ``out/job.lock`` for this process, or raise :class:`RunLockHeld`."""
    path = Path(out) / LOCK_NAME
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            record = _load(os.pread(fd, 1 << 16, 0))
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise _held(path, record) from None
            if exc.errno in _NO_LOCKS:
                return _acquire_exclusive(path, command)
            raise
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError  # the holder removed it between our open and our lock
        except FileNotFoundError:
            os.close(fd)
            continue
        previous = _load(os.pread(fd, 1 << 16, 0))
        note = None
        if previous:
            # The kernel that ran the previous holder says its lock is free: it has ended. A
            # holder under another kernel may still run, on a filesystem that keeps locks per host.
            if not same_kernel(previous):
                os.close(fd)
                raise _unverifiable(path, previous, "which this host cannot check (another "
                                    "host, or this one before a reboot)")
            note = (f"took over {path} from {describe(previous)}, which ended without "
                    "releasing it")
        data = json.dumps(holder_record(command)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return RunLock(path, fd, note)
    raise RunLockHeld(f"could not take {path}: other jobs keep replacing it")


def _acquire_exclusive(path: Path, command: Optional[list[str]]) -> RunLock:
    """No POSIX locks on this filesystem: the file's existence is the lock (O_EXCL)."""
    note = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            record = _load(Path(path).read_bytes())
            alive = holder_alive(record)
            if alive:
                raise _held(path, record) from None
            if alive is None:
                raise _unverifiable(path, record, "and this filesystem has no file locks to "
                                    "tell whether it still runs") from None
            note = f"took over {path} from {describe(record)}, which has ended"
            path.unlink(missing_ok=True)
            continue
        os.write(fd, json.dumps(holder_record(command)).encode())
        os.fsync(fd)
        return RunLock(path, fd, note)
    raise RunLockHeld(f"could not take {path}: another job took it at the same time")


def lock_output_dir(out: Path, comm, job: str) -> Optional[RunLock]:
    """Collective: rank 0 takes ``out``'s lock and every rank learns the outcome.

    On refusal rank 0 prints one line and every rank exits with code 2, before anything is
    trained or written in ``out``. Returns the lock on rank 0 (None elsewhere); it is released
    at exit.
    """
    lock, error = None, None
    if comm.rank == 0:
        try:
            lock = acquire(out)
        except RunLockHeld as exc:
            error = str(exc)
        except OSError as exc:
            error = (f"cannot lock {Path(out) / LOCK_NAME} ({exc.strerror}); fix: choose an "
                     "--out this user can write")
    if comm.max_int(int(error is not None)):
        if error is not None:
            print(f"{job}: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    if lock is not None and lock.note:
        print(f"{job}: note: {lock.note}", flush=True)
    return lock
