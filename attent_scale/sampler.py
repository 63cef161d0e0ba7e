"""AtteNT in a training loop that builds its own DataLoader: a sampler and one call per batch.

:class:`AttentSampler` replaces ``DistributedSampler``; :meth:`AttentSampler.update` replaces the
line that computes the loss::

    sampler = AttentSampler(ds, "ds_config.json", passes=3, batch_size=8)
    loader = DataLoader(sampler.dataset, batch_size=8, sampler=sampler)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in loader:
            ids = batch.pop("id")
            out = model(**batch)
            loss = sampler.update(ids, logits=out.logits, labels=batch["labels"])
            loss.backward(); optimizer.step(); optimizer.zero_grad()

Each pass (one iteration of the loader) yields this rank's share of the teacher's selection: every
selected id exactly once across the data-parallel group, the ranks' micro batches of equal count.
``sampler.dataset`` is the dataset with each item's index attached (``item["id"]`` for dict items,
appended last for tuples), so the loop knows which examples a batch holds.

Passes follow the teacher's plan; ``set_epoch`` never goes back (a resumed run's loop may count
epochs from 0 again), and a pass the run already finished is not trained twice: iterating after the
last pass yields nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch.utils.data import Dataset, Sampler

from .comm import make_comm
from .config import SECTION, AttentConfig, ConfigError, parse_attent, split_deepspeed_config
from .teaching import Scorer, Teaching


class WithIds(Dataset):
    """``dataset`` whose items carry their index (the sample id the teacher scores and selects).

    Dict items gain the key ``key``; tuple and list items get the id appended; any other item
    becomes ``(item, id)``.
    """

    def __init__(self, dataset, key: str = "id"):
        self.base, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        if isinstance(item, dict):
            if self.key in item:
                raise KeyError(f"dataset items already have a key {self.key!r}; pass id_key= "
                               "another name")
            return {**item, self.key: int(i)}
        if isinstance(item, (tuple, list)):
            return (*item, int(i))
        return item, int(i)


def read_section(config: Union[str, Path, dict, AttentConfig, None]) -> Optional[AttentConfig]:
    """The teacher's config from a DeepSpeed JSON (path or dict holding an ``attent`` section), an
    ``attent`` section itself, or an :class:`AttentConfig`; None when the teacher is off."""
    if config is None or isinstance(config, AttentConfig):
        return config if config is None or config.enabled else None
    if isinstance(config, (str, Path)) or SECTION in config:  # a whole DeepSpeed config
        return split_deepspeed_config(config if isinstance(config, dict) else Path(config))[1]
    return parse_attent(config)


def _world(num_replicas: Optional[int], rank: Optional[int], comm) -> tuple[int, int]:
    world = comm.world if num_replicas is None else num_replicas
    me = comm.rank if rank is None else rank
    if (world, me) != (comm.world, comm.rank):
        raise ValueError(f"num_replicas={world}, rank={me} disagree with the process group "
                         f"(world {comm.world}, rank {comm.rank}); the teacher agrees on its "
                         "selection through that group: leave num_replicas and rank unset")
    return world, me


class AttentSampler(Sampler[int]):
    """Drop-in for ``DistributedSampler`` whose passes are the teacher's selections.

    Args:
        dataset: a map-style dataset (``len`` and integer indexing); its index is the sample id.
        config: the teacher (see :func:`read_section`); None or ``"enabled": false`` gives full
            passes with the same order and remainder rule: the plain baseline.
        passes: passes over the dataset the run is planned for (the loop's epochs).
        batch_size: micro batch per rank (the DataLoader's ``batch_size``).
        gradient_accumulation_steps: micro batches per optimizer step.
        seed: data order and remainder draws (the teacher's own draws use ``attent.seed``).
        sources, reference: per-sample source ids / reference scores for the policies that need
            them (``selection.per_source``, ``score: reducible``).
        model: the module whose forward the ``attention_fgrad`` and ``grad_norm`` signals hook.
        pool_scorer: ``ids -> per-example scores`` (no grad), required by ``source: pool``.
        id_key: the key the ids travel under in dict items.
    """

    def __init__(self, dataset, config, passes: int, batch_size: int, *,
                 gradient_accumulation_steps: int = 1, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, seed: int = 0, sources=None, reference=None,
                 model=None, pool_scorer: Optional[Scorer] = None, id_key: str = "id",
                 teaching: Optional[Teaching] = None):
        if not isinstance(passes, int) or passes < 1:
            raise ValueError(f"passes: got {passes!r}; allowed: an integer >= 1 (the epochs "
                             "the loop runs)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size!r}; allowed: an integer >= 1")
        comm = teaching.comm if teaching is not None else make_comm()
        self.world, self.rank = _world(num_replicas, rank, comm)
        self.batch_size = batch_size
        self.dataset = WithIds(dataset, id_key)
        self.teaching = teaching or Teaching(
            read_section(config), len(dataset), passes,
            batch_size * gradient_accumulation_steps * self.world, comm=comm, data_seed=seed,
            sources=sources, reference=reference, model=model)
        cfg = self.teaching.cfg
        if cfg is not None and cfg.source == "pool" and pool_scorer is None:
            raise ConfigError("attent.source: got 'pool', but no pool_scorer was given; fix: "
                              "pass pool_scorer= (ids -> per-example scores), or use source "
                              "'free'")
        self.pool_scorer = pool_scorer
        self._requested: Optional[int] = None

    # -- the Sampler protocol -------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Train pass ``epoch`` next, unless training already stands past it (never rewinds)."""
        self._requested = epoch

    def _next_pass(self) -> int:
        t = self.teaching
        return max(t.pass_index, self._requested or 0)

    def __len__(self) -> int:
        t, p = self.teaching, self._next_pass()
        if p >= t.num_passes:
            return 0
        done = t.samples_done if p == t.pass_index else 0
        return (t.pass_size(p) - done) // self.world

    def __iter__(self) -> Iterator[int]:
        t, p = self.teaching, self._next_pass()
        self._requested = None
        if p >= t.num_passes:
            return iter(())
        selection = t.begin_pass(p, self.pool_scorer, self.batch_size)  # collective
        ids = t.rank_order(p, selection, self.rank, self.world, self.batch_size)
        return iter(ids.tolist())

    # -- the loop's call ------------------------------------------------------------------------
    def update(self, ids, losses: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Record the batch's scores; the loss to backpropagate (see :meth:`Teaching.update`)."""
        return self.teaching.update(ids, losses, **kwargs)

    def planned_steps(self) -> int:
        """Optimizer steps of the whole plan: the length to give a learning-rate schedule."""
        return self.teaching.planned_steps()

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, directory: Union[str, Path]) -> None:
        """Collective: the teacher's state and position into ``directory`` (beside your model)."""
        self.teaching.save(directory)

    def load(self, directory: Union[str, Path]) -> dict[str, Any]:
        """Resume from what :meth:`save` wrote: the next iteration continues the pass."""
        return self.teaching.load(directory)


def collate_with_ids(collate_fn: Optional[Callable] = None, key: str = "id") -> Callable:
    """A collate function for :class:`WithIds` items that keeps ``key`` away from ``collate_fn``
    (which may pad or reject unknown keys) and puts the ids back as one int64 tensor."""
    from torch.utils.data import default_collate
    inner = collate_fn or default_collate

    def collate(items):
        if items and isinstance(items[0], dict):
            ids = [it[key] for it in items]
            batch = inner([{k: v for k, v in it.items() if k != key} for it in items])
            batch[key] = torch.tensor(ids, dtype=torch.int64)
            return batch
        ids = [it[-1] for it in items]
        rest = [it[:-1] if len(it) > 2 else it[0] for it in items]
        return (*_as_tuple(inner(rest)), torch.tensor(ids, dtype=torch.int64))
    return collate


def _as_tuple(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


__all__ = ["AttentSampler", "WithIds", "collate_with_ids", "read_section"]
