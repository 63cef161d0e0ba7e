"""The MosaicML streaming adapter: a StreamingDataset that yields exactly the teacher's ids.

Streaming already partitions an epoch's samples over nodes, ranks and DataLoader workers, shuffles
them deterministically from (seed, epoch) and resumes mid-epoch from a sample offset. We keep all
of that and change one input: ``resample_streams``, the seam that says which sample ids make up an
epoch, returns the teacher's selection for the current pass instead of the whole dataset.

Remainder rule: the teacher hands over a whole number of global batches (micro batch x ranks), so
streaming's partition needs no padding and every selected id is trained exactly once per pass.
:meth:`SubsetStreamingDataset.set_pass` refuses a selection that breaks this.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from streaming import StreamingDataset
from streaming.base.constant import SHM_TO_CLEAN

# ---- shared memory, with other jobs on the same node ------------------------------------------
# Streaming keeps each dataset's state in POSIX shared memory named "<prefix>_<what>", where
# prefix is six digits (streaming/base/shared/prefix.py). Each node's local leader takes the first
# prefix with no segments and no file locks (in the temporary directory). It registers the prefix
# by creating "<prefix>_locals", which lists the dataset's local directories. The other ranks look
# the prefix up in the same way. Two jobs that start at once can both pick one prefix: one of them
# fails with FileExistsError on "<prefix>_locals", or a rank reads another job's prefix. Streaming's
# clean_stale_shared_memory() unlinks every segment on the node, live jobs' included. So here:
# - a node-wide lock serialises registration (open datasets inside :func:`shared_memory_session`);
# - each registered prefix gets an owner record (the local leader's pid), removed at exit;
# - at start, only the segments of owners that have ended are removed (a killed job's). Segments
#   without a record (other programs) are left alone unless the user asks (``--shm-clean``).
# The lock and the records sit in /dev/shm next to the segments, so every job that sees the
# segments sees them too (a per-job TMPDIR would not).
NODE_LOCK = "attent-streaming.lock"
OWNER_GLOB = "attent-streaming-*.owner"
CLEAN_MODES = ("ended", "all", "none")
_LOCK_ATTEMPTS = 3000  # about 10 minutes of 0.05-0.3 s waits


def shm_dir() -> Path:
    """Where this OS shows POSIX shared memory as files (Linux), else the temporary directory."""
    d = Path("/dev/shm")
    if d.is_dir():
        return d
    import tempfile
    return Path(tempfile.gettempdir())


def _owner_path(prefix: int) -> Path:
    return shm_dir() / f"attent-streaming-{prefix:06}.owner"


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError:  # another user's file in the sticky /dev/shm
        return False


def clean_shared_memory() -> list[str]:
    """Remove the shared memory of attent jobs on this node that ended without removing it.

    A job killed by a signal cannot run its exit handlers, so its segments stay. They do not block
    a new job, which takes the next free prefix, but they hold memory. Segments of live jobs and
    of other programs are left alone. Returns one line per prefix cleaned. Jobs call it from
    :func:`shared_memory_session`, on the local leader with registration locked.
    """
    from .runlock import describe, holder_alive
    cleaned = []
    for owner in sorted(shm_dir().glob(OWNER_GLOB)):
        try:
            record = json.loads(owner.read_text())
            prefix = int(record["prefix"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if holder_alive(record) is not False:
            continue  # alive, or out of sight (another pid namespace): not ours to judge
        removed = sum(_unlink(shm_dir() / f"{prefix:06}_{name}") for name in SHM_TO_CLEAN)
        _unlink(owner)
        cleaned.append(f"removed {removed} shared-memory segments of prefix {prefix:06}, left by "
                       f"{describe(record, command=False)}, which has ended")
    return cleaned


def _try_node_lock() -> Optional[int]:
    """The node-wide registration lock (flock), or None while another job holds it."""
    path = shm_dir() / NODE_LOCK
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # read-only: flock needs no more
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass  # held; or removed by its holder after our open: try again
    os.close(fd)
    return None


def _release_node_lock(fd: int) -> None:
    # Removed while held, so that nothing stays in /dev/shm; a job that opened the old file finds
    # it gone once it has the lock (the inode check above) and opens the new one.
    path = shm_dir() / NODE_LOCK
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            _unlink(path)
    except OSError:
        pass
    os.close(fd)


class _Owner:
    """This job's owner records (local leader only): written at registration, removed at exit,
    when streaming's own exit handlers unlink the segments."""

    def __init__(self):
        self.paths: list[Path] = []
        atexit.register(self.remove)

    def add(self, ds: StreamingDataset) -> StreamingDataset:
        from .runlock import holder_record
        prefix = getattr(ds, "_shm_prefix_int", None)
        if prefix is None:  # another streaming version: nothing to record
            return ds
        path = _owner_path(prefix)
        path.write_text(json.dumps({**holder_record(), "prefix": prefix}))
        self.paths.append(path)
        return ds

    def remove(self) -> None:
        for path in self.paths:
            _unlink(path)
        self.paths = []


_owner: Optional[_Owner] = None


@contextmanager
def shared_memory_session(comm, clean: str = "ended") -> Iterator[Callable]:
    """Collective: open this job's StreamingDatasets inside; pass each to the yielded ``track``.

    Each node's local leader holds the node's registration lock from before the cleaning to after
    the last dataset registered its prefix. The lock is tried without blocking and the ranks
    agree on the outcome, so jobs spanning several of the same nodes cannot deadlock.
    ``clean``: "ended" (default) removes the segments of this node's ended attent jobs
    (:func:`clean_shared_memory`), "all" also every other streaming segment on the node, live
    jobs' included (streaming's ``clean_stale_shared_memory``), "none" nothing.
    """
    global _owner
    from streaming.base.world import World

    from .teaching import print0
    if clean not in CLEAN_MODES:
        raise ValueError(f"clean={clean!r}; allowed: {', '.join(CLEAN_MODES)}")
    leader = World.detect().is_local_leader
    jitter = random.Random(os.getpid())  # only spreads the retries of jobs that collide
    fd = None
    for attempt in range(_LOCK_ATTEMPTS):
        fd = _try_node_lock() if leader else None
        if not comm.max_int(int(leader and fd is None)):
            break
        if fd is not None:
            _release_node_lock(fd)
            fd = None
        if attempt == 20:
            print0(f"waiting for another job on this node to open its datasets "
                   f"({shm_dir() / NODE_LOCK})")
        time.sleep(0.05 + 0.25 * jitter.random())
    else:
        raise SystemExit(f"another job on this node has held {shm_dir() / NODE_LOCK} for 10 "
                         "minutes while opening its datasets; if it hangs, stop it")
    ok = False
    try:
        if leader and clean != "none":
            for line in clean_shared_memory():
                print(f"note: {line}", flush=True)
        if clean == "all":
            from streaming.base.util import clean_stale_shared_memory
            clean_stale_shared_memory()  # collective: local rank 0 cleans, the others wait
        comm.barrier()  # no rank looks for a free prefix while its leader cleans
        if leader and _owner is None:
            _owner = _Owner()
        yield (_owner.add if leader else (lambda ds: ds))
        ok = True
    finally:
        if ok:
            comm.barrier()  # every rank has found its prefixes
        if fd is not None:
            _release_node_lock(fd)


def adopt_launcher_env() -> None:
    """Give streaming the per-node world size under launchers that name it differently.

    Streaming reads LOCAL_WORLD_SIZE (torchrun sets it); DeepSpeed's launcher sets LOCAL_SIZE.
    Without it streaming would take every rank for a node of its own, and two "local leaders" on
    one machine would collide in shared memory.
    """
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]


def fetch_file(remote: str, local: Path) -> None:
    """Copy one file from a streaming remote (s3://..., gs://..., or a path) to ``local``.

    Written under a temporary name and renamed, so a reader never sees half a file.
    """
    from streaming.base.storage.download import CloudDownloader
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
    CloudDownloader.direct_download(remote, str(tmp))
    os.replace(tmp, local)


def check_remote(remote: str) -> str:
    """Return ``remote`` if streaming can read it (a path, or a scheme it has a downloader for).

    Raises ValueError naming the allowed schemes. A password inside the URL is refused, and the
    message shows the URL with it masked: credentials belong in the environment or the store's
    credentials file, where nothing we print can reveal them.
    """
    from urllib.parse import urlsplit

    from streaming.base.storage.download import DOWNLOADER_MAPPINGS
    parts = urlsplit(remote)
    if parts.password is not None:
        masked = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1),
                                query="", fragment="")
        raise ValueError(f"{masked.geturl()} holds a password; remove it from the URL and give "
                         "credentials through the environment (e.g. AWS_ACCESS_KEY_ID / "
                         "AWS_SECRET_ACCESS_KEY) or the store's credentials file")
    # "c:\data" parses with scheme "c"; a one-letter scheme is a Windows drive, i.e. a path.
    if len(parts.scheme) > 1 and parts.scheme not in DOWNLOADER_MAPPINGS:
        # "dbfs-uc" is streaming's internal name for dbfs:/Volumes paths, not a scheme.
        allowed = ", ".join(f"{s}://" for s in sorted(DOWNLOADER_MAPPINGS)
                            if s not in ("", "dbfs-uc"))
        # Only the scheme is echoed: the rest of a URL can carry a signature or token.
        raise ValueError(f"unsupported remote scheme {parts.scheme + '://'!r}: streaming has no "
                         f"downloader for it; allowed: a local path or {allowed}")
    return remote


def _num_nodes() -> int:
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, world // max(1, local))


class SubsetStreamingDataset(StreamingDataset):
    """StreamingDataset over MDS shards whose every pass is a teacher-chosen subset.

    Samples gain an ``"id"`` key: the global sample id the teacher scores and selects by.
    Reads ``local`` (and ``remote`` with ``local`` as cache) exactly like StreamingDataset, and
    honours the WORLD_SIZE / LOCAL_WORLD_SIZE / RANK environment the launchers set.
    """

    def __init__(self, *, local: str, remote: Optional[str] = None, batch_size: int,
                 shuffle: bool = True, shuffle_seed: int = 9176, **kwargs: Any):
        kwargs.setdefault("num_canonical_nodes", _num_nodes())
        super().__init__(local=local, remote=remote, batch_size=batch_size, shuffle=shuffle,
                         shuffle_seed=shuffle_seed, **kwargs)
        self.full_size = int(self.epoch_size)
        self._ids: Optional[np.ndarray] = None
        self._pass = 0

    # -- what the trainer calls -------------------------------------------------------------
    def set_pass(self, pass_index: int, ids: np.ndarray, samples_done: int = 0) -> None:
        """Make the next iteration pass ``pass_index`` over ``ids``, skipping ``samples_done``.

        ``samples_done`` counts samples consumed by the whole data-parallel group in this pass
        (steps x global batch): it is how a resumed run continues mid-pass.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.full_size):
            raise ValueError(f"selected ids must lie in [0, {self.full_size})")
        group = self.batch_size * self._parallel_rank_world.num_ranks
        if len(ids) == 0 or len(ids) % group:
            raise ValueError(
                f"pass {pass_index} selects {len(ids)} ids, not a positive multiple of the global "
                f"batch {group} (micro batch {self.batch_size} x {self._parallel_rank_world.num_ranks}"
                " ranks); the teacher rounds budgets down to whole global batches")
        if not 0 <= samples_done <= len(ids):
            raise ValueError(f"samples_done={samples_done} outside [0, {len(ids)}]")
        self._ids, self._pass = np.sort(ids), pass_index
        self.epoch_size = len(ids)
        self.length = math.ceil(len(ids) / self._parallel_rank_world.num_ranks)
        # A stale next_epoch (from a later pass, before a resume) would make streaming discard
        # the state below as out of date.
        self.next_epoch = pass_index
        # Streaming resumes from this state at the next __iter__: it sets the epoch number (our
        # pass, which seeds its shuffle) and the offset, on every worker, through shared memory.
        self.load_state_dict({
            "epoch": pass_index,
            "sample_in_epoch": int(samples_done),
            "num_canonical_nodes": self.num_canonical_nodes,
            "shuffle_seed": self.shuffle_seed,
            "initial_physical_nodes": self.initial_physical_nodes,
        })

    # -- the seam -------------------------------------------------------------------------------
    def resample_streams(self, epoch: int, stream_id: Optional[int] = None
                         ) -> tuple[np.ndarray, np.ndarray]:
        if self._ids is None:
            raise RuntimeError("call set_pass(pass_index, ids) before iterating")
        if epoch != self._pass:
            raise RuntimeError(f"streaming asked for epoch {epoch} but the teacher prepared pass "
                               f"{self._pass}; call set_pass before each pass")
        # Shuffle units are per-shard sample counts of this epoch: ids are sorted, shards are
        # contiguous id ranges, so counting ids per shard keeps streaming's shard-aware shuffle.
        shard_of = np.searchsorted(self.sample_offset_per_shard, self._ids, side="right") - 1
        units = np.bincount(shard_of, minlength=self.num_shards)
        return units[units > 0].astype(np.int64), self._ids

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        sample = super().get_item(sample_id, retry)
        # Decoded arrays are read-only views of the shard; torch wants writable memory.
        sample = {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in sample.items()}
        sample["id"] = sample_id
        return sample
