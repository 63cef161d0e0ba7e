"""Tests of the teacher's checkpoint: damaged files, field validation, the resumed pass, identity
(attent_scale/teacher_state.py and Teacher.save/read/load_state_dict)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from attent_scale.comm import LocalComm
from attent_scale.config import parse_attent
from attent_scale.teacher import Teacher
from attent_scale.teacher_state import (STATE_VERSION, TeacherStateError, change_kind,
                                        describe_changes, unsafe_changes)

N, G = 64, 16
SIMPLE = {"preset": "attent-simple"}


def _teacher(section=SIMPLE, n=N, passes=4, g=G, **kw):
    return Teacher(parse_attent(section) if section else None, n, passes, g, LocalComm(), **kw)


def _saved(tmp_path, section=SIMPLE, passes=4, selected=True):
    """A teacher after pass 1's selection (or before any pass), saved into tmp_path / 'ckpt'."""
    t = _teacher(section, passes=passes)
    if selected:
        t.begin_pass(0)
        t.record(np.arange(N), np.arange(N, dtype=float), stamp=0)
        t.begin_pass(1)
    t.sync()
    t.save(tmp_path / "ckpt")
    return t, tmp_path / "ckpt"


def _damage(msg: str, file: str, field: str) -> None:
    assert file in msg and f"field '{field}'" in msg, msg
    assert "the teacher checkpoint is damaged" in msg and "--no-resume" in msg, msg


def _rewrite_npz(path, **changes):
    with np.load(path / "attent_state.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    np.savez(path / "attent_state.npz", **arrays)


def _rewrite_json(path, **changes):
    meta = json.loads((path / "attent_state.json").read_text())
    meta.update(changes)
    (path / "attent_state.json").write_text(json.dumps(meta))


# ---- damaged files ----------------------------------------------------------------------------

def test_a_good_checkpoint_reads_and_loads(tmp_path):
    t, path = _saved(tmp_path)
    meta, arrays = Teacher.read(path)
    assert meta["version"] == STATE_VERSION == 2
    r = _teacher()
    r.load_state_dict(meta, arrays, pass_index=1)
    assert r.selection.checksum == t.selection.checksum


def test_truncated_npz(tmp_path):
    _, path = _saved(tmp_path)
    data = (path / "attent_state.npz").read_bytes()
    (path / "attent_state.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(TeacherStateError) as ei:
        Teacher.read(path)
    _damage(str(ei.value), "attent_state.npz", "(whole file)")


def test_corrupt_npz_member_names_the_field(tmp_path):
    _, path = _saved(tmp_path)
    data = bytearray((path / "attent_state.npz").read_bytes())
    # np.savez stores members uncompressed; flip bytes inside the 'scored' member's header
    at = data.index(b"scored.npy") + 40
    data[at:at + 40] = b"\x00" * 40
    (path / "attent_state.npz").write_bytes(bytes(data))
    with pytest.raises(TeacherStateError) as ei:
        Teacher.read(path)
    _damage(str(ei.value), "attent_state.npz", "scored")


def test_truncated_or_non_object_json(tmp_path):
    _, path = _saved(tmp_path)
    text = (path / "attent_state.json").read_text()
    (path / "attent_state.json").write_text(text[:len(text) // 2])
    with pytest.raises(TeacherStateError) as ei:
        Teacher.read(path)
    _damage(str(ei.value), "attent_state.json", "(whole file)")
    assert "not valid JSON" in str(ei.value)
    (path / "attent_state.json").write_text("[1, 2]")
    with pytest.raises(TeacherStateError, match="a JSON object expected, got list"):
        Teacher.read(path)


def test_missing_files(tmp_path):
    _, path = _saved(tmp_path)
    (path / "attent_state.npz").unlink()
    with pytest.raises(TeacherStateError) as ei:
        Teacher.read(path)
    _damage(str(ei.value), "attent_state.npz", "(file)")
    (path / "attent_state.json").unlink()
    with pytest.raises(TeacherStateError, match="attent_state.json: field '\\(file\\)': missing"):
        Teacher.read(path)


def test_object_array_is_refused_without_unpickling(tmp_path):
    _, path = _saved(tmp_path)
    np.savez(path / "attent_state.npz", scores=np.array([object()], dtype=object))
    with pytest.raises(TeacherStateError) as ei:
        Teacher.read(path)
    _damage(str(ei.value), "attent_state.npz", "scores")
    assert "allow_pickle=False" in str(ei.value)


@pytest.mark.parametrize("field, value, words", [
    ("scores", np.zeros(N - 1), "float64 of shape (63,); allowed: float of shape (64,)"),
    ("scores", np.zeros(N, dtype=np.int64), "int64 of shape (64,)"),
    ("scored", np.ones(N, dtype=np.int8), "int8 of shape (64,); allowed: bool"),
    ("scored", None, "missing"),
    ("selection_ids", np.arange(32, 64)[::-1].copy(), "not unique, ascending"),
    ("selection_ids", np.r_[np.arange(32, 63), 62], "not unique, ascending"),
    ("selection_ids", np.arange(33, 65), "not unique, ascending ids in [0, 64)"),
    ("selection_ids", np.arange(32, 64).astype(float), "allowed: 1-D integers"),
    ("selection_weights", np.r_[np.ones(31), np.nan], "not all finite and > 0"),
    ("selection_weights", np.r_[np.ones(31), 0.0], "not all finite and > 0"),
    ("selection_weights", np.ones(31), "one per selected id (32)"),
    ("selection_weights", None, "missing (saved with its partner"),
])
def test_bad_arrays_name_their_field(tmp_path, field, value, words):
    _, path = _saved(tmp_path)
    _rewrite_npz(path, **{field: value})
    with pytest.raises(TeacherStateError) as ei:
        Teacher.read(path)
    _damage(str(ei.value), "attent_state.npz", field)
    assert words in str(ei.value)


@pytest.mark.parametrize("field, value, words", [
    ("selection_pass", 4, "got 4; allowed: an integer in [-1, 4)"),
    ("selection_pass", -2, "got -2"),
    ("selection_pass", "1", "got '1'"),
    ("num_samples", 0, "got 0; allowed: an integer >= 1"),
    ("num_passes", 1.5, "got 1.5"),
    ("identity", [1], "allowed: an object"),
])
def test_bad_json_fields_name_their_field(tmp_path, field, value, words):
    _, path = _saved(tmp_path)
    _rewrite_json(path, **{field: value})
    with pytest.raises(TeacherStateError) as ei:
        Teacher.read(path)
    _damage(str(ei.value), "attent_state.json", field)
    assert words in str(ei.value)


def test_selection_and_selection_pass_must_agree(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite_json(path, selection_pass=-1)
    with pytest.raises(TeacherStateError, match="field 'selection_ids': present while"):
        Teacher.read(path)
    _, path = _saved(tmp_path / "b", selected=False)
    _rewrite_json(path, selection_pass=1)
    with pytest.raises(TeacherStateError, match="field 'selection_ids': missing while"):
        Teacher.read(path)


def test_version_and_other_dataset_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    meta, arrays = Teacher.read(path)
    with pytest.raises(TeacherStateError, match="version 999 is not one of"):
        _teacher().load_state_dict({**meta, "version": 999}, arrays)
    with pytest.raises(TeacherStateError, match="is for 64 samples but the dataset has 80"):
        _teacher(n=80).load_state_dict(meta, arrays)
    # a version-1 checkpoint (no identity) still loads
    v1 = {k: v for k, v in meta.items() if k != "identity"}
    _teacher().load_state_dict({**v1, "version": 1}, arrays)


def test_selection_pass_beyond_this_runs_plan_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(TeacherStateError, match="got 1 but this run plans 1 passes"):
        _teacher(passes=1).load_state_dict(*Teacher.read(path))


def test_prev_scores_need_their_partner(tmp_path):
    section = {"preset": "attent-soft", "score": "drop"}
    _, path = _saved(tmp_path, section)
    _rewrite_npz(path, prev_scored=None)
    with pytest.raises(TeacherStateError) as ei:
        Teacher.read(path)
    _damage(str(ei.value), "attent_state.npz", "prev_scored")


# ---- sharded files -----------------------------------------------------------------------------

def _sharded_ckpt(tmp_path):
    """A sharded-format checkpoint written by two simulated ranks (LocalComm-like objects)."""
    from test_sharded_select import run_threads
    cfg = parse_attent({"preset": "attent-soft", "score": "drop",
                        "selection": {"sharding": "sharded"}})

    def rank(c):
        t = Teacher(cfg, N, 3, G, c)
        t.begin_pass(0)
        t.record(np.arange(c.rank, N, 2), np.arange(c.rank, N, 2) * 1.0, stamp=0)
        t.sync()
        t.save(tmp_path / "sharded")
        return t

    run_threads(2, rank)
    return tmp_path / "sharded"


def test_sharded_checkpoint_files(tmp_path):
    path = _sharded_ckpt(tmp_path)
    meta, arrays = Teacher.read(path)
    assert meta["sharded_fields"] == ["scores", "scored", "prev_scores", "prev_scored"]
    one = _teacher({"preset": "attent-soft", "score": "drop"}, passes=3)
    one.load_state_dict(meta, arrays)
    assert one.scored.all() and np.array_equal(one.scores, np.arange(N, dtype=float))
    # a missing shard, a shard of the wrong length, and shard ranges with a gap
    broken = shutil.copytree(path, tmp_path / "missing")
    (broken / "attent_prev_scores.32-64.npy").unlink()
    with pytest.raises(TeacherStateError) as ei:
        Teacher.read(broken)
    _damage(str(ei.value), "attent_prev_scores.32-64.npy", "prev_scores")
    short = shutil.copytree(path, tmp_path / "short")
    np.save(short / "attent_scores.0-32.npy", np.zeros(31))
    with pytest.raises(TeacherStateError, match=r"float64 of shape \(31,\); allowed: float of "
                                                r"shape \(32,\)"):
        Teacher.read(short)
    gap = shutil.copytree(path, tmp_path / "gap")
    _rewrite_json(gap, score_shards=[[0, 30], [32, 64]])
    with pytest.raises(TeacherStateError) as ei:
        Teacher.read(gap)
    _damage(str(ei.value), "attent_state.json", "score_shards")


# ---- the resumed pass --------------------------------------------------------------------------

def test_pass_index_must_match_the_saved_selection_pass(tmp_path):
    _, path = _saved(tmp_path)  # selection_pass 1 (attent-simple: one round from pass 1 on)
    for ok in (1, 2):  # inside pass 1, or at the start of pass 2
        _teacher().load_state_dict(*Teacher.read(path), pass_index=ok)
    with pytest.raises(TeacherStateError) as ei:
        _teacher().load_state_dict(*Teacher.read(path), pass_index=0)
    msg = str(ei.value)
    assert "field 'selection_pass': got 1 but the trainer resumes pass 0" in msg
    assert "ahead of the trainer's progress" in msg and "fix:" in msg
    with pytest.raises(TeacherStateError, match="behind: passes 2..2 never began"):
        _teacher().load_state_dict(*Teacher.read(path), pass_index=3)
    with pytest.raises(ValueError, match="pass_index: got 5"):
        _teacher().load_state_dict(*Teacher.read(path), pass_index=5)
    # the finished run: pass_index == num_passes after the last pass
    _teacher(passes=2).load_state_dict(*Teacher.read(path), pass_index=2)


def test_pass_index_keeps_the_rounds_selection_when_resuming_at_a_pass_start(tmp_path):
    # attent-complex without resampling: 0 full, 1 round 0, 2 full, 3-4 round 1 (selects at 3)
    section = {"preset": "attent-complex", "selection": {"resample_each_pass": False}}
    t = _teacher(section, passes=10, g=4)
    for p in range(4):
        pool = t.pool_ids(p)
        if pool is not None:
            t.record(pool, np.arange(len(pool), dtype=float), stamp=p)
        t.begin_pass(p)
    t.save(tmp_path / "p3")
    r = _teacher(section, passes=10, g=4)
    r.load_state_dict(*Teacher.read(tmp_path / "p3"), pass_index=4)
    sel, summary = r.begin_pass(4)  # keeps round 1's selection, no new draw
    assert summary is None and sel.checksum == t.selection.checksum
    with pytest.raises(TeacherStateError, match="behind: passes 4..4 never began"):
        _teacher(section, passes=10, g=4).load_state_dict(*Teacher.read(tmp_path / "p3"),
                                                          pass_index=5)


def test_identity_is_saved_and_describes_changes(tmp_path):
    t, path = _saved(tmp_path)
    meta, _ = Teacher.read(path)
    ident = meta["identity"]
    assert ident["attent"] == parse_attent(SIMPLE).model_dump()
    assert (ident["num_samples"], ident["num_passes"], ident["global_batch"],
            ident["data_seed"]) == (64, 4, 16, 0)
    assert ident["pass_sizes"] == [64, 32, 32, 32] == [t.pass_size(p) for p in range(4)]
    assert ident["sources"] is None and ident["reference"] is None
    assert t.changes_since(meta) == []
    other = _teacher({"preset": "attent-simple", "ratio": {"value": 0.3},
                      "selection": {"sharding": "gather"}}, g=8, passes=5)
    lines = other.changes_since(meta)
    assert lines == [
        'attent.ratio.value: 0.7 -> 0.3',
        'attent.selection.sharding: "auto" -> "gather"',
        'passes: 4 -> 5',
        'global batch: 16 -> 8',
        'pass sizes: [64, 32, 32, 32] -> [64, 16, 16, 16, 16]',
    ]
    assert [change_kind(line) for line in lines] == ["replan", "safe", "replan", "replan",
                                                     "replan"]
    assert unsafe_changes(meta["identity"], other.identity) == [lines[0]] + lines[2:]


def test_describe_changes_lines_and_kinds():
    cfg = parse_attent(SIMPLE)
    base = _teacher(SIMPLE).identity
    assert describe_changes(base, base) == []
    src = _teacher(SIMPLE, sources=np.zeros(N, np.int64)).identity
    ref = _teacher({**SIMPLE, "score": "reducible"}, reference=np.zeros(N)).identity
    seeded = _teacher({**SIMPLE, "seed": 5}, data_seed=3).identity
    off = _teacher(None).identity
    assert describe_changes(base, seeded) == ["attent.seed: 0 -> 5", "data seed: 0 -> 3"]
    assert [change_kind(x) for x in describe_changes(base, seeded)] == ["policy", "refuse"]
    (line,) = describe_changes(base, src)
    assert line.startswith("sources: null -> \"") and change_kind(line) == "policy"
    lines = describe_changes(base, ref)
    assert lines[0] == 'attent.score: "raw" -> "reducible"' and lines[1].startswith("reference:")
    assert describe_changes(base, off) == ["attent: on -> off",
                                           "pass sizes: [64, 32, 32, 32] -> [64, 64, 64, 64]"]
    assert change_kind("attent: on -> off") == "refuse"
    assert describe_changes(None, base)[0].startswith("identity: not recorded")
    assert change_kind(describe_changes(None, base)[0]) == "refuse"
    assert change_kind("samples: 64 -> 80") == "refuse"
    for key in ("attent.score_chunk_tokens", "attent.attention.query_chunk",
                "attent.grad_norm.chunk_elements", "attent.grad_norm.method",
                "attent.selection.sharding_threshold"):
        assert change_kind(f"{key}: 1 -> 2") == "safe", key
    for key in ("attent.final_full_passes", "attent.warmup_passes", "attent.interval.every",
                "attent.selection.resample_each_pass", "attent.full_passes_per_round"):
        assert change_kind(f"{key}: 1 -> 2") == "replan", key
    for key in ("attent.selection.method", "attent.signal", "attent.selection.per_source",
                "attent.attention.layers", "attent.preset"):
        assert change_kind(f"{key}: 1 -> 2") == "policy", key
    # long plans: a summary instead of two long lists
    long_a = {**base, "pass_sizes": [64] * 40}
    long_b = {**base, "pass_sizes": [64] * 20 + [32] * 20}
    assert describe_changes(long_a, long_b) == [
        "pass sizes: 40 passes -> 40; first difference at pass 20: 64 -> 32 (20 passes differ)"]
    assert cfg.model_dump() == base["attent"]
