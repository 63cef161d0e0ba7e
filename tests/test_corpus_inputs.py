"""Bring your own corpus and tokenizer: input kinds, per-source packing, errors, external MDS.

Expected values are computed here from the documents themselves: the split from the documented
hash rule, the tokens with the ``tokenizers`` library directly (not through the code under test).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from attent_scale.corpus import open_corpus
from attent_scale.corpus_tokenizer import (TOKENIZER_CHUNK_CHARS, TokenizerSample,
                                           corpus_tokenizer_size, load_corpus_tokenizer)
from attent_scale.data import load_tokenizer, main, prepare_corpus

SEQ = 16
SEED = 3
FRAC = 0.25
WORDS = ("the a of to in data model token corpus teacher selects examples each pass loss "
         "gradient learner attention layer sample batch shard stream café naïve ✓ 42 7 "
         "def return if else for while ( ) : , . ; - \n \n\n").split(" ")
EOT = "<|endoftext|>"


def make_docs(n: int, seed: int, lo: int = 10, hi: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def bucket_val(key: str, seed: int = SEED, frac: float = FRAC) -> bool:
    """The documented split rule, restated: blake2b-8 of "seed\\0key" mod 10_000 < frac * 1e4."""
    h = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % 10_000 < frac * 10_000


# --------------------------------------------------------------------------------------------
# fixtures: inputs of every kind and a Hugging Face tokenizer made here


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Every kind of input; returns {name: (spec, [(key, text)] in reading order)}."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path_factory.mktemp("inputs")
    out = {}
    # text files: one document per file, any extension, .gz and .zst decompressed
    tree = root / "tree"
    (tree / "sub").mkdir(parents=True)
    texts = make_docs(9, 1, 40, 200)
    names = ["a.txt", "b.md", "sub/c.rst.gz", "sub/d.txt", "e.txt.zst", "f.rst", "g.txt",
             "sub/h.txt.gz", "i.txt"]
    for name, text in zip(names, texts):
        data = text.encode()
        if name.endswith(".gz"):
            data = gzip.compress(data)
        elif name.endswith(".zst"):
            data = zstandard.ZstdCompressor().compress(data)
        (tree / name).write_bytes(data)
    (tree / "empty.txt").write_bytes(b"")  # listed by the glob, skipped: no text
    out["tree"] = (f"tree=text:{tree}/**/*", sorted(zip(names, texts)))
    # JSON Lines, gzip-compressed, with a blank line and an empty record (both skipped)
    recs = make_docs(30, 2)
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(recs)]
    lines.insert(5, "")
    lines.insert(9, json.dumps({"id": -1, "text": ""}))
    (root / "jl").mkdir()
    (root / "jl" / "rec.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode() + b"\n"))
    keyed = [(f"rec.jsonl.gz:{n}", json.loads(line)["text"])
             for n, line in enumerate(lines, 1) if line and json.loads(line)["text"]]
    out["jl"] = (f"jl=jsonl:{root}/jl/*.jsonl.gz", keyed)
    # Parquet with the text in "body" (a per-source --text-field)
    rows = make_docs(25, 3)
    (root / "pq").mkdir()
    pq.write_table(pa.table({"id": list(range(25)), "body": rows}), root / "pq" / "rows.parquet",
                   row_group_size=7)
    out["pq"] = (f"pq=parquet:{root}/pq/*.parquet", [(f"rows.parquet:{i}", t)
                                                     for i, t in enumerate(rows)])
    # a datasets dataset saved to disk, and JSON files through datasets.load_dataset
    disk = make_docs(20, 4)
    datasets.Dataset.from_dict({"text": disk, "n": list(range(20))}).save_to_disk(
        str(root / "disk"))
    out["disk"] = (f"disk=hf-disk:{root}/disk", [(str(i), t) for i, t in enumerate(disk)])
    hfj = make_docs(15, 5)
    (root / "hfj").mkdir()
    for part, chunk in enumerate((hfj[:8], hfj[8:])):
        (root / "hfj" / f"p{part}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in chunk))
    out["hfj"] = (f"hfj=hf:json:{root}/hfj/*.jsonl", [(str(i), t) for i, t in enumerate(hfj)])
    return out


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory, inputs) -> dict:
    """A byte-level BPE trained here: as a tokenizer directory (eos <|endoftext|>, one added
    token past the trained vocabulary), as a bare tokenizer.json, and a directory without eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("hf_tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT, "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for _, docs in inputs.values() for _, t in docs], trainer)
    tok.save(str(root / "bpe-300.json"))  # any name: the corpus copy is tokenizer.json
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token="<pad>")
    hf.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    hf.save_pretrained(str(root / "dir"))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(root / "no_eos"))
    return {"dir": root / "dir", "json": root / "bpe-300.json", "no_eos": root / "no_eos",
            "size": len(hf), "eos": tok.token_to_id(EOT), "raw": root / "bpe-300.json"}


def expected(docs: list[tuple[str, str]], encode, eos: int, whole_files: bool = False) -> dict:
    """Per-source figures from the documents: the split by the hash rule, tokens + eos each."""
    split = {k: bucket_val(k) for k, _ in docs}
    if whole_files:  # the at-least-one-file-per-side rule must not have moved anything here
        assert 0 < sum(split.values()) < len(split)
    streams = {False: [], True: []}
    for k, t in docs:
        streams[split[k]].extend(list(encode(t)) + [eos])
    tr, va = streams[False], streams[True]
    return {"documents": len(docs), "val_documents": sum(split.values()),
            "train_tokens": len(tr), "val_tokens": len(va), "num_train": len(tr) // SEQ,
            "num_val": len(va) // SEQ, "first_train": tr[:SEQ], "first_val": va[:SEQ]}


def read_split(out: Path, split: str, token_column: str = "tokens") -> tuple[np.ndarray, ...]:
    """(tokens [N, SEQ], source ids [N]) of every sample, in order, from the shard files."""
    from streaming.base.format import reader_from_json

    index = json.loads((out / split / "index.json").read_text())
    toks, srcs = [], []
    for shard in index["shards"]:
        reader = reader_from_json(str(out), split, shard)
        for i in range(shard["samples"]):
            s = reader.decode_sample(reader.get_sample_data(i))
            toks.append(s[token_column])
            srcs.append(int(s.get("source", -1)))
    return np.stack(toks), np.array(srcs)


def check_sources(out: Path, meta: dict, inputs: dict, encode, eos: int) -> None:
    names = list(inputs)
    assert meta["sources"] == names
    assert meta["token_column"] == "tokens" and meta["source_column"] == "source"
    for split in ("train", "val"):
        toks, srcs = read_split(out, split)
        assert toks.dtype == np.int32 and toks.shape[1] == SEQ
        assert toks.max() < meta["vocab_size"]
        for sid, name in enumerate(names):
            want = expected(inputs[name][1], encode, eos, whole_files=name == "tree")
            got = meta["inputs"][sid]
            assert got["name"] == name
            for k in ("documents", "val_documents", "train_tokens", "val_tokens", "num_train",
                      "num_val"):
                assert got[k] == want[k], (name, k)
            mine = toks[srcs == sid]
            assert len(mine) == want[f"num_{split}"], (name, split)
            # a source's sequences are contiguous and start with its first document's tokens
            first = int(np.argmax(srcs == sid))
            assert (srcs[first:first + len(mine)] == sid).all()
            assert want[f"num_{split}"] > 0
            assert mine[0].tolist() == want[f"first_{split}"]
    assert meta["num_train"] == sum(s["num_train"] for s in meta["inputs"])
    assert meta["num_val"] == sum(s["num_val"] for s in meta["inputs"])


SPECS_TEXT_FIELDS = ["pq=body"]


def specs(inputs) -> list[str]:
    return [spec for spec, _ in inputs.values()]


# --------------------------------------------------------------------------------------------
# building from every kind of input


@pytest.fixture(scope="module")
def hf_corpus(inputs, hf_tok, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("hfc") / "corpus"
    meta = prepare_corpus(out, seq_len=SEQ, val_fraction=FRAC, seed=SEED, progress=False,
                          inputs=specs(inputs), text_field=SPECS_TEXT_FIELDS,
                          tokenizer=hf_tok["dir"], workers=1)
    return out, meta


def test_every_kind_with_a_hugging_face_tokenizer(hf_corpus, inputs, hf_tok):
    from tokenizers import Tokenizer

    out, meta = hf_corpus
    raw = Tokenizer.from_file(str(hf_tok["raw"]))
    check_sources(out, meta, inputs, lambda t: raw.encode(t, add_special_tokens=False).ids,
                  hf_tok["eos"])
    assert meta["eos_id"] == hf_tok["eos"] == 0
    assert meta["pad_id"] == 1
    # the embedding must hold the added token past the trained 300
    assert meta["vocab_size"] == hf_tok["size"] == 301 == corpus_tokenizer_size(out)
    origin = meta["tokenizer_origin"]
    assert origin["kind"] == "huggingface" and origin["path"] == str(hf_tok["dir"])
    assert origin["size"] == 301 and origin["eos_token"] == EOT
    assert "tokenizer.json" in origin["files"] and len(origin["sha256"]) == 64
    assert meta["tokenizer"] == "tokenizer" and (out / "tokenizer" / "tokenizer.json").is_file()
    tok = load_corpus_tokenizer(out)
    assert tok.decode(tok.encode("naïve café ✓")) == "naïve café ✓"
    with pytest.raises(FileNotFoundError, match="load_corpus_tokenizer"):
        load_tokenizer(out)
    assert open_corpus(out) == meta


def test_every_kind_with_a_trained_sentencepiece(inputs, tmp_path):
    out = tmp_path / "corpus"
    meta = prepare_corpus(out, seq_len=SEQ, vocab_size=320, val_fraction=FRAC, seed=SEED,
                          progress=False, inputs=specs(inputs), text_field=SPECS_TEXT_FIELDS,
                          workers=1)
    sp = load_tokenizer(out)
    check_sources(out, meta, inputs, sp.encode, 3)
    assert (meta["eos_id"], meta["vocab_size"], corpus_tokenizer_size(out)) == (3, 320, 320)
    assert meta["tokenizer_origin"]["kind"] == "sentencepiece-trained"

    # the same model brought as --tokenizer file.model, encoded by 2 worker processes: the
    # same samples, another fingerprint (another tokenizer identity)
    model = tmp_path / "mine.model"
    shutil.copyfile(out / "tokenizer.model", model)
    again = prepare_corpus(tmp_path / "again", seq_len=SEQ, val_fraction=FRAC, seed=SEED,
                           progress=False, inputs=specs(inputs), text_field=SPECS_TEXT_FIELDS,
                           tokenizer=model, workers=2)
    assert again["tokenizer_origin"]["kind"] == "sentencepiece"
    assert again["tokenizer_origin"]["sha256"] == hashlib.sha256(
        b"mine.model\0" + str(model.stat().st_size).encode() + b"\0" + model.read_bytes()
    ).hexdigest()
    assert (again["eos_id"], again["vocab_size"]) == (3, 320)
    assert again["fingerprint"] != meta["fingerprint"]
    for split in ("train", "val"):
        for a, b in zip(read_split(out, split), read_split(tmp_path / "again", split)):
            np.testing.assert_array_equal(a, b)


def test_worker_count_does_not_change_the_output(inputs, hf_tok, tmp_path):
    kw = dict(seq_len=SEQ, val_fraction=FRAC, seed=SEED, progress=False,
              inputs=[inputs["jl"][0], inputs["tree"][0]], tokenizer=hf_tok["json"],
              eos_token=EOT)
    one = prepare_corpus(tmp_path / "one", workers=1, **kw)
    three = prepare_corpus(tmp_path / "three", workers=3, **kw)
    assert one == three
    for split in ("train", "val"):
        a = sorted((tmp_path / "one" / split).iterdir())
        b = sorted((tmp_path / "three" / split).iterdir())
        assert [p.name for p in a] == [p.name for p in b]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert one["tokenizer_origin"]["kind"] == "tokenizers"
    assert one["eos_id"] == hf_tok["eos"] and one["vocab_size"] == 300
    assert corpus_tokenizer_size(tmp_path / "one") == 300
    assert load_corpus_tokenizer(tmp_path / "one").decode([hf_tok["eos"]]) == EOT
    # the copied bare tokenizer.json loads with AutoTokenizer, with its eos token
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(tmp_path / "one" / "tokenizer")).eos_token == EOT


def test_hugging_face_tokenizer_in_workers(hf_corpus, inputs, hf_tok, tmp_path):
    out, meta = hf_corpus
    again = prepare_corpus(tmp_path / "w2", seq_len=SEQ, val_fraction=FRAC, seed=SEED,
                           progress=False, inputs=specs(inputs), text_field=SPECS_TEXT_FIELDS,
                           tokenizer=hf_tok["dir"], workers=2)
    assert again == meta
    for split in ("train", "val"):
        files = sorted(p.name for p in (out / split).iterdir())
        assert files == sorted(p.name for p in (tmp_path / "w2" / split).iterdir())
        assert all((out / split / f).read_bytes() == (tmp_path / "w2" / split / f).read_bytes()
                   for f in files)


def test_reuse_and_refusal_with_inputs(hf_corpus, inputs, hf_tok, tmp_path):
    out, meta = hf_corpus
    kw = dict(seq_len=SEQ, val_fraction=FRAC, seed=SEED, progress=False, inputs=specs(inputs),
              text_field=SPECS_TEXT_FIELDS, tokenizer=hf_tok["dir"])
    assert prepare_corpus(out, **kw) == meta
    with pytest.raises(ValueError, match="tokenizer_origin") as err:
        prepare_corpus(out, **{**kw, "tokenizer": hf_tok["json"], "eos_token": EOT})
    assert "another out_dir" in str(err.value)
    with pytest.raises(ValueError, match=r"source: existing .*field=body.* vs requested "
                                         r".*field=text"):
        prepare_corpus(out, **{**kw, "text_field": None})
    with pytest.raises(ValueError, match="vocab_size: existing 301 vs requested 512"):
        prepare_corpus(out, **{**kw, "vocab_size": 512})


def test_changed_input_file_is_refused(inputs, hf_tok, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(make_docs(6, 9, 50, 100)):
        (src / f"{i}.txt").write_text(t)
    kw = dict(seq_len=SEQ, val_fraction=0.5, progress=False, inputs=[f"{src}/*.txt"],
              tokenizer=hf_tok["dir"])
    meta = prepare_corpus(tmp_path / "c", **kw)
    assert meta["sources"] == [f"{src}/*.txt"]
    (src / "0.txt").write_text("changed")
    with pytest.raises(ValueError, match="source files changed"):
        prepare_corpus(tmp_path / "c", **kw)


def test_vocab_size_below_the_tokenizer_is_refused(inputs, hf_tok, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=200 is smaller than the 301 ids"):
        prepare_corpus(tmp_path / "c", inputs=[inputs["jl"][0]], tokenizer=hf_tok["dir"],
                       vocab_size=200, progress=False)
    meta = prepare_corpus(tmp_path / "c", seq_len=SEQ, inputs=[inputs["jl"][0]],
                          tokenizer=hf_tok["dir"], vocab_size=384, val_fraction=FRAC,
                          progress=False)
    assert meta["vocab_size"] == 384 and corpus_tokenizer_size(tmp_path / "c") == 301


# --------------------------------------------------------------------------------------------
# errors: one line naming the file and the place


def build_error(tmp_path, inputs_, **kw) -> str:
    with pytest.raises(ValueError) as err:
        prepare_corpus(tmp_path / "out", seq_len=SEQ, vocab_size=320, progress=False,
                       inputs=inputs_, **kw)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_malformed_jsonl_record(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken",\n')
    msg = build_error(tmp_path, [f"jsonl:{f}"])
    assert msg.startswith(f"{f} line 3: not valid JSON (")


def test_missing_text_field(tmp_path):
    f = tmp_path / "d.jsonl.zst"
    import zstandard
    f.write_bytes(zstandard.ZstdCompressor().compress(
        b'{"text": "a"}\n{"text": "b"}\n{"body": "c", "id": 3}\n'))
    msg = build_error(tmp_path, [f"jsonl:{f}"])
    assert msg == (f"{f} line 3: no field 'text' (fields: body, id); pass --text-field with the "
                   f"field that holds the text")
    msg = build_error(tmp_path, [f"jsonl:{f}"], text_field="body")
    assert msg.startswith(f"{f} line 1: no field 'body' (fields: text)")


def test_text_field_of_wrong_type(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n{"text": 5}\n')
    assert build_error(tmp_path, [f"jsonl:{f}"]).startswith(
        f"{f} line 2: field 'text' is int, not a string")


def test_missing_parquet_column(inputs, tmp_path):
    spec = inputs["pq"][0].split("=", 1)[1]
    msg = build_error(tmp_path, [spec])  # the text is in "body", not "text"
    assert "rows.parquet: no column 'text' (columns: id, body)" in msg


def test_glob_matching_nothing(tmp_path):
    msg = build_error(tmp_path, [f"jsonl:{tmp_path}/nothing/*.jsonl"])
    assert msg.startswith(f"--input jsonl:{tmp_path}/nothing/*.jsonl: {tmp_path}/nothing/"
                          f"*.jsonl matches no files")


def test_input_without_text(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": ""}\n\n{"text": ""}\n')
    assert build_error(tmp_path, [f"blank=jsonl:{f}"]).startswith(
        "--input blank: no text in its 1 file(s)")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.txt").write_text("")
    assert build_error(tmp_path, [f"{tmp_path}/e/*.txt"]).endswith(
        "e/*.txt are all empty")


def test_not_utf8_text_file(tmp_path, hf_tok):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "ok.txt").write_text("plain text\n" * 20)
    bad = tmp_path / "t" / "latin.txt.gz"
    bad.write_bytes(gzip.compress("line one\nline two caf\u00e9\n".encode("latin-1")))
    msg = build_error(tmp_path, [f"text:{tmp_path}/t/*"], tokenizer=hf_tok["dir"])
    assert msg.startswith(f"{bad}: not UTF-8 at byte offset 21 of the decompressed text, "
                          f"line 2 (invalid continuation byte, byte 0xe9)")


def test_not_utf8_jsonl_record(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert build_error(tmp_path, [f"jsonl:{f}"]).startswith(
        f"{f} line 2: not UTF-8 at byte offset 28 (")


def test_spec_and_tokenizer_errors(hf_tok, tmp_path):
    assert build_error(tmp_path, ["csv:x.csv"]).startswith(
        "--input 'csv:x.csv': unknown kind 'csv'; use one of text, jsonl")
    assert build_error(tmp_path, ["a=jsonl:x", "a=jsonl:y"]).startswith(
        "--input names ['a'] more than once")
    assert build_error(tmp_path, ["hf:x.jsonl"]).startswith(
        "--input 'hf:x.jsonl': hf needs a builder and a glob")
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n' * 3)
    assert build_error(tmp_path, [f"jsonl:{f}"], tokenizer=hf_tok["no_eos"]).startswith(
        f"--tokenizer {hf_tok['no_eos']}: the tokenizer has no eos token; pass --eos-token")
    assert build_error(tmp_path, [f"jsonl:{f}"], tokenizer=hf_tok["json"]).startswith(
        f"--tokenizer {hf_tok['json']}: a bare tokenizer.json names no eos token")
    assert build_error(tmp_path, [f"jsonl:{f}"], tokenizer=hf_tok["dir"],
                       eos_token="<nope>").startswith(
        f"--tokenizer {hf_tok['dir']}: the eos token '<nope>' is not in its vocabulary")


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "o"), "--input", f"jsonl:{f}", "--quiet"])
    assert err.value.code == 2
    assert capsys.readouterr().err == (f"attent-prepare: error: {f} line 2: not valid JSON "
                                       f"(Expecting value at column 1); fix or remove this "
                                       f"record\n")


def test_cli_builds_from_inputs(inputs, hf_tok, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["--out", str(out), "--input", inputs["pq"][0], "--input", inputs["tree"][0],
                 "--text-field", "pq=body", "--tokenizer", str(hf_tok["dir"]), "--seq-len",
                 str(SEQ), "--val-fraction", str(FRAC), "--seed", str(SEED), "--workers", "1",
                 "--quiet"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"] == ["pq", "tree"]
    assert [s["documents"] for s in meta["inputs"]] == [25, 9]
    assert meta["fingerprint"] in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# the tokenizer sample


def test_tokenizer_sample_is_bounded_and_deterministic():
    docs = make_docs(200, 7, 50, 400)
    small = TokenizerSample(seed=1, pool_chars=20_000, sample_chars=10_000)
    for i, d in enumerate(docs):
        small.add(str(i), d)
    pool = sum(len(c) for _, _, c in small._heap)
    assert pool <= 20_000 and pool > 20_000 - 4096
    a = small.chunks()
    assert 10_000 <= sum(map(len, a)) < 10_000 + 4096
    # same documents, read in another order: the same pool (a uniform sample, by hash)
    other = TokenizerSample(seed=1, pool_chars=20_000, sample_chars=10_000)
    for i in reversed(range(len(docs))):
        other.add(str(i), docs[i])
    assert sorted(c for _, _, c in other._heap) == sorted(c for _, _, c in small._heap)
    # within the pool: every chunk in reading order, shuffled with the seed (the legacy sample)
    full = TokenizerSample(seed=1, sample_chars=10 ** 9)
    for i, d in enumerate(docs[:20]):
        full.add(str(i), d)
    # These documents are shorter than a chunk (TOKENIZER_CHUNK_CHARS): each is one chunk.
    assert max(len(d) for d in docs[:20]) <= TOKENIZER_CHUNK_CHARS
    legacy = list(docs[:20])
    random.Random(1).shuffle(legacy)
    assert full.chunks() == legacy


# --------------------------------------------------------------------------------------------
# external MDS datasets


def write_mds(root: Path, columns: dict, rows: dict) -> Path:
    from streaming import MDSWriter
    for split, samples in rows.items():
        with MDSWriter(out=str(root / split), columns=columns, size_limit=1 << 12) as w:
            for s in samples:
                w.write(s)
    return root


def ext_rows(n: int, length: int = SEQ, dtype=np.int32, start: int = 0) -> list[dict]:
    return [{"input_ids": np.arange(start + i, start + i + length, dtype=dtype),
             "source": i % 3, "id": i} for i in range(n)]


def test_external_mds_dataset_is_accepted(tmp_path):
    root = write_mds(tmp_path / "ext", {"input_ids": "ndarray:int32", "source": "int32",
                                        "id": "int64"},
                     {"train": ext_rows(300), "val": ext_rows(40)})
    assert len(list((root / "train").glob("shard.*.mds"))) > 1
    meta = open_corpus(root)
    assert {k: meta[k] for k in ("seq_len", "num_train", "num_val", "vocab_size",
                                 "token_column", "source_column", "sources", "format")} == {
        "seq_len": SEQ, "num_train": 300, "num_val": 40, "vocab_size": None,
        "token_column": "input_ids", "source_column": "source", "sources": None,
        "format": "mds-external"}
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"format": "mds-external", "token_column": "input_ids"}).encode())
    for split in ("train", "val"):
        h.update(f"\0{split}\0".encode())
        h.update((root / split / "index.json").read_bytes())
    assert meta["fingerprint"] == h.hexdigest()
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        corpus_tokenizer_size(root)
    # fixed-shape and dynamic-dtype encodings, int16 ids, no source column
    fixed = write_mds(tmp_path / "fixed", {"tokens": f"ndarray:int16:{SEQ}"},
                      {s: [{"tokens": r["input_ids"].astype(np.int16)} for r in ext_rows(9)]
                       for s in ("train", "val")})
    assert (open_corpus(fixed)["seq_len"], open_corpus(fixed)["source_column"]) == (SEQ, None)
    dyn = write_mds(tmp_path / "dyn", {"ids": "ndarray", "text": "str"},
                    {s: [{"ids": r["input_ids"].astype(np.int64), "text": "x" * (i % 5 + 1)}
                         for i, r in enumerate(ext_rows(9, length=300))]
                     for s in ("train", "val")})
    assert open_corpus(dyn, token_column="ids")["seq_len"] == 300


@pytest.mark.parametrize("case, message", [
    ("missing", "{root}: no token column tokens or input_ids (columns: ids (ndarray:int32), "
                "source (int32)); pass the column holding the token ids as token_column"),
    ("named", "{root}: no column 'tokens2' (columns: input_ids (ndarray:int32))"),
    ("float", "{root}: column 'input_ids' is ndarray:float32, not an integer ndarray"),
    ("float_dynamic", "{root}/train: column 'input_ids': sample 0 of shard shard.00000.mds "
                      "holds float32 values, not integers"),
    ("varying", "{root}/train: column 'input_ids' holds arrays of varying lengths (sample 5 of "
                "shard shard.00000.mds: 17 tokens, others 16)"),
    ("split_lengths", "{root}: column 'input_ids' holds 16 tokens per sample in train but 8 in "
                      "val"),
    ("2d", "{root}/train: column 'input_ids': sample 0 of shard shard.00000.mds is a 2-D array"),
    ("source_str", "{root}: column 'source' is str, not an integer"),
    ("no_val", "{root}: no meta.json (not a prepared corpus) and {root}/val/index.json is "
               "missing or unreadable"),
])
def test_bad_external_dataset_is_refused(tmp_path, case, message):
    root = tmp_path / "ext"
    rows = ext_rows(12)
    if case == "missing":
        write_mds(root, {"ids": "ndarray:int32", "source": "int32"},
                  {s: [{"ids": r["input_ids"], "source": r["source"]} for r in rows]
                   for s in ("train", "val")})
    elif case == "named":
        write_mds(root, {"input_ids": "ndarray:int32"},
                  {s: [{"input_ids": r["input_ids"]} for r in rows] for s in ("train", "val")})
    elif case in ("float", "float_dynamic"):
        enc = "ndarray:float32" if case == "float" else "ndarray"
        write_mds(root, {"input_ids": enc},
                  {s: [{"input_ids": r["input_ids"].astype(np.float32)} for r in rows]
                   for s in ("train", "val")})
    elif case == "varying":
        rows[5]["input_ids"] = np.arange(SEQ + 1, dtype=np.int32)
        write_mds(root, {"input_ids": "ndarray:int32", "source": "int32"},
                  {s: [{k: r[k] for k in ("input_ids", "source")} for r in rows]
                   for s in ("train", "val")})
    elif case == "split_lengths":
        write_mds(root, {"input_ids": "ndarray:int32"},
                  {"train": [{"input_ids": r["input_ids"]} for r in rows],
                   "val": [{"input_ids": r["input_ids"][:8]} for r in rows]})
    elif case == "2d":
        write_mds(root, {"input_ids": "ndarray:int32"},
                  {s: [{"input_ids": r["input_ids"].reshape(2, -1)} for r in rows]
                   for s in ("train", "val")})
    elif case == "source_str":
        write_mds(root, {"input_ids": "ndarray:int32", "source": "str"},
                  {s: [{"input_ids": r["input_ids"], "source": "web"} for r in rows]
                   for s in ("train", "val")})
    elif case == "no_val":
        write_mds(root, {"input_ids": "ndarray:int32"},
                  {"train": [{"input_ids": r["input_ids"]} for r in rows]})
    with pytest.raises(ValueError) as err:
        open_corpus(root, token_column="tokens2" if case == "named" else None)
    assert str(err.value).startswith(message.format(root=root)), str(err.value)
    assert "\n" not in str(err.value)


def test_open_corpus_of_a_prepared_corpus(hf_corpus):
    out, meta = hf_corpus
    assert open_corpus(out, token_column="tokens") == meta
    with pytest.raises(ValueError, match="token column is 'tokens', not 'input_ids'"):
        open_corpus(out, token_column="input_ids")
