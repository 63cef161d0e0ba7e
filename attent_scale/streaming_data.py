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

import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from streaming import StreamingDataset
from streaming.base.util import clean_stale_shared_memory


def clean_shared_memory() -> None:
    """Remove shared-memory segments a crashed run left behind (they raise FileExistsError).

    Collective: every rank calls it before any dataset of the job exists; each node's local rank 0
    cleans while the others wait, so no rank picks segment names during the cleaning.
    """
    clean_stale_shared_memory()


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
