"""Corpus preparation on a small copy of standard-library files (CPU, a few seconds)."""
from __future__ import annotations

import json
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from attent_scale import data
from attent_scale.data import (EOS_ID, SourceFile, list_source_files, load_tokenizer, main,
                               prepare_corpus, split_files)

SEQ_LEN = 32
VOCAB = 384
VAL_FRACTION = 0.1


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """~30 standard-library modules (5-30 kB each), some in a sub-package, copied to tmp."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    picked = [p for p in sorted(stdlib.glob("*.py")) if 5_000 <= p.stat().st_size <= 30_000][:30]
    assert len(picked) >= 20
    root = tmp_path_factory.mktemp("src")
    for i, p in enumerate(picked):
        dest = root / ("pkg" if i % 4 == 0 else "") / p.name
        dest.parent.mkdir(exist_ok=True)
        shutil.copyfile(p, dest)
    (root / "pkg" / "__init__.py").write_text("")  # empty: skipped
    (root / "notes.txt").write_text("not python")  # not *.py: skipped
    return root


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "corpus"
    meta = prepare_corpus(out, seq_len=SEQ_LEN, vocab_size=VOCAB, val_fraction=VAL_FRACTION,
                          source_dir=source, progress=False, shard_bytes=1 << 14)
    return out, meta


def corpus_text(source: Path) -> str:
    return "".join(f.path.read_text() for f in list_source_files(source))


def read_split(out: Path, split: str) -> np.ndarray:
    """Every sample of a split through streaming.StreamingDataset, as one [N, seq_len] array."""
    import streaming
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = streaming.StreamingDataset(local=str(out / split), shuffle=False, batch_size=1)
    rows = [ds[i]["tokens"] for i in range(len(ds))]
    for r in rows:
        assert r.dtype == np.int32 and r.shape == (SEQ_LEN,)
    return np.stack(rows)


def test_meta_and_files(prepared, source):
    out, meta = prepared
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (out / "tokenizer.model").is_file()
    files = list_source_files(source)
    assert [f.rel for f in files] == sorted(f.rel for f in files)
    assert all(f.rel.endswith(".py") and f.size > 0 for f in files)
    assert meta["train_files"] + meta["val_files"] == len(files)
    assert meta["train_files"] >= 1 and meta["val_files"] >= 1
    assert meta["num_train"] == meta["train_tokens"] // SEQ_LEN
    assert meta["num_val"] == meta["val_tokens"] // SEQ_LEN
    assert (meta["seq_len"], meta["vocab_size"], meta["eos_id"]) == (SEQ_LEN, VOCAB, EOS_ID)
    assert meta["source"] == str(source.resolve())
    # several shards with the small shard_bytes, and no temporary directory left behind
    assert len(list((out / "train").glob("shard.*.mds"))) > 1
    assert [p.name for p in out.parent.iterdir()] == ["corpus"]
    # one source, the tree; its fingerprint is still the legacy formula over files and model
    assert meta["sources"] == [source.name] and meta["inputs"][0]["files"] == len(files)
    assert (meta["token_column"], meta["source_column"]) == ("tokens", "source")
    assert meta["fingerprint"] == data.fingerprint(files, SEQ_LEN, VOCAB, VAL_FRACTION, 0,
                                                   (out / "tokenizer.model").read_bytes())
    assert meta["tokenizer_origin"]["kind"] == "sentencepiece-trained"


def test_split_by_file_disjoint_and_deterministic(source):
    files = list_source_files(source)
    train, val = split_files(files, VAL_FRACTION, seed=0)
    again = split_files(list(reversed(files)), VAL_FRACTION, seed=0)
    assert {f.rel for f in train} == {f.rel for f in again[0]}
    assert {f.rel for f in val} == {f.rel for f in again[1]}
    assert not {f.rel for f in train} & {f.rel for f in val}
    assert {f.rel for f in train} | {f.rel for f in val} == {f.rel for f in files}
    other = split_files(files, VAL_FRACTION, seed=1)
    assert {f.rel for f in other[1]} != {f.rel for f in val}  # the seed matters


def test_split_guarantees_both_sides():
    files = [SourceFile(f"m{i}.py", Path(f"m{i}.py"), 10) for i in range(5)]
    train, val = split_files(files, 1e-4, seed=0)
    assert len(val) == 1 and len(train) == 4
    train, val = split_files(files, 0.9999, seed=0)
    assert len(train) == 1 and len(val) == 4
    with pytest.raises(ValueError, match="at least 2 source files"):
        split_files(files[:1], 0.5, seed=0)


def test_preparation_is_deterministic(prepared, source, tmp_path):
    out, meta = prepared
    meta2 = prepare_corpus(tmp_path / "again", seq_len=SEQ_LEN, vocab_size=VOCAB,
                           val_fraction=VAL_FRACTION, source_dir=source, progress=False)
    assert meta2["fingerprint"] == meta["fingerprint"]
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == \
        (out / "tokenizer.model").read_bytes()


def test_train_samples(prepared, source):
    out, meta = prepared
    train = read_split(out, "train")
    assert train.shape == (meta["num_train"], SEQ_LEN)
    assert train.min() >= 0 and train.max() < VOCAB
    sp = load_tokenizer(out)
    assert sp.get_piece_size() == VOCAB
    # the first sample starts at the first train file: its text is in the source
    text = sp.decode(train[0].tolist()).rstrip("\ufffd")
    assert len(text) > SEQ_LEN
    assert text in corpus_text(source)
    # files are separated by EOS
    assert (train == EOS_ID).sum() >= 1


def test_packing_of_the_py_tree_is_unchanged(prepared, source):
    """The legacy recipe, restated: train files in sorted order, each encoded and followed by
    EOS, joined and cut into seq_len rows (the rest dropped); every row from source 0."""
    import streaming
    from streaming.base.util import clean_stale_shared_memory

    out, meta = prepared
    sp = load_tokenizer(out)
    train_files, _ = split_files(list_source_files(source), VAL_FRACTION, seed=0)
    stream = [t for f in train_files for t in sp.encode(f.path.read_text()) + [EOS_ID]]
    assert len(stream) == meta["train_tokens"]
    n = len(stream) // SEQ_LEN
    np.testing.assert_array_equal(read_split(out, "train"),
                                  np.array(stream[:n * SEQ_LEN]).reshape(n, SEQ_LEN))
    clean_stale_shared_memory()
    ds = streaming.StreamingDataset(local=str(out / "train"), shuffle=False, batch_size=1)
    assert {int(ds[i]["source"]) for i in range(len(ds))} == {0}


def test_val_samples(prepared):
    out, meta = prepared
    val = read_split(out, "val")
    assert val.shape == (meta["num_val"], SEQ_LEN)
    assert val.min() >= 0 and val.max() < VOCAB


def test_tokenizer_round_trips_code(prepared, source):
    out, _ = prepared
    sp = load_tokenizer(out)
    for f in list_source_files(source)[:5]:
        text = f.path.read_text()
        assert sp.decode(sp.encode(text)) == text
    snippet = "def f(x):\n\tif x:\n        return {'a': 1}  # ünïcödé ✓\n\n"
    assert sp.decode(sp.encode(snippet)) == snippet


def test_second_call_is_a_noop(prepared, source):
    out, meta = prepared
    mtime = (out / "meta.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = prepare_corpus(out, seq_len=SEQ_LEN, vocab_size=VOCAB, val_fraction=VAL_FRACTION,
                           source_dir=source, progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert again == meta
    assert (out / "meta.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("change", [{"seq_len": 64}, {"vocab_size": 512}, {"seed": 1},
                                    {"val_fraction": 0.2}, {"max_bytes": 100_000}])
def test_changed_parameter_is_refused(prepared, source, change):
    out, _ = prepared
    kwargs = dict(seq_len=SEQ_LEN, vocab_size=VOCAB, val_fraction=VAL_FRACTION,
                  source_dir=source, progress=False)
    kwargs.update(change)
    key = next(iter(change))
    with pytest.raises(ValueError, match=key) as err:
        prepare_corpus(out, **kwargs)
    assert "another out_dir" in str(err.value)


def test_changed_source_is_refused(prepared, source, tmp_path):
    out, _ = prepared
    other = tmp_path / "other"
    shutil.copytree(source, other)
    with pytest.raises(ValueError, match="source"):
        prepare_corpus(out, seq_len=SEQ_LEN, vocab_size=VOCAB, val_fraction=VAL_FRACTION,
                       source_dir=other, progress=False)


@pytest.mark.parametrize("kwargs, name", [
    ({"seq_len": 1}, "seq_len"),
    ({"seq_len": 16.0}, "seq_len"),
    ({"vocab_size": 200}, "vocab_size"),
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"shard_bytes": 0}, "shard_bytes"),
])
def test_bad_arguments(source, tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        prepare_corpus(tmp_path / "out", source_dir=source, progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_source_dir(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("# no python here")
    with pytest.raises(ValueError, match="no non-empty .py files"):
        prepare_corpus(tmp_path / "out", source_dir=empty, progress=False)
    with pytest.raises(ValueError, match="source_dir"):
        prepare_corpus(tmp_path / "out", source_dir=tmp_path / "missing", progress=False)
    assert not (tmp_path / "out").exists()


def test_failure_leaves_nothing_behind(source, tmp_path):
    # every file fits one sequence of 10**6 tokens only by far: the splits are too small
    with pytest.raises(ValueError, match="seq_len"):
        prepare_corpus(tmp_path / "out", seq_len=10 ** 6, vocab_size=VOCAB, source_dir=source,
                       progress=False)
    assert list(tmp_path.iterdir()) == []


def test_not_a_corpus_dir_is_refused(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(ValueError, match="no meta.json"):
        prepare_corpus(out, source_dir=source, progress=False)


def test_max_bytes_takes_a_sorted_prefix(source):
    files = list_source_files(source)
    cap = sum(f.size for f in files[:7]) + files[7].size // 2
    capped = list_source_files(source, cap)
    assert capped == files[:7]


def test_character_coverage_fits_small_vocab():
    # 200 characters of geometrically falling frequency: 98% coverage needs ~80 of them,
    # 99.99% nearly all
    sample = ["".join(chr(0x100 + i) * (int(10_000 * 0.95 ** i) + 1) for i in range(200))]
    cov = data._character_coverage(sample, vocab_size=400)
    assert data.MIN_CHARACTER_COVERAGE <= cov < data.TARGET_CHARACTER_COVERAGE
    with pytest.raises(ValueError, match="vocab_size=320"):
        data._character_coverage(sample, vocab_size=320)


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="attent-prepare"):
        load_tokenizer(tmp_path)


def test_cli(prepared, source, capsys):
    out, meta = prepared
    assert main(["--out", str(out), "--seq-len", str(SEQ_LEN), "--vocab-size", str(VOCAB),
                 "--val-fraction", str(VAL_FRACTION), "--source-dir", str(source)]) == 0
    printed = capsys.readouterr().out
    assert "already prepared" in printed and meta["fingerprint"] in printed
    with pytest.raises(SystemExit) as err:
        main(["--out", str(out), "--seq-len", "1"])
    assert err.value.code == 2
    assert "seq_len" in capsys.readouterr().err
