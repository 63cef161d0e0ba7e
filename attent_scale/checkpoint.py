"""Checkpoint bookkeeping shared by the DeepSpeed and FSDP2 adapters.

Each framework writes its own model and optimizer files into ``save_dir/tag``; what is common is
what comes after: the teacher's state and the trainer state (plain JSON and NPZ, never pickles),
then the ``latest`` pointer, which moves only once every file of the new checkpoint exists. A job
killed at any point of a save therefore resumes from the previous checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    try:
        return json.loads((load_dir / tag / TRAINER_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"checkpoint {load_dir / tag} named by {load_dir / LATEST} is "
                           f"unreadable ({exc}); delete it and point 'latest' at an earlier tag, "
                           "or pass --no-resume") from None
