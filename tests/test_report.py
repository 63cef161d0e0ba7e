"""Metrics logger, summary table and plots (pure CPU, no training)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from attent_scale.report import (MetricsLogger, compare_plot, format_summary, plot_metrics,
                                 read_metrics)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(path, *, teacher: bool, evals: bool = True, seed: int = 0,
                  steps: int = 400) -> list[dict]:
    """A plausible metrics file: training/eval losses, and (teacher on) warm-up full pass,
    subset passes with a shrinking ratio and a full pass per round."""
    rng = np.random.default_rng(seed)
    records = []
    per_pass = 50
    num_train = 1000
    for p in range(steps // per_pass):
        step = p * per_pass
        if teacher and p > 0 and p % 3:
            ratio = 0.8 - 0.05 * p
            sel = int(ratio * num_train)
            q50 = 3.0 * math.exp(-step / 300) + 1.0
            records.append({"type": "selection", "step": step, "time": step * 0.2, "pass": p,
                            "kind": "subset", "ratio": ratio, "selected": sel,
                            "skipped": num_train - sel, "invalid": 0, "unscored": 0,
                            "q10": q50 * 0.6, "q50": q50, "q90": q50 * 1.5,
                            "selected_mean": q50 * 1.3})
        else:
            records.append({"type": "selection", "step": step, "time": step * 0.2, "pass": p,
                            "kind": "full", "ratio": 1.0, "selected": num_train, "skipped": 0})
    for step in range(10, steps + 1, 10):
        t = step * 0.2
        records.append({"type": "train", "step": step, "time": t,
                        "loss": float(5.0 * math.exp(-step / 150) + 1.5 + rng.normal(0, 0.1)),
                        "lr": 1e-3, "tokens": step * 8192, "samples": step * 32})
        if evals and step % 50 == 0:
            records.append({"type": "eval", "step": step, "time": t + 0.05,
                            "val_loss": 5.0 * math.exp(-step / 150) + 1.7})
    records.append({"type": "summary", "time": steps * 0.2, "optimizer_steps": steps})
    with MetricsLogger(path) as log:
        for r in records:
            log.log(r)
    return records


def test_logger_roundtrip(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    records = [{"type": "train", "step": 1, "time": 0.5, "loss": 3.25, "lr": 1e-4,
                "tokens": 2048, "samples": 8},
               {"type": "eval", "step": 1, "time": 0.75, "val_loss": 3.5},
               {"type": "summary", "note": "ünïcode", "nested": {"a": [1, 2]}}]
    log = MetricsLogger(path)
    assert log.enabled
    log.log(records[0])
    # flushed at once: readable while the logger is still open
    assert read_metrics(path) == records[:1]
    for r in records[1:]:
        log.log(r)
    log.close()
    assert read_metrics(path) == records
    assert len(path.read_text().splitlines()) == len(records)
    # logging after close reopens in append mode
    log.log({"type": "eval", "step": 2, "time": 1.0, "val_loss": 3.0})
    log.close()
    assert read_metrics(path)[-1]["step"] == 2


def test_logger_numpy_values(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as log:
        log.log({"type": "selection", "step": np.int64(3), "q50": np.float32(0.5),
                 "ids": np.arange(3)})
    assert read_metrics(path) == [{"type": "selection", "step": 3, "q50": 0.5, "ids": [0, 1, 2]}]


def test_null_logger_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = MetricsLogger(None)
    assert not log.enabled
    log.log({"type": "train", "step": 1})
    log.close()
    log.log({"type": "train", "step": 2})
    with MetricsLogger(None) as other:
        other.log({"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_read_metrics_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"type": "eval", "step": 1}\n\n{"type": "train", "st')
    assert read_metrics(path) == [{"type": "eval", "step": 1}]
    path.write_text('{"type": "eval", "step": 1}\nbroken\n{"type": "train"}\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        read_metrics(path)


def test_format_summary():
    rows = {"optimizer steps": 1200, "tokens trained": 9_830_400, "examples trained": 38400,
            "examples skipped by the teacher": 11600, "wall time (s)": "812.3",
            "final validation loss": 2.123456789}
    text = format_summary(rows)
    lines = text.splitlines()
    for key, value in rows.items():
        line = next(ln for ln in lines if ln.startswith(key))
        assert line.split("  ")[-1].strip() == (f"{value:.6g}" if isinstance(value, float)
                                                 else str(value))
    body = [ln for ln in lines if not set(ln) <= {"-"}]
    assert len(body) == len(rows)
    assert len({len(ln) for ln in lines}) == 1  # aligned: every line the same width
    # list of pairs gives the same table
    assert format_summary(list(rows.items())) == text
    assert format_summary({}) == ""


@pytest.mark.parametrize("teacher", [True, False])
def test_plot_metrics(tmp_path, teacher):
    path = tmp_path / "metrics.jsonl"
    synthetic_run(path, teacher=teacher)
    out = tmp_path / "plots" / "metrics.png"
    plot_metrics(path, out, title=f"synthetic run, teacher {'on' if teacher else 'off'}")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_metrics_sparse_logs(tmp_path):
    # no eval records, no selection records at all, and an empty file: no crash
    path = tmp_path / "metrics.jsonl"
    synthetic_run(path, teacher=False, evals=False)
    records = [r for r in read_metrics(path) if r["type"] != "selection"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_metrics(path, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes().startswith(PNG_MAGIC)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    plot_metrics(empty, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes().startswith(PNG_MAGIC)


def test_compare_plot(tmp_path):
    runs = {}
    for i, teacher in enumerate([False, True]):
        runs[f"run{i}"] = tmp_path / f"run{i}.jsonl"
        synthetic_run(runs[f"run{i}"], teacher=teacher, seed=i, steps=300 + 100 * i)
    noeval = tmp_path / "noeval.jsonl"
    synthetic_run(noeval, teacher=False, evals=False)
    runs["no eval"] = noeval
    out = compare_plot(runs, tmp_path / "compare.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
