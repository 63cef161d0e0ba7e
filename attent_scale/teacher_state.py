"""The teacher's checkpoint: reading it without trusting it, and what a resume may change.

Files (written by :meth:`attent_scale.teacher.Teacher.save`):

- ``attent_state.json``: version, num_samples, num_passes, selection_pass, identity (below), and
  with a sharded table ``score_shards`` and ``sharded_fields``;
- ``attent_state.npz``: scores, scored (unless sharded), prev_scores and prev_scored (``score:
  drop``), selection_ids and selection_weights (once a pass began);
- sharded: ``attent_<field>.<lo>-<hi>.npy`` per rank and field.

:func:`read_state` turns a truncated or corrupt file into one :class:`TeacherStateError` naming
the file and the field; :func:`validate_state` checks every field's type, length and range
before any of it reaches the teacher, so a damaged checkpoint stops a job before it trains.

Identity and resume (:func:`describe_changes`, :func:`change_kind`). The saved identity is what
the plan and the selections depend on: the validated ``attent`` section (``cfg.model_dump()``),
num_samples, num_passes, global_batch, data_seed, the plan's pass sizes, and digests of the
per-sample sources and reference scores. Kinds of change:

- ``safe``: where or how fast scores are computed, never what is selected: selection.sharding,
  selection.sharding_threshold (both paths select the same ids, bit for bit, and the state is
  world-size independent), score_chunk_tokens, attention.query_chunk, grad_norm.chunk_elements,
  grad_norm.method (exact either way, up to float rounding).
- ``replan``: the plan's pass sizes, hence the step count and the learning-rate schedule, change:
  passes, global batch, pass sizes, attent.ratio.*, attent.interval.*, warmup_passes,
  full_passes_per_round, final_full_passes, selection.resample_each_pass. A resume may continue
  only if the job re-plans from the resumed step (an elastic resume on another world size does
  for the global batch); the run is then no longer budget-matched to its control.
- ``policy``: the plan stands but the selections from here on follow another rule: seed, signal,
  source, pool_size, score, the other selection.* keys, attention.layers, grad_norm's layers,
  preset, sources, reference. The saved scores may mean something else (signal, score): the
  resumed run is a different arm. Refuse unless that is the experiment.
- ``refuse``: the saved state cannot apply: samples (another dataset), data seed (another data
  order and remainder draws), the teacher switched on or off, identity not recorded.

Pure module: numpy only.
"""
from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

STATE_VERSION = 2
"""2 added identity and the previous-score table of ``score: drop``; 1 is still read."""
READABLE_VERSIONS = (1, 2)
JSON_NAME = "attent_state.json"
NPZ_NAME = "attent_state.npz"
READ_FROM = "_read_from"
"""Key :func:`read_state` adds to the meta it returns: the directory, for error messages."""
SHARDABLE = ("scores", "scored", "prev_scores", "prev_scored")
FRESH = ("fix: resume from an earlier checkpoint, or start fresh without resuming (e.g. "
         "--no-resume or a new output directory; the teacher then re-scores from its first pass)")


class TeacherStateError(ValueError):
    """The teacher's checkpoint is damaged, or belongs to another dataset or run."""


def _file(where: Optional[str], name: str) -> str:
    return str(Path(where) / name) if where else name


def damaged(file: str, field: str, problem: str) -> TeacherStateError:
    return TeacherStateError(f"{file}: field '{field}': {problem}; the teacher checkpoint is "
                             f"damaged; {FRESH}")


def shard_file(field: str, lo: int, hi: int) -> str:
    return f"attent_{field}.{lo}-{hi}.npy"


# ---- reading -------------------------------------------------------------------------------------

_NPZ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def read_state(directory: Path) -> tuple[dict, dict[str, Any]]:
    """(meta, arrays) of a saved teacher, validated; never unpickles anything."""
    directory = Path(directory)
    jpath, npath = directory / JSON_NAME, directory / NPZ_NAME
    try:
        meta = json.loads(jpath.read_text())
    except FileNotFoundError:
        raise damaged(str(jpath), "(file)", "missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise damaged(str(jpath), "(whole file)", f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise damaged(str(jpath), "(whole file)", f"a JSON object expected, got "
                                                  f"{type(meta).__name__}")
    arrays: dict[str, Any] = {}
    try:
        z = np.load(npath, allow_pickle=False)
    except FileNotFoundError:
        raise damaged(str(npath), "(file)", "missing") from None
    except _NPZ_ERRORS as exc:
        raise damaged(str(npath), "(whole file)", f"not a readable npz archive ({exc})") from None
    with z:
        for name in z.files:
            try:
                arrays[name] = z[name]
            except _NPZ_ERRORS as exc:  # truncated member, or an object array (a pickle)
                raise damaged(str(npath), name, f"unreadable ({exc})") from None
    if "score_shards" in meta:
        _read_shards(directory, meta, arrays)
    meta[READ_FROM] = str(directory)
    validate_state(meta, arrays)
    return meta, arrays


def _read_shards(directory: Path, meta: dict, arrays: dict[str, Any]) -> None:
    """Memory-map the per-rank shard files as whole-table :class:`ShardFiles` views."""
    from .sharded_select import ShardFiles  # numpy only; imported here to keep this module light
    jpath = str(directory / JSON_NAME)
    shards = meta["score_shards"]
    n = meta.get("num_samples")
    ok = (isinstance(shards, list) and shards and
          all(isinstance(s, list) and len(s) == 2 and all(type(v) is int for v in s)
              for s in shards))
    if ok:
        bounds = [v for s in sorted(shards) for v in s]
        ok = bounds[0] == 0 and bounds[-1] == n and all(
            bounds[i] == bounds[i + 1] for i in range(1, len(bounds) - 1, 2))
    if not ok:
        raise damaged(jpath, "score_shards", f"got {shards!r}; allowed: [lo, hi] ranges covering "
                                             f"[0, {n}) without gaps")
    fields = meta.get("sharded_fields", ["scores", "scored"])
    if not (isinstance(fields, list) and set(fields) <= set(SHARDABLE)):
        raise damaged(jpath, "sharded_fields", f"got {fields!r}; allowed: a list of {SHARDABLE}")
    for field in fields:
        parts = []
        for lo, hi in shards:
            path = directory / shard_file(field, lo, hi)
            try:
                a = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise damaged(str(path), field, "missing") from None
            except _NPZ_ERRORS as exc:
                raise damaged(str(path), field, f"unreadable ({exc})") from None
            flag = field.endswith("scored")
            good = a.dtype == np.bool_ if flag else np.issubdtype(a.dtype, np.floating)
            if a.shape != (hi - lo,) or not good:
                raise damaged(str(path), field, f"{a.dtype} of shape {a.shape}; allowed: "
                                                f"{'bool' if flag else 'float'} of shape "
                                                f"({hi - lo},)")
            parts.append((lo, hi, a))
        arrays[field] = ShardFiles(parts, bool if field.endswith("scored") else np.float64)


# ---- validation ----------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return type(v) is int


def _dtype(a: Any) -> np.dtype:
    return np.dtype(getattr(a, "dtype", np.dtype(object)))


def validate_state(meta: dict, arrays: dict[str, Any]) -> None:
    """Every field of a saved state has its type, length and range (raises TeacherStateError).

    Independent of the teacher that will load it (that one checks num_samples and the pass
    against its own run, :meth:`Teacher.load_state_dict`).
    """
    where = meta.get(READ_FROM)
    jf, nf = _file(where, JSON_NAME), _file(where, NPZ_NAME)
    version = meta.get("version")
    if version not in READABLE_VERSIONS:
        raise TeacherStateError(
            f"{jf}: field 'version': teacher state version {version!r} is not one of "
            f"{READABLE_VERSIONS}; it was written by another attent-scale release; {FRESH}")
    n = meta.get("num_samples")
    if not (_is_int(n) and n >= 1):
        raise damaged(jf, "num_samples", f"got {n!r}; allowed: an integer >= 1")
    passes = meta.get("num_passes")
    if not (_is_int(passes) and passes >= 1):
        raise damaged(jf, "num_passes", f"got {passes!r}; allowed: an integer >= 1")
    sp = meta.get("selection_pass")
    if not (_is_int(sp) and -1 <= sp < passes):
        raise damaged(jf, "selection_pass", f"got {sp!r}; allowed: an integer in [-1, {passes})")
    if "identity" in meta and not isinstance(meta["identity"], dict):
        raise damaged(jf, "identity", f"got {type(meta['identity']).__name__}; allowed: an object")

    def file_of(field: str) -> str:
        sharded = "score_shards" in meta and field in meta.get("sharded_fields",
                                                                ["scores", "scored"])
        return _file(where, f"attent_{field}.*.npy") if sharded else nf

    for field, kind in (("scores", "float"), ("scored", "bool"),
                        ("prev_scores", "float"), ("prev_scored", "bool")):
        if field not in arrays:
            if field in ("scores", "scored"):
                raise damaged(nf, field, "missing")
            continue
        a = arrays[field]
        shape = tuple(getattr(a, "shape", ()))
        dt = _dtype(a)
        good = np.issubdtype(dt, np.floating) if kind == "float" else dt == np.bool_
        if not good or shape != (n,):
            raise damaged(file_of(field), field, f"{dt} of shape {shape}; allowed: {kind} of "
                                                 f"shape ({n},) (num_samples)")
    if ("prev_scores" in arrays) != ("prev_scored" in arrays):
        raise damaged(nf, "prev_scores" if "prev_scores" not in arrays else "prev_scored",
                      "missing (saved with its partner, prev_scores/prev_scored)")

    has_ids, has_w = "selection_ids" in arrays, "selection_weights" in arrays
    if has_ids != has_w:
        raise damaged(nf, "selection_weights" if has_ids else "selection_ids",
                      "missing (saved with its partner, selection_ids/selection_weights)")
    if (sp >= 0) != has_ids:
        raise damaged(nf, "selection_ids", f"{'missing' if sp >= 0 else 'present'} while "
                                           f"{jf} says selection_pass {sp}")
    if not has_ids:
        return
    ids, w = np.asarray(arrays["selection_ids"]), np.asarray(arrays["selection_weights"])
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise damaged(nf, "selection_ids", f"{ids.dtype} of shape {ids.shape}; allowed: 1-D "
                                           "integers")
    if len(ids) and (ids[0] < 0 or ids[-1] >= n or np.any(np.diff(ids) <= 0)):
        raise damaged(nf, "selection_ids", f"not unique, ascending ids in [0, {n})")
    if w.shape != ids.shape or not np.issubdtype(w.dtype, np.floating):
        raise damaged(nf, "selection_weights", f"{w.dtype} of shape {w.shape}; allowed: floats, "
                                               f"one per selected id ({len(ids)})")
    if not np.all(np.isfinite(w) & (w > 0)):
        raise damaged(nf, "selection_weights", "not all finite and > 0")


# ---- identity ------------------------------------------------------------------------------------

_LABELS = {"num_samples": "samples", "num_passes": "passes", "global_batch": "global batch",
           "data_seed": "data seed", "pass_sizes": "pass sizes", "sources": "sources",
           "reference": "reference"}
_KINDS: list[tuple[str, str]] = [
    # (key or prefix of a change line, kind); the first match wins, so specific keys come first.
    ("attent.selection.sharding_threshold", "safe"), ("attent.selection.sharding", "safe"),
    ("attent.score_chunk_tokens", "safe"), ("attent.attention.query_chunk", "safe"),
    ("attent.grad_norm.chunk_elements", "safe"), ("attent.grad_norm.method", "safe"),
    ("attent.selection.resample_each_pass", "replan"), ("attent.ratio", "replan"),
    ("attent.interval", "replan"), ("attent.warmup_passes", "replan"),
    ("attent.full_passes_per_round", "replan"), ("attent.final_full_passes", "replan"),
    ("passes", "replan"), ("global batch", "replan"), ("pass sizes", "replan"),
    ("samples", "refuse"), ("data seed", "refuse"), ("identity", "refuse"),
    ("attent:", "refuse"), ("attent.enabled", "refuse"),
    ("attent.", "policy"), ("sources", "policy"), ("reference", "policy"),
]


def identity(cfg_dump: Optional[dict], num_samples: int, num_passes: int, global_batch: int,
             data_seed: int, pass_sizes: list[int], sources: Optional[str] = None,
             reference: Optional[str] = None) -> dict:
    """What a resume must match (JSON-able); ``cfg_dump`` is ``cfg.model_dump()`` or None (off)."""
    return {"attent": cfg_dump, "num_samples": int(num_samples), "num_passes": int(num_passes),
            "global_batch": int(global_batch), "data_seed": int(data_seed),
            "pass_sizes": [int(s) for s in pass_sizes], "sources": sources,
            "reference": reference}


def _show(v: Any) -> str:
    return json.dumps(v)


def _flatten(prefix: str, d: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(f"{prefix}.{key}", value))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def _pass_sizes(a: list, b: list) -> str:
    if len(a) + len(b) <= 24:
        return f"pass sizes: {_show(a)} -> {_show(b)}"
    diff = [i for i in range(max(len(a), len(b)))
            if i >= len(a) or i >= len(b) or a[i] != b[i]]
    i = diff[0]
    old = a[i] if i < len(a) else "none"
    new = b[i] if i < len(b) else "none"
    return (f"pass sizes: {len(a)} passes -> {len(b)}; first difference at pass {i}: "
            f"{old} -> {new} ({len(diff)} passes differ)")


def describe_changes(saved: Optional[dict], current: dict) -> list[str]:
    """One line per difference between a checkpoint's identity and this run's.

    Lines read ``attent.ratio.value: 0.7 -> 0.3`` or ``global batch: 16 -> 48``; [] when
    nothing the plan or the selections depend on changed. :func:`change_kind` classifies them.
    """
    if not isinstance(saved, dict):
        return ["identity: not recorded in the checkpoint (written before attent-scale 2 state) "
                "-> recorded; what changed cannot be told"]
    lines = []
    a, b = saved.get("attent"), current.get("attent")
    if (a is None) != (b is None):
        lines.append(f"attent: {'off' if a is None else 'on'} -> {'off' if b is None else 'on'}")
    elif a is not None:
        fa, fb = _flatten("attent", a), _flatten("attent", b)
        for key in list(fb) + [k for k in fa if k not in fb]:
            if fa.get(key, "<absent>") != fb.get(key, "<absent>"):
                old = _show(fa[key]) if key in fa else "(absent)"
                new = _show(fb[key]) if key in fb else "(absent)"
                lines.append(f"{key}: {old} -> {new}")
    for key, label in _LABELS.items():
        old, new = saved.get(key), current.get(key)
        if old != new:
            lines.append(_pass_sizes(old or [], new or []) if key == "pass_sizes"
                         else f"{label}: {_show(old)} -> {_show(new)}")
    return lines


def change_kind(line: str) -> str:
    """'safe', 'replan', 'policy' or 'refuse' for a line of :func:`describe_changes`."""
    for prefix, kind in _KINDS:
        if line.startswith(prefix):
            return kind
    return "refuse"


def unsafe_changes(saved: Optional[dict], current: dict) -> list[str]:
    """The lines of :func:`describe_changes` that are not ``safe``."""
    return [line for line in describe_changes(saved, current) if change_kind(line) != "safe"]
