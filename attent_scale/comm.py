"""The one module that talks to torch.distributed.

Everything the teacher needs from the data-parallel group is here: gathering scores, agreeing on a
selection, and the counts that keep no-grad scoring passes in lockstep. With one rank (or no process
group) :class:`LocalComm` answers without any collective.
"""
from __future__ import annotations

import gc
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


class LocalComm:
    rank = 0
    world = 1

    def gather(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(a) for a in arrays)

    def agree(self, value: int, what: str) -> None:
        return None

    def max_int(self, value: int) -> int:
        return int(value)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        return None

    def all_reduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        _check_op(op)
        return np.array(array, copy=True)

    def exchange(self, dest: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(a) for a in arrays)


_OPS = ("sum", "max", "min")


def _check_op(op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"reduce op {op!r} is not one of {_OPS}")


class DistComm:
    """Collectives over a process group (the data-parallel group; default: the world)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self._nccl = dist.get_backend(group) == "nccl"

    @property
    def device(self) -> torch.device:
        # NCCL only moves tensors on this rank's own GPU, gloo only CPU ones. Read the current
        # device at each call, not once here: a job may create its comm before it picks its GPU.
        return torch.device("cuda", torch.cuda.current_device()) if self._nccl else \
            torch.device("cpu")

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return out

    def gather(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Concatenate each 1-D array over all ranks, in rank order (sizes may differ)."""
        n = torch.tensor([len(arrays[0])], dtype=torch.int64, device=self.device)
        sizes = [int(s.item()) for s in self._all_gather(n)]
        longest = max(sizes)
        result = []
        for a in arrays:
            t = torch.from_numpy(np.ascontiguousarray(a))
            padded = torch.zeros(longest, dtype=t.dtype)
            padded[:len(a)] = t
            parts = self._all_gather(padded.to(self.device))
            result.append(np.concatenate([p[:s].cpu().numpy() for p, s in zip(parts, sizes)]))
        return tuple(result)

    def agree(self, value: int, what: str) -> None:
        """Raise on every rank if the ranks hold different values (e.g. selection checksums)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        seen = [int(v.item()) for v in self._all_gather(t)]
        if len(set(seen)) != 1:
            raise RuntimeError(f"ranks disagree on {what}: " +
                               ", ".join(f"rank {r}: {v:#x}" for r, v in enumerate(seen)))

    def max_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (the tensor must live on this group's device)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def all_reduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """Element-wise sum/max/min of an int64 or float64 array over ranks (a new array).

        The sharded selection's histograms and counts: fixed-size, whatever the dataset size.
        """
        _check_op(op)
        t = torch.from_numpy(np.array(array, copy=True)).to(self.device)
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                     "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(t, op=reduce_op, group=self.group)
        return t.cpu().numpy()

    def exchange(self, dest: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """All-to-all: element i of each array goes to rank ``dest[i]``.

        Returns what this rank received, in source-rank order and, within a source, in the order
        sent. Routes score records to the rank that owns their ids.
        """
        dest = np.asarray(dest, dtype=np.int64)
        order = np.argsort(dest, kind="stable")
        send = np.bincount(dest, minlength=self.world).astype(np.int64)
        recv = torch.empty(self.world, dtype=torch.int64, device=self.device)
        dist.all_to_all_single(recv, torch.from_numpy(send).to(self.device), group=self.group)
        send_sizes, recv_sizes = send.tolist(), recv.cpu().tolist()
        out = []
        for a in arrays:
            t = torch.from_numpy(np.ascontiguousarray(np.asarray(a)[order])).to(self.device)
            r = torch.empty(sum(recv_sizes), dtype=t.dtype, device=self.device)
            dist.all_to_all_single(r, t, recv_sizes, send_sizes, group=self.group)
            out.append(r.cpu().numpy())
        return tuple(out)


def world_if_initialized() -> Optional[tuple[int, int]]:
    """(rank, world size) of the default process group, or None when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def make_comm(group: Optional[dist.ProcessGroup] = None) -> LocalComm | DistComm:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        return DistComm(group)
    return LocalComm()


def shutdown() -> None:
    """Destroys the default process group at a job's end, before interpreter exit.

    Left to interpreter exit, gloo's worker threads can outlive the interpreter and abort a
    process after a successful run (SIGABRT, "terminate called without an active exception";
    seen in the Trainer job's stop-and-resume test and in the multi-rank tests' workers). A
    group's threads end when nothing references it any more, not when it is destroyed. So: call
    this after the function that built the engine, model and data has returned, and collect
    garbage first, since an engine or a model with hooks holds its groups in reference cycles
    that only a collection frees (else the interpreter's last one, at exit, does: the abort).
    tests/teardown_worker.py counts the threads left either way.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
