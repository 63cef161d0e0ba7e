"""DeepSpeed's ``monitor`` sections (tensorboard, wandb, csv_monitor, comet) for the teacher's figures.

A DeepSpeed user already says where metrics go, in the config they train with::

    "csv_monitor": {"enabled": true, "output_path": "runs/monitor", "job_name": "demo"}

Our jobs and ``attent_scale.initialize`` write to the same monitor, as events named
``attent/train/*`` (loss, learning rate, tokens), ``attent/eval/val_loss`` and, once per pass the
teacher begins, ``attent/teacher/*`` (kept, skipped, score quantiles, mean score of the kept, and
``attent/teacher/share/<source>``: each source's share of the selection). The JSONL metrics file
stays the embedded default; the monitor is what a config asks for in addition.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

MONITOR_KEYS = ("tensorboard", "wandb", "csv_monitor", "comet")

Event = tuple[str, float, int]


def wants_monitor(ds_config: dict) -> bool:
    """Whether the config enables any of DeepSpeed's monitors."""
    return any(isinstance(ds_config.get(k), dict) and ds_config[k].get("enabled")
               for k in MONITOR_KEYS)


def open_monitor(ds_config: dict, engine=None):
    """The engine's own monitor when it has one, else DeepSpeed's MonitorMaster for the config's
    monitor sections (a job without a DeepSpeed engine, e.g. FSDP2); None when none is enabled."""
    if not wants_monitor(ds_config):
        return None
    own = getattr(engine, "monitor", None)
    if own is not None and getattr(own, "enabled", False):
        return own
    import deepspeed
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster
    from .startup import skip_shm_allreduce
    skip_shm_allreduce()
    deepspeed.init_distributed()  # joins the existing process group: the monitor asks its rank
    return MonitorMaster(get_monitor_config(ds_config))


def events(record: dict[str, Any], sources: Optional[Sequence[str]] = None) -> list[Event]:
    """The monitor events of one metrics record (see report.py for the record types)."""
    step = int(record.get("step", 0))
    kind = record.get("type")
    out: list[Event] = []

    def add(name: str, key: str) -> None:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, float(value), step))

    if kind == "train":
        for key in ("loss", "lr", "tokens", "score_q50"):
            add(f"attent/train/{key}", key)
    elif kind == "eval":
        add("attent/eval/val_loss", "val_loss")
    elif kind == "selection":
        for key in ("selected", "skipped", "q10", "q50", "q90", "selected_mean"):
            add(f"attent/teacher/{'kept' if key == 'selected' else key}", key)
        for i, share in enumerate(record.get("source_share") or []):
            name = sources[i] if sources and i < len(sources) else str(i)
            out.append((f"attent/teacher/share/{name}", float(share), step))
    return out


class MonitorSink:
    """Writes metrics records to a DeepSpeed monitor (or nowhere, when there is none)."""

    def __init__(self, monitor, sources: Optional[Sequence[str]] = None):
        self.monitor, self.sources = monitor, sources

    def log(self, record: dict[str, Any]) -> None:
        if self.monitor is not None:
            found = events(record, self.sources)
            if found:
                self.monitor.write_events(found)
