"""Run metrics: a JSON-lines logger, the end-of-run summary table and the plots.

One record per line of ``metrics.jsonl``; the training loop writes

- ``{"type": "train", "step", "time", "loss", "lr", "tokens", "samples"}``
- ``{"type": "eval", "step", "time", "val_loss"}``
- ``{"type": "selection", "step", "time", "pass", "kind", "ratio", "selected", "skipped",
  "invalid", "unscored", "q10", "q50", "q90", "selected_mean"}`` (the score fields only when the
  teacher drew a selection at that pass)
- ``{"type": "summary", ...}``

where ``time`` is wall-clock seconds since the start of training. Matplotlib is imported only by
the plotting functions, which draw on bare Agg figures (no display, no pyplot state).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]


def _jsonable(obj: Any) -> Any:
    """json.dumps fallback: numpy scalars and arrays, paths, sets."""
    if hasattr(obj, "tolist"):  # numpy scalar or array, torch tensor
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"metrics record value of type {type(obj).__name__} is not JSON-serialisable")


class MetricsLogger:
    """Appends one JSON object per :meth:`log` call to ``path`` (flushed at once).

    ``path=None`` gives a null logger with the same methods (for ranks other than 0). The file is
    opened in append mode, so a resumed run continues the same log; logging after :meth:`close`
    reopens it.
    """

    def __init__(self, path: Optional[PathLike]):
        self.path = None if path is None else Path(path)
        self._fh: Optional[IO[str]] = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def log(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps(dict(record), default=_jsonable)
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(line + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: PathLike) -> list[dict]:
    """Every record of a metrics file, in order. Blank lines are skipped, and so is a truncated
    last line (a run killed mid-write); a corrupt line elsewhere raises ValueError."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({e})") from e
    return records


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def format_summary(rows: Union[Mapping[str, Any], Iterable[tuple[str, Any]]]) -> str:
    """An aligned two-column plain-text table: names left, values right-aligned."""
    items = list(rows.items()) if isinstance(rows, Mapping) else [tuple(r) for r in rows]
    if not items:
        return ""
    keys = [str(k) for k, _ in items]
    values = [_fmt(v) for _, v in items]
    kw, vw = max(map(len, keys)), max(map(len, values))
    rule = "-" * (kw + 2 + vw)
    body = [f"{k:<{kw}}  {v:>{vw}}" for k, v in zip(keys, values)]
    return "\n".join([rule, *body, rule])


# --------------------------------------------------------------------------------------------
# plots

TRAIN_COLOR, EVAL_COLOR, SELECT_COLOR = "#7a9cc6", "#1f4e96", "#c0504d"


def _figure(figsize: tuple[float, float]):
    # A bare Figure renders through Agg on savefig: no pyplot, no global backend switch, nothing
    # to close, safe in any process.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: Sequence[dict], kind: str, x: str, y: str) -> tuple[list, list]:
    pts = [(r[x], r[y]) for r in records
           if r.get("type") == kind and _finite(r.get(x)) and _finite(r.get(y))]
    pts.sort(key=lambda p: p[0])
    return [p[0] for p in pts], [p[1] for p in pts]


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=12,
            color="0.45")


def _selected_fraction(r: dict) -> Optional[float]:
    if r.get("kind") == "full":
        return 1.0
    sel, skip = r.get("selected"), r.get("skipped")
    if _finite(sel) and _finite(skip) and sel + skip > 0:
        return sel / (sel + skip)
    return None


def plot_metrics(path_jsonl: PathLike, out_png: PathLike, title: Optional[str] = None) -> Path:
    """Three panels from a metrics file, written to ``out_png``:

    (a) validation loss (and, lighter, training loss) against wall-clock seconds;
    (b) the share of the dataset each pass trains (selected / (selected + skipped); full passes
        1.0) against step, as steps;
    (c) the teacher's score distribution at each selection: median with a q10-q90 band.

    Runs without a teacher (no selection records other than full passes) show "teacher off" in
    (b) and (c); missing evaluation data leaves a note instead of a curve.
    """
    records = read_metrics(path_jsonl)
    fig = _figure((16, 4.6))
    ax_loss, ax_frac, ax_score = fig.subplots(1, 3)

    # (a) losses against wall-clock time
    tx, ty = _series(records, "train", "time", "loss")
    ex, ey = _series(records, "eval", "time", "val_loss")
    if tx:
        ax_loss.plot(tx, ty, color=TRAIN_COLOR, alpha=0.45, lw=1.0, label="train loss")
    if ex:
        ax_loss.plot(ex, ey, color=EVAL_COLOR, lw=2.0, marker="o", ms=3.5,
                     label=f"validation loss (last {ey[-1]:.4f})")
    if tx or ex:
        ax_loss.legend(loc="upper right", fontsize=9)
    if not ex:
        _note(ax_loss, "no evaluation yet" if tx else "no loss data")
    ax_loss.set_xlabel("wall-clock time (s)")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title("(a) loss vs wall-clock")
    ax_loss.grid(alpha=0.3)

    # (b) selected fraction per pass, (c) score distribution
    selections = sorted((r for r in records if r.get("type") == "selection"
                         and _finite(r.get("step"))), key=lambda r: r["step"])
    teacher_on = any(r.get("kind") != "full" or _finite(r.get("q50")) for r in selections)
    last_step = max([r["step"] for r in records if _finite(r.get("step"))], default=0)

    pts = [(r["step"], f) for r in selections if (f := _selected_fraction(r)) is not None]
    if teacher_on and pts:
        xs = [p[0] for p in pts] + [max(last_step, pts[-1][0])]
        ys = [p[1] for p in pts] + [pts[-1][1]]
        ax_frac.step(xs, ys, where="post", color=SELECT_COLOR, lw=1.8)
        ax_frac.fill_between(xs, ys, step="post", color=SELECT_COLOR, alpha=0.12)
        trained = sum(r.get("selected", 0) for r in selections if _finite(r.get("selected")))
        offered = sum(r.get("selected", 0) + r.get("skipped", 0) for r in selections
                      if _finite(r.get("selected")) and _finite(r.get("skipped")))
        if offered:
            ax_frac.text(0.02, 0.04, f"overall {trained / offered:.1%} of examples trained",
                         transform=ax_frac.transAxes, fontsize=9, color="0.3")
    elif pts:  # teacher off, full passes logged: the flat 1.0 line, greyed
        xs = [p[0] for p in pts] + [max(last_step, pts[-1][0])]
        ax_frac.step(xs, [1.0] * len(xs), where="post", color="0.6", lw=1.5)
        _note(ax_frac, "teacher off (every pass full)")
    else:
        _note(ax_frac, "teacher off")
        ax_frac.set_xticks([])
    ax_frac.set_ylim(0.0, 1.05)
    ax_frac.set_xlabel("optimizer step")
    ax_frac.set_ylabel("selected / (selected + skipped)")
    ax_frac.set_title("(b) share of examples trained per pass")
    ax_frac.grid(alpha=0.3)

    scored = [r for r in selections if all(_finite(r.get(k)) for k in ("q10", "q50", "q90"))]
    # Free scores of the examples trained in each logging window (train records carry them).
    window = [r for r in records if r.get("type") == "train"
              and all(_finite(r.get(k)) for k in ("score_q10", "score_q50", "score_q90"))]
    if teacher_on and window:
        wx = [r["step"] for r in window]
        ax_score.fill_between(wx, [r["score_q10"] for r in window],
                              [r["score_q90"] for r in window], color="0.5", alpha=0.15,
                              label="trained examples, q10-q90")
        ax_score.plot(wx, [r["score_q50"] for r in window], color="0.4", lw=1.0,
                      label="trained examples, median")
    if teacher_on and (scored or window):
        sx = [r["step"] for r in scored]
        if scored:
            ax_score.errorbar(sx, [r["q50"] for r in scored],
                              yerr=[[r["q50"] - r["q10"] for r in scored],
                                    [r["q90"] - r["q50"] for r in scored]],
                              color=SELECT_COLOR, lw=1.8, marker="o", ms=4, capsize=4,
                              label="all examples at a selection (median, q10-q90)")
        kept = [(r["step"], r["selected_mean"]) for r in scored if _finite(r.get("selected_mean"))]
        if kept:  # (pool-scored selections carry the whole pool's distribution)
            ax_score.plot([k[0] for k in kept], [k[1] for k in kept], ls="none", marker="^",
                          ms=5, color="0.25", label="mean score of selected")
        ax_score.legend(loc="best", fontsize=9)
    else:
        _note(ax_score, "teacher off" if not teacher_on else "no scored selections")
        ax_score.set_yticks([])
    if pts:
        ax_score.set_xlim(ax_frac.get_xlim())  # same step axis as (b)
    else:
        ax_score.set_xticks([])
    ax_score.set_xlabel("optimizer step")
    ax_score.set_ylabel("example score")
    ax_score.set_title("(c) score distribution against step")
    ax_score.grid(alpha=0.3)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def compare_plot(runs: Mapping[str, PathLike], out_png: PathLike,
                 title: Optional[str] = None) -> Path:
    """Validation loss against wall-clock seconds for several runs (label -> metrics file)."""
    fig = _figure((8, 5))
    ax = fig.subplots()
    drawn = 0
    for label, path in runs.items():
        ex, ey = _series(read_metrics(path), "eval", "time", "val_loss")
        if not ex:
            ax.plot([], [], label=f"{label} (no evaluation)")
            continue
        ax.plot(ex, ey, marker="o", ms=3, lw=1.6, label=f"{label} (last {ey[-1]:.4f})")
        drawn += 1
    if not drawn:
        _note(ax, "no evaluation data")
    if runs:
        ax.legend(loc="upper right", fontsize=9)
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title or "validation loss vs wall-clock")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
