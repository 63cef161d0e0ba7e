"""Checkpoint bookkeeping shared by the DeepSpeed and FSDP2 adapters.

Each framework writes its own model and optimizer files into ``save_dir/tag``; what is common is
what comes after: the teacher's state and the trainer state (plain JSON and NPZ, never pickles),
then the ``latest`` pointer, which moves only once every file of the new checkpoint exists. A job
killed at any point of a save therefore resumes from the previous checkpoint, and so does a job
whose save fails (:func:`saving` turns a full or read-only disk into one :class:`CheckpointError`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional


LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
# How torch.save reports a short write: its C++ zip writer drops the errno.
_TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed writing", "failed writing")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or loaded (the message says what, where, how to fix)."""


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk needs every byte back
        raise


def _disk_full(directory: Path) -> Optional[bool]:
    """Whether ``directory``'s filesystem refuses a small write for lack of space (None: the
    probe failed for another reason). Asked after a write failed without an errno."""
    probe = directory / f".space-probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        return True if exc.errno in _FULL else None
    try:
        os.write(fd, b"\0" * 65536)
        os.fsync(fd)
        return False
    except OSError as exc:
        return True if exc.errno in _FULL else None
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def _free(directory: Path) -> str:
    try:
        st = os.statvfs(directory)
    except OSError:
        return "free space unknown"
    free = st.f_bavail * st.f_frsize
    return f"{free / 2**20:.1f} MiB free there" if free >= 2**20 else f"{free} bytes free there"


@contextlib.contextmanager
def saving(save_dir: Path, tag: str) -> Iterator[None]:
    """Around one save of ``save_dir/tag``: a disk that is full or not writable becomes one
    :class:`CheckpointError` saying so, which checkpoint ``latest`` still names, and what to do.
    Other failures pass unchanged."""
    try:
        yield
    # BaseException: torch.distributed.checkpoint wraps each rank's error in one.
    except BaseException as exc:  # noqa: BLE001 - classified below; the rest is re-raised
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        target = Path(save_dir) / tag
        causes = [c for e in _failures(exc) for c in _chain(e)]
        code = next((e.errno for e in causes if isinstance(e, OSError) and e.errno), None)
        short = [e for e in causes if isinstance(e, RuntimeError)
                 and any(m in str(e) for m in _TORCH_WRITE_FAILED)]
        torch_write = bool(short)
        if code in _FULL or (torch_write and _disk_full(_existing(target))):
            what, fix = "the disk is full", "free space, or use an --out on a larger disk"
        elif code in _READ_ONLY:
            what, fix = (f"--out cannot be written ({os.strerror(code)})",
                         "give --out a directory this user can write")
        elif torch_write:
            what, fix = "a write failed", "check the disk, or use another --out"
        else:
            raise
        prev = latest_tag(Path(save_dir))
        kept = (f"'latest' still names {prev}, from which the same command resumes"
                if prev and prev != tag else
                f"'latest' names {tag} itself, which this save was overwriting: it may be "
                "incomplete" if prev else "no earlier checkpoint exists")
        culprit = next((e for e in causes if isinstance(e, OSError) and e.errno), None) or \
            (short[0] if short else exc)
        first = (str(culprit).strip().splitlines() or [type(culprit).__name__])[0][:200]
        raise CheckpointError(
            f"{what}: saving checkpoint {tag} into {target} failed ({first}; "
            f"{_free(_existing(target))}); {kept}; fix: {fix} (the incomplete {target} can be "
            "deleted), then run the same command again") from exc


def _failures(exc: BaseException) -> list[BaseException]:
    """The exception itself, or each rank's one of a torch.distributed.checkpoint failure."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        return [f[0] if isinstance(f, tuple) else f for _, f in sorted(failures.items())]
    return [exc]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def commit(teaching, save_dir: Path, tag: str, state: dict,
           files: Optional[dict[str, str]] = None) -> None:
    """Collective, once the framework's files of ``save_dir/tag`` exist: the teacher's state
    (:meth:`Teaching.save`), the extra text ``files`` and the trainer state (rank 0), then
    ``latest``."""
    teaching.save(save_dir / tag)
    comm = teaching.comm
    if comm.rank == 0:
        for name, text in (files or {}).items():
            write_atomic(save_dir / tag / name, text)
        write_atomic(save_dir / tag / TRAINER_STATE, json.dumps(state, indent=1))
    comm.barrier()
    if comm.rank == 0:
        write_atomic(save_dir / LATEST, tag)
    comm.barrier()


def latest_tag(load_dir: Path) -> Optional[str]:
    """The tag ``load_dir/latest`` names, or None when there is no checkpoint."""
    latest = load_dir / LATEST
    return latest.read_text().strip() if latest.exists() else None


def read_trainer_state(load_dir: Path) -> Optional[dict[str, Any]]:
    """The trainer state of ``load_dir/latest`` (plain JSON), or None when there is no checkpoint.

    Read before anything is loaded, so a checkpoint of another dataset is refused up front.
    """
    tag = latest_tag(load_dir)
    if tag is None:
        return None
    path = load_dir / tag / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else f"not valid JSON: {exc}"
        raise CheckpointError(f"{path} (of the checkpoint {load_dir / LATEST} names) is "
                              f"unreadable ({why}); the checkpoint is damaged; fix: point "
                              f"{load_dir / LATEST} at an earlier tag, or start fresh "
                              "(--no-resume, or another --out)") from None
