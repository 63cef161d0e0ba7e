"""Corpus preparation: documents -> tokenizer -> packed MDS shards (``attent-prepare``).

``attent-prepare --out DIR [--input SPEC ...]`` (or :func:`prepare_corpus`) turns one or more
*sources* (see :mod:`attent_scale.corpus_inputs` for the spec syntax; by default the ``*.py``
files of the running interpreter's standard library) into what the training job reads:

- the tokenizer: ``DIR/tokenizer.model``, a byte-fallback BPE SentencePiece model trained on the
  train documents, or a copy of the one given with ``--tokenizer`` (``tokenizer.model`` or the
  directory ``tokenizer/``), see :mod:`attent_scale.corpus_tokenizer`;
- ``DIR/train`` and ``DIR/val``: MosaicML streaming MDS datasets, one sample per sequence,
  ``{"tokens": int32 array of seq_len, "source": int32 index into meta["sources"]}``;
- ``DIR/meta.json``: sizes, special ids, the sources and a fingerprint of everything that
  determines the data.

Each document is tokenized and followed by the end-of-text id. Each source's documents are
joined in reading order, separately for train and validation, and cut into non-overlapping
sequences of exactly ``seq_len`` tokens (the last partial sequence of each source and split is
dropped), so a sequence never mixes sources. Train samples are source 0's sequences, then source
1's, and so on (the training loader shuffles). The split is by document (see corpus_inputs).

Memory stays bounded: documents are read lazily, encoded in batches by worker processes (in
order, so the output does not depend on the worker count) and written as they are packed.

Preparation is atomic and idempotent: everything is built in a temporary directory beside ``DIR``
and renamed into place at the end; a second call with the same parameters returns the existing
``meta.json`` without redoing work, and a call with different parameters is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from .corpus import (SOURCE_COLUMN, TOKEN_COLUMN, complete_meta, open_corpus,  # noqa: F401
                     verify_split)
from .corpus_inputs import (PY_TREE, RECORD_KINDS, STDLIB_SKIP_DIRS, InputError,  # noqa: F401
                            InputSpec, SourceFile, _bucket, default_source, documents, is_val,
                            list_source_files, parse_inputs, py_tree_spec, source_files,
                            split_files)
from .corpus_tokenizer import (BOS_ID, CHAR_MARGIN, DEFAULT_VOCAB_SIZE, EOS_ID,  # noqa: F401
                               MAX_SENTENCE_BYTES, MIN_CHARACTER_COVERAGE, MIN_VOCAB_SIZE,
                               NUM_BYTE_PIECES, NUM_SPECIAL, PAD_ID, SP_FILE,
                               TARGET_CHARACTER_COVERAGE, TOKENIZER_CHUNK_CHARS,
                               TOKENIZER_SAMPLE_CHARS, TRAINED, UNK_ID, ExternalTokenizer,
                               TokenizerRecipe, TokenizerSample, _character_coverage, _chunks,
                               corpus_tokenizer_size, encode_stream, inspect_tokenizer,
                               install_tokenizer, load_corpus_tokenizer, load_tokenizer,
                               train_sentencepiece, train_tokenizer)

PathLike = Union[str, os.PathLike]

FORMAT = "attent-corpus-v1"
"""Bumped whenever the meaning of the prepared files changes; part of the fingerprint. Additions
that leave the existing files' meaning alone (the ``source`` column, new meta keys) keep it;
:func:`attent_scale.corpus.complete_meta` fills those in for older corpora."""

DEFAULT_SHARD_BYTES = 1 << 22

PARAM_KEYS = ("seq_len", "vocab_size", "val_fraction", "seed", "max_bytes", "source",
              "tokenizer_origin")
"""Parameters that decide the content of a prepared directory (compared on reuse)."""

# Documents go to the encoders in batches of about this much text; 2 batches per worker in
# flight bound the memory.
BATCH_DOCS = 256
BATCH_CHARS = 1 << 18
AUTO_WORKERS_MIN_BYTES = 4 << 20
"""Below this much input, workers=None encodes in-process (starting workers costs more)."""


# --------------------------------------------------------------------------------------------
# fingerprints


def fingerprint(files: Sequence[SourceFile], seq_len: int, vocab_size: int, val_fraction: float,
                seed: int, tokenizer_bytes: bytes) -> str:
    """Hex digest over the files used (sorted relative paths and sizes), the parameters that
    shape the data and the tokenizer model (the legacy ``*.py`` tree corpus)."""
    h = hashlib.blake2b(digest_size=16)
    header = {"format": FORMAT, "seq_len": seq_len, "vocab_size": vocab_size,
              "val_fraction": val_fraction, "seed": seed,
              "files": [[f.rel, f.size] for f in sorted(files, key=lambda f: f.rel)]}
    h.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    h.update(b"\0tokenizer\0")
    h.update(tokenizer_bytes)
    return h.hexdigest()


def _fingerprint(specs: Sequence[InputSpec], files: Sequence[Sequence[SourceFile]],
                 params: dict, tokenizer_bytes: bytes) -> str:
    """The corpus fingerprint: the legacy one for the ``*.py`` tree (its value does not move),
    else the same idea over every source's spec and files and the tokenizer's identity."""
    if len(specs) == 1 and specs[0].kind == PY_TREE and \
            params["tokenizer_origin"]["kind"] == TRAINED:
        return fingerprint(files[0], params["seq_len"], params["vocab_size"],
                           params["val_fraction"], params["seed"], tokenizer_bytes)
    h = hashlib.blake2b(digest_size=16)
    header = {"format": FORMAT, "seq_len": params["seq_len"], "vocab_size": params["vocab_size"],
              "val_fraction": params["val_fraction"], "seed": params["seed"],
              "max_bytes": params["max_bytes"], "tokenizer": params["tokenizer_origin"],
              "sources": [{"spec": s.describe(), "files": [[f.rel, f.size] for f in fs]}
                          for s, fs in zip(specs, files)]}
    h.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    h.update(b"\0tokenizer\0")
    h.update(tokenizer_bytes)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# the documents of a source, with their split


@dataclass
class _Plan:
    """One source: its spec, files and, for whole-file sources, which files are validation."""
    spec: InputSpec
    files: list
    max_bytes: Optional[int]
    val_fraction: float
    seed: int
    val_rels: Optional[frozenset] = None
    train_rels: Optional[frozenset] = None
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.spec.kind in RECORD_KINDS:
            return
        if len(self.files) >= 2 or self.spec.kind == PY_TREE:
            train, val = split_files(self.files, self.val_fraction, self.seed)
        else:  # a single file goes wherever its hash sends it
            held = is_val(self.files[0].rel, self.val_fraction, self.seed)
            train, val = ([], self.files) if held else (self.files, [])
        self.train_rels = frozenset(f.rel for f in train)
        self.val_rels = frozenset(f.rel for f in val)

    def documents(self, train_only: bool = False) -> Iterator[tuple[Any, bool]]:
        """(document, is validation) in reading order; ``train_only`` skips unread val files."""
        only = self.train_rels if train_only else None
        for doc in documents(self.spec, self.files, self.max_bytes, only):
            held = doc.key in self.val_rels if self.val_rels is not None else \
                is_val(doc.key, self.val_fraction, self.seed)
            yield doc, held


def _no_text(plan: _Plan) -> InputError:
    return InputError(f"--input {plan.spec.name}: no text in its {len(plan.files)} file(s) "
                      f"({plan.spec.describe()}); every document is empty")


# --------------------------------------------------------------------------------------------
# packing and writing


class _Packer:
    """Cuts one source's token stream of one split into rows of seq_len, keeping the rest."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.parts: list[np.ndarray] = []
        self.held = 0
        self.tokens = 0
        self.rows = 0

    def add(self, ids: np.ndarray) -> Optional[np.ndarray]:
        self.tokens += len(ids)
        self.parts.append(ids)
        self.held += len(ids)
        if self.held < self.seq_len:
            return None
        buf = np.concatenate(self.parts)
        n = len(buf) // self.seq_len
        rest = buf[n * self.seq_len:]
        self.parts, self.held = ([rest], len(rest)) if len(rest) else ([], 0)
        self.rows += n
        return buf[:n * self.seq_len].reshape(n, self.seq_len)


def _batches(plans: Sequence[_Plan]) -> Iterator[tuple[tuple, list[str]]]:
    """((source id, validation flags, utf-8 bytes), texts) batches; never across sources."""
    for sid, plan in enumerate(plans):
        texts: list[str] = []
        flags: list[bool] = []
        chars = nbytes = 0
        for doc, held in plan.documents():
            texts.append(doc.text)
            flags.append(held)
            chars += len(doc.text)
            nbytes += len(doc.text.encode("utf-8", "surrogatepass"))
            if len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield (sid, np.array(flags), nbytes), texts
                texts, flags, chars, nbytes = [], [], 0, 0
        if texts:
            yield (sid, np.array(flags), nbytes), texts


def _write_all(tmp: Path, plans: Sequence[_Plan], recipe: TokenizerRecipe, params: dict,
               workers: int, progress: bool, shard_bytes: int) -> None:
    from streaming import MDSWriter
    from tqdm import tqdm

    seq_len = params["seq_len"]
    # A SHA-1 per shard in index.json lets every job verify its shards before training.
    columns = {TOKEN_COLUMN: "ndarray:int32", SOURCE_COLUMN: "int32"}
    total = None if any(p.spec.kind in RECORD_KINDS for p in plans) else \
        sum(len(p.files) for p in plans)
    with MDSWriter(out=str(tmp / "train"), columns=columns, size_limit=shard_bytes,
                   hashes=["sha1"]) as w_train, \
            MDSWriter(out=str(tmp / "val"), columns=columns, size_limit=shard_bytes,
                      hashes=["sha1"]) as w_val, \
            tqdm(total=total, desc="tokenize", unit="doc", disable=not progress,
                 dynamic_ncols=True, mininterval=0.5) as bar:
        packers: dict[int, tuple[_Packer, _Packer]] = {}
        for (sid, flags, nbytes), flat, lengths in encode_stream(recipe, _batches(plans),
                                                                 workers):
            if sid not in packers:
                packers[sid] = (_Packer(seq_len), _Packer(seq_len))
            st = plans[sid].stats
            st["documents"] = st.get("documents", 0) + len(flags)
            st["val_documents"] = st.get("val_documents", 0) + int(flags.sum())
            st["bytes"] = st.get("bytes", 0) + nbytes
            held = np.repeat(flags, lengths)
            for packer, part, writer in ((packers[sid][0], flat[~held], w_train),
                                         (packers[sid][1], flat[held], w_val)):
                if len(part) == 0:
                    continue
                rows = packer.add(part)
                if rows is not None:
                    for row in rows:
                        writer.write({TOKEN_COLUMN: row, SOURCE_COLUMN: sid})
            bar.update(len(flags))
            bar.set_postfix(tokens=sum(p.tokens for pair in packers.values() for p in pair),
                            refresh=False)
    for sid, plan in enumerate(plans):
        if not plan.stats.get("documents"):
            raise _no_text(plan)
        train, val = packers[sid]
        plan.stats.update(train_tokens=train.tokens, val_tokens=val.tokens, num_train=train.rows,
                          num_val=val.rows)


# --------------------------------------------------------------------------------------------
# the entry points


def _check_args(seq_len, vocab_size, val_fraction, max_bytes, seed, shard_bytes, workers,
                trained: bool) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(seq_len) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (a sequence needs an input and a "
                         f"target), got seq_len={seq_len!r}")
    if trained and (not is_int(vocab_size) or vocab_size < MIN_VOCAB_SIZE):
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} ({NUM_BYTE_PIECES} "
                         f"byte-fallback pieces + {NUM_SPECIAL} special ids + the common "
                         f"characters of Python source), got vocab_size={vocab_size!r}")
    if not trained and vocab_size is not None and (not is_int(vocab_size) or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive integer or None (the tokenizer's own "
                         f"size), got vocab_size={vocab_size!r}")
    if (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
            or not 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be a number in (0, 1), got "
                         f"val_fraction={val_fraction!r}")
    if max_bytes is not None and (not is_int(max_bytes) or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive integer or None, got "
                         f"max_bytes={max_bytes!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got seed={seed!r}")
    if not is_int(shard_bytes) or not 0 < shard_bytes < 2 ** 32:
        raise ValueError(f"shard_bytes must be an integer in [1, 2**32), got "
                         f"shard_bytes={shard_bytes!r}")
    if workers is not None and (not is_int(workers) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None (one per CPU core for "
                         f"large inputs), got workers={workers!r}")


def _read_meta(out_dir: Path) -> dict:
    path = out_dir / "meta.json"
    try:
        return complete_meta(json.loads(path.read_text()), out_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} exists but cannot be read ({e}); delete {out_dir} and prepare "
                         f"again") from e


def _same_tokenizer(existing: Optional[dict], requested: dict) -> bool:
    return existing is not None and all(existing.get(k) == v for k, v in requested.items())


def _reuse(out_dir: Path, params: dict, specs: Sequence[InputSpec]) -> dict:
    """The existing meta if it was prepared with ``params``; else a ValueError naming the keys."""
    meta = _read_meta(out_dir)
    differ = [k for k in PARAM_KEYS if k not in params["_unset"] and (
        not _same_tokenizer(meta.get(k), params[k]) if k == "tokenizer_origin"
        else meta.get(k) != params[k])]
    if not differ:
        # Cheap check that the inputs are still the ones used (paths and sizes).
        try:
            files = [source_files(s, params["max_bytes"]) for s in specs]
        except InputError as e:
            raise ValueError(f"{out_dir} was prepared from inputs that changed since: {e}") \
                from None
        tok = out_dir / SP_FILE
        ident = tok.read_bytes() if meta["tokenizer_origin"]["kind"] == TRAINED and \
            tok.is_file() else b""
        fp_params = {**params, "vocab_size": meta["vocab_size"]}
        if _fingerprint(specs, files, fp_params, ident) != meta.get("fingerprint"):
            differ = ["fingerprint (the source files changed since preparation)"]
    if differ:
        detail = ", ".join(f"{k}: existing {meta.get(k)!r} vs requested {params[k]!r}"
                           if k in params else k for k in differ)
        raise ValueError(f"{out_dir} was prepared with different parameters ({detail}); pick "
                         f"another out_dir or delete {out_dir} to prepare it again")
    return meta


def prepare_corpus(out_dir: PathLike, *, seq_len: int = 256, vocab_size: Optional[int] = None,
                   val_fraction: float = 0.05, max_bytes: Optional[int] = None,
                   source_dir: Optional[PathLike] = None, seed: int = 0, progress: bool = True,
                   shard_bytes: int = DEFAULT_SHARD_BYTES,
                   inputs: Optional[Sequence[str]] = None,
                   text_field: Union[None, str, Sequence[str]] = None,
                   tokenizer: Optional[PathLike] = None, eos_token: Optional[str] = None,
                   workers: Optional[int] = None) -> dict:
    """Prepare (or reuse) a tokenized, packed, split corpus in ``out_dir``; returns its meta.

    Args:
        out_dir: directory to create (its parent is created if needed).
        seq_len: tokens per sequence (every sample has exactly this many).
        vocab_size: the embedding size recorded in meta. With a trained tokenizer its size
            (>= ``MIN_VOCAB_SIZE``; None = 2048); with ``tokenizer`` None = the tokenizer's own
            size, or a larger number (padding the embedding).
        val_fraction: expected share of documents held out for validation, in (0, 1).
        max_bytes: cap per source: on the total size of the files read (whole-file sources,
            sorted order) or of the documents' text (record sources); None = all.
        source_dir: tree of ``*.py`` files when ``inputs`` is not given; None = this
            interpreter's standard library (without site-packages, test suites and idlelib).
        seed: decides the split and the tokenizer's training sample.
        progress: tqdm bars and a one-line summary on stdout.
        shard_bytes: MDS shard size limit (does not change the samples, so not compared on reuse).
        inputs: ``--input`` specs, one per source (see :mod:`attent_scale.corpus_inputs`).
        text_field: the record field holding the text (``FIELD`` or ``NAME=FIELD`` entries).
        tokenizer: a Hugging Face tokenizer directory, a ``tokenizer.json`` or a SentencePiece
            ``.model`` to use instead of training one.
        eos_token: the token ending each document (default: the tokenizer's eos token).
        workers: encoding processes (the output does not depend on it); None = one per CPU core
            (at most 8) for inputs of 4 MB or more, else in-process.

    ``meta["train_tokens"]`` / ``meta["val_tokens"]`` count the tokens of the split including
    the end-of-text after each document; the packed sequences hold ``num * seq_len`` of them
    (per source, the rest, fewer than ``seq_len``, is dropped).
    """
    trained = tokenizer is None
    if trained and vocab_size is None:
        vocab_size = DEFAULT_VOCAB_SIZE
    _check_args(seq_len, vocab_size, val_fraction, max_bytes, seed, shard_bytes, workers,
                trained)
    if inputs:
        if source_dir is not None:
            raise ValueError("give either inputs (--input) or source_dir (--source-dir), not "
                             "both; a tree of .py files is --input 'DIR/**/*.py'")
        specs = parse_inputs(list(inputs), text_field)
    else:
        if text_field:
            raise ValueError(f"text_field={text_field!r} applies to record inputs (jsonl, "
                             f"parquet, hf-disk, hf); give them with --input")
        specs = [py_tree_spec(source_dir)]
    if trained and eos_token is not None:
        raise ValueError(f"eos_token={eos_token!r} needs a tokenizer (--tokenizer); the trained "
                         f"tokenizer ends documents with its own </s> (id {EOS_ID})")
    ext = None if trained else inspect_tokenizer(tokenizer, eos_token)
    unset = set()
    if ext is not None:
        if vocab_size is None:
            vocab_size = ext.size
            unset.add("vocab_size")
        elif vocab_size < ext.size:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the {ext.size} ids of "
                             f"--tokenizer {tokenizer}; leave vocab_size unset (its own size) or "
                             f"give at least {ext.size}")
        origin = {"kind": ext.kind, "sha256": ext.sha256, "eos_token": ext.eos_token}
    else:
        origin = {"kind": TRAINED}
    params = {"seq_len": int(seq_len), "vocab_size": int(vocab_size),
              "val_fraction": float(val_fraction), "seed": int(seed),
              "max_bytes": None if max_bytes is None else int(max_bytes),
              "source": "; ".join(s.describe() for s in specs), "tokenizer_origin": origin,
              "_unset": unset}
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))  # "." and ".." get real names
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir={str(out_dir)!r} exists and is not a directory")
    if (out_dir / "meta.json").exists():
        meta = _reuse(out_dir, params, specs)
        if progress:
            print(f"attent-prepare: {out_dir} already prepared ({meta['num_train']} train / "
                  f"{meta['num_val']} val sequences, fingerprint {meta['fingerprint'][:12]})")
        return meta
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir={str(out_dir)!r} exists, is not empty and holds no meta.json "
                         f"(not a prepared corpus); pick another out_dir or delete it")

    files = [source_files(s, params["max_bytes"]) for s in specs]
    if specs[0].kind == PY_TREE and not files[0]:
        what = "the standard library" if source_dir is None else f"source_dir={str(source_dir)!r}"
        cap = "" if max_bytes is None else f" within max_bytes={max_bytes}"
        raise ValueError(f"no non-empty .py files found under {what} ({specs[0].target}){cap}")
    plans = [_Plan(s, fs, params["max_bytes"], params["val_fraction"], params["seed"])
             for s, fs in zip(specs, files)]
    if workers is None:
        size = sum(f.size for fs in files for f in fs)
        workers = min(os.cpu_count() or 1, 8) if size >= AUTO_WORKERS_MIN_BYTES else 1

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        meta = _build(tmp, plans, params, ext, workers, progress, shard_bytes)
        try:
            os.rename(tmp, out_dir)  # atomic; replaces an empty directory
        except OSError:
            # Someone else finished first: theirs is as good as ours if the parameters agree.
            if not (out_dir / "meta.json").exists():
                raise
            meta = _reuse(out_dir, params, specs)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"attent-prepare: {out_dir}: {meta['num_train']} train / {meta['num_val']} val "
              f"sequences of {seq_len} tokens from {meta['train_documents']} / "
              f"{meta['val_documents']} documents of {len(plans)} source(s) "
              f"({meta['source_bytes'] / 1e6:.1f} MB), vocab {meta['vocab_size']}, "
              f"fingerprint {meta['fingerprint'][:12]}, {time.perf_counter() - t0:.1f}s")
    return meta


def _train(tmp: Path, plans: Sequence[_Plan], params: dict, progress: bool) -> bytes:
    """Train the SentencePiece model on a sample of the train documents; write it to ``tmp``."""
    from tqdm import tqdm

    sample = TokenizerSample(params["seed"])
    with tqdm(desc="sample", unit="doc", disable=not progress, dynamic_ncols=True,
              mininterval=0.5) as bar:
        for plan in plans:
            seen = 0
            # Whole-file sources skip their validation files unread; record sources are read
            # through (a record's split is known only once it is read).
            for doc, held in plan.documents(train_only=plan.spec.kind not in RECORD_KINDS):
                seen += 1
                if not held:
                    sample.add(doc.key, doc.text)
                bar.update()
            if not seen and (plan.spec.kind in RECORD_KINDS or not plan.val_rels):
                raise _no_text(plan)
    if progress:
        print(f"attent-prepare: training a {params['vocab_size']}-piece BPE tokenizer on "
              f"{sample.documents} train documents", file=sys.stderr, flush=True)
    model = train_sentencepiece(sample.chunks(), params["vocab_size"], sample.documents)
    (tmp / SP_FILE).write_bytes(model)
    sp = load_tokenizer(tmp)
    if sp.get_piece_size() != params["vocab_size"]:
        raise ValueError(f"SentencePiece produced {sp.get_piece_size()} pieces instead of "
                         f"vocab_size={params['vocab_size']}")
    # Human-readable listing: id, piece (JSON-quoted: pieces hold newlines and tabs), score.
    (tmp / "tokenizer.vocab").write_text("".join(
        f"{i}\t{json.dumps(sp.id_to_piece(i), ensure_ascii=False)}\t{sp.get_score(i):g}\n"
        for i in range(sp.get_piece_size())), encoding="utf-8")
    return model


def _build(tmp: Path, plans: Sequence[_Plan], params: dict, ext: Optional[ExternalTokenizer],
           workers: int, progress: bool, shard_bytes: int) -> dict:
    if ext is None:
        model = _train(tmp, plans, params, progress)
        recipe = TokenizerRecipe(TRAINED, str(tmp / SP_FILE), EOS_ID)
        tok_rel, tok_type = SP_FILE, "sentencepiece-bpe-byte-fallback"
        origin = {"kind": TRAINED, "path": None, "sha256": hashlib.sha256(model).hexdigest(),
                  "size": params["vocab_size"], "files": [SP_FILE], "eos_token": "</s>"}
        special = {"pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID}
    else:
        model = b""
        tok_rel, recipe = install_tokenizer(ext, tmp)
        tok_type, origin = ext.kind, ext.origin()
        special = {**ext.special_ids, "eos_id": ext.eos_id}

    _write_all(tmp, plans, recipe, params, workers, progress, shard_bytes)
    # The final paths: the worker recipe pointed into tmp, which is renamed.
    seq_len = params["seq_len"]
    stats = [p.stats for p in plans]
    num_train = sum(s["num_train"] for s in stats)
    num_val = sum(s["num_val"] for s in stats)
    train_tokens = sum(s["train_tokens"] for s in stats)
    val_tokens = sum(s["val_tokens"] for s in stats)
    for name, n, toks in (("train", num_train, train_tokens), ("val", num_val, val_tokens)):
        if n == 0:
            raise ValueError(
                f"the {name} split has only {toks} tokens, no full sequence of seq_len={seq_len} "
                f"(each source is packed on its own); use a smaller seq_len, a larger max_bytes "
                f"or val_fraction, or more input")
    val_docs = sum(s["val_documents"] for s in stats)
    train_docs = sum(s["documents"] for s in stats) - val_docs
    py_tree = plans[0].spec.kind == PY_TREE
    source_bytes = sum(f.size for f in plans[0].files) if py_tree else \
        sum(s["bytes"] for s in stats)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "fingerprint": _fingerprint([p.spec for p in plans], [p.files for p in plans], params,
                                    model),
        "seq_len": seq_len,
        "vocab_size": params["vocab_size"],
        "num_train": int(num_train),
        "num_val": int(num_val),
        "train_files": train_docs,  # the legacy names of train/val_documents
        "val_files": val_docs,
        "train_documents": train_docs,
        "val_documents": val_docs,
        "train_tokens": int(train_tokens),
        "val_tokens": int(val_tokens),
        "source": params["source"],
        "source_bytes": int(source_bytes),
        "max_bytes": params["max_bytes"],
        "val_fraction": params["val_fraction"],
        "seed": params["seed"],
        "shard_bytes": int(shard_bytes),
        "token_column": TOKEN_COLUMN,
        "source_column": SOURCE_COLUMN,
        "sources": [p.spec.name for p in plans],
        "inputs": [{"name": p.spec.name, "kind": p.spec.kind, "spec": p.spec.describe(),
                    "text_field": p.spec.text_field, "files": len(p.files),
                    "documents": s["documents"], "train_documents": s["documents"] -
                    s["val_documents"], "val_documents": s["val_documents"], "bytes": s["bytes"],
                    "train_tokens": s["train_tokens"], "val_tokens": s["val_tokens"],
                    "num_train": s["num_train"], "num_val": s["num_val"]}
                   for p, s in zip(plans, stats)],
        "tokenizer": tok_rel,
        "tokenizer_type": tok_type,
        "tokenizer_origin": origin,
        **special,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


HELP_INPUT = """one source (repeatable; each source's sequences are packed apart and tagged with
its id): [NAME=]KIND:TARGET with KIND text (files by glob, any extension, .gz/.zst
decompressed, one document per file; a bare GLOB means text:GLOB), jsonl:GLOB (also .gz/.zst,
one document per record), parquet:GLOB (one per row), hf-disk:PATH[#SPLIT] (Dataset.save_to_disk),
hf:BUILDER:GLOB (datasets.load_dataset(BUILDER, data_files=GLOB), e.g. hf:json:d/*.jsonl).
Default: the .py files of --source-dir"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attent-prepare",
        description="Tokenize documents (default: the .py files of this interpreter's standard "
                    "library) into packed MDS shards for attent-pretrain. Example: "
                    "attent-prepare --out corpus --input code='src/**/*.py' "
                    "--input docs=jsonl:docs/*.jsonl.zst --tokenizer my-tokenizer/")
    parser.add_argument("--out", required=True, help="output directory (created atomically)")
    parser.add_argument("--input", action="append", default=None, metavar="[NAME=]SPEC",
                        help=HELP_INPUT)
    parser.add_argument("--text-field", action="append", default=None, metavar="[NAME=]FIELD",
                        help="record field holding the text (default: text); NAME=FIELD for one "
                             "named source")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="use this tokenizer instead of training one: a Hugging Face "
                             "tokenizer directory, a tokenizer.json or a SentencePiece .model "
                             "(copied into --out)")
    parser.add_argument("--eos-token", default=None,
                        help="token ending each document (default: the tokenizer's eos token)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="trained tokenizer: its vocabulary (default 2048); --tokenizer: the "
                             "embedding size to record (default: the tokenizer's size)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="expected share of documents held out for validation")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="cap per source on the bytes read (file sizes, or the text of "
                             "records)")
    parser.add_argument("--source-dir", default=None,
                        help="tree of .py files when no --input is given (default: the "
                             "standard library)")
    parser.add_argument("--seed", type=int, default=0, help="split and tokenizer-sample seed")
    parser.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES,
                        help="MDS shard size limit in bytes")
    parser.add_argument("--workers", type=int, default=None,
                        help="encoding processes (default: one per core for inputs >= 4 MB); "
                             "the output does not depend on it")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        meta = prepare_corpus(args.out, seq_len=args.seq_len, vocab_size=args.vocab_size,
                              val_fraction=args.val_fraction, max_bytes=args.max_bytes,
                              source_dir=args.source_dir, seed=args.seed,
                              progress=not args.quiet, shard_bytes=args.shard_bytes,
                              inputs=args.input, text_field=args.text_field,
                              tokenizer=args.tokenizer, eos_token=args.eos_token,
                              workers=args.workers)
    except ValueError as e:
        parser.exit(2, f"attent-prepare: error: {e}\n")
    from .report import format_summary

    keys = ("source", "seq_len", "vocab_size", "train_files", "val_files", "train_tokens",
            "val_tokens", "num_train", "num_val", "fingerprint")
    rows = [(k, meta.get(k)) for k in keys]
    rows += [(f"source {i} ({s['name']})", f"{s['num_train']} train / {s['num_val']} val")
             for i, s in enumerate(meta.get("inputs") or [])]
    print(format_summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
