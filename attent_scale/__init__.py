"""attent-scale: AtteNT teaching (a teacher picks which examples each pass trains) for any loop.

The public API, every name documented in the README:

- :func:`initialize`: drop-in for ``deepspeed.initialize``; an ``"attent"`` section in the config
  switches the teacher on, ``passes=`` tells it the plan.
- :class:`AttentSampler`: drop-in for ``DistributedSampler`` in a loop that builds its own
  DataLoader, with ``sampler.update(ids, ...)`` returning the loss to backpropagate.
- :class:`AttentTrainer`: ``transformers.Trainer`` with the teacher.
- :class:`Teaching`: the teacher at work, for loops that read data their own way (our streaming
  jobs use it); :class:`SubsetStreamingDataset`: MosaicML streaming over the teacher's passes.
- :class:`AttentConfig`, :func:`parse_attent`, :func:`split_deepspeed_config`, :data:`PRESETS`,
  :class:`ConfigError`: the ``attent`` section; :func:`causal_token_losses`: per-token losses.

Names are imported on first use, so ``import attent_scale`` stays cheap (no DeepSpeed, transformers
or streaming until asked for). Every other module is private.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "initialize": "deepspeed_plugin",
    "AttentSampler": "sampler",
    "WithIds": "sampler",
    "collate_with_ids": "sampler",
    "Teaching": "teaching",
    "AttentTrainer": "hf_trainer",
    "SubsetStreamingDataset": "streaming_data",
    "AttentConfig": "config",
    "ConfigError": "config",
    "PRESETS": "config",
    "parse_attent": "config",
    "split_deepspeed_config": "config",
    "resolve_auto": "deepspeed_plugin",
    "causal_token_losses": "signals",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attent_scale' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
