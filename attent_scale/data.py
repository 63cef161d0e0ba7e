"""Corpus preparation: Python source -> SentencePiece tokenizer -> packed MDS shards.

``attent-prepare --out DIR`` (or :func:`prepare_corpus`) turns a tree of ``.py`` files (by default
the running interpreter's standard library) into what the training job reads:

- ``DIR/tokenizer.model``: a byte-fallback BPE SentencePiece model trained on the train files only;
- ``DIR/train`` and ``DIR/val``: MosaicML streaming MDS datasets, one sample per sequence,
  ``{"tokens": int32 array of seq_len}``;
- ``DIR/meta.json``: sizes, special ids and a fingerprint of everything that determines the data.

The split is by source file (a file's sequences never straddle train and validation), decided by
a stable hash of the file's relative path and the seed. Files are tokenized, followed by EOS,
joined in sorted order and cut into non-overlapping sequences of exactly ``seq_len`` tokens; the
last partial sequence of each split is dropped.

Preparation is atomic and idempotent: everything is built in a temporary directory beside ``DIR``
and renamed into place at the end; a second call with the same parameters returns the existing
``meta.json`` without redoing work, and a call with different parameters is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import secrets
import shutil
import sys
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]

FORMAT = "attent-corpus-v1"
"""Bumped whenever the meaning of the prepared files changes; part of the fingerprint."""

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
NUM_BYTE_PIECES = 256
MIN_VOCAB_SIZE = 320
"""256 byte-fallback pieces + 4 special ids + the ~50 most frequent characters of Python source."""

DEFAULT_SHARD_BYTES = 1 << 22
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                              "__pycache__"})

# Tokenizer training: a deterministic sample of the train files, cut into "sentences" of whole
# lines (newlines and indentation kept, so pieces such as "\n    " can be learnt).
TOKENIZER_SAMPLE_CHARS = 4_000_000
TOKENIZER_CHUNK_CHARS = 4096
MAX_SENTENCE_BYTES = 1 << 16  # > 4 bytes per char * TOKENIZER_CHUNK_CHARS
TARGET_CHARACTER_COVERAGE = 0.9999
MIN_CHARACTER_COVERAGE = 0.98  # SentencePiece's own lower limit
CHAR_MARGIN = 8  # vocabulary slots kept free for merges when the character set is capped

PARAM_KEYS = ("seq_len", "vocab_size", "val_fraction", "seed", "max_bytes", "source")
"""Parameters that decide the content of a prepared directory (compared on reuse)."""

_HASH_BUCKETS = 10_000


@dataclass(frozen=True)
class SourceFile:
    rel: str
    """Path relative to the source root, with forward slashes (hashed for the split)."""
    path: Path
    size: int


# --------------------------------------------------------------------------------------------
# source files and the split


def default_source() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def list_source_files(source: PathLike, max_bytes: Optional[int] = None, *,
                      skip_dirs: Iterable[str] = ()) -> list[SourceFile]:
    """Non-empty ``*.py`` files under ``source`` in sorted relative-path order.

    Files are taken in that order while their total size stays within ``max_bytes`` (the first
    file that would exceed it ends the list). Directories named in ``skip_dirs`` are not entered.
    """
    root = Path(source)
    skip = set(skip_dirs)
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                found.append((p.relative_to(root).as_posix(), p))
    found.sort()
    files: list[SourceFile] = []
    total = 0
    for rel, p in found:
        try:
            size = p.stat().st_size
        except OSError:  # broken symlink and the like
            continue
        if size == 0:
            continue
        if max_bytes is not None and total + size > max_bytes:
            break
        files.append(SourceFile(rel, p, size))
        total += size
    return files


def _bucket(rel: str, seed: int) -> int:
    h = hashlib.blake2b(f"{seed}\0{rel}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") % _HASH_BUCKETS


def split_files(files: Sequence[SourceFile], val_fraction: float,
                seed: int) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, val): a file is validation iff its hash bucket < val_fraction * 10_000.

    At least one file lands on each side: with no validation file the train file of the lowest
    bucket moves over, with no train file the validation file of the highest bucket does.
    """
    if len(files) < 2:
        raise ValueError(f"need at least 2 source files to split into train and validation, "
                         f"found {len(files)}; give a larger max_bytes or another source_dir")
    threshold = val_fraction * _HASH_BUCKETS
    keyed = [(_bucket(f.rel, seed), f.rel, f) for f in files]
    val = {rel for b, rel, _ in keyed if b < threshold}
    if not val:
        val.add(min(keyed, key=lambda k: (k[0], k[1]))[1])
    elif len(val) == len(files):
        val.discard(max(keyed, key=lambda k: (k[0], k[1]))[1])
    train = [f for f in files if f.rel not in val]
    return train, [f for f in files if f.rel in val]


def fingerprint(files: Sequence[SourceFile], seq_len: int, vocab_size: int, val_fraction: float,
                seed: int, tokenizer_bytes: bytes) -> str:
    """Hex digest over the files used (sorted relative paths and sizes), the parameters that
    shape the data and the tokenizer model."""
    h = hashlib.blake2b(digest_size=16)
    header = {"format": FORMAT, "seq_len": seq_len, "vocab_size": vocab_size,
              "val_fraction": val_fraction, "seed": seed,
              "files": [[f.rel, f.size] for f in sorted(files, key=lambda f: f.rel)]}
    h.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    h.update(b"\0tokenizer\0")
    h.update(tokenizer_bytes)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# tokenizer


def _chunks(text: str, limit: int = TOKENIZER_CHUNK_CHARS) -> Iterable[str]:
    """Whole lines grouped into pieces of at most ``limit`` chars (longer lines are cut)."""
    cur: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            if cur:
                yield "".join(cur)
                cur, n = [], 0
            yield line[:limit]
            line = line[limit:]
        if n + len(line) > limit and cur:
            yield "".join(cur)
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        yield "".join(cur)


def _character_coverage(sample: Sequence[str], vocab_size: int) -> float:
    """Coverage that keeps SentencePiece's required characters within the vocabulary.

    SentencePiece adds characters (most frequent first; spaces counted as U+2581) until the share
    of covered characters reaches the coverage, and each needs its own vocabulary slot beside the
    byte and special pieces. Rarer characters are byte-encoded instead.
    """
    counts: Counter[str] = Counter()
    for s in sample:
        counts.update(s)
    if " " in counts:
        counts["\u2581"] += counts.pop(" ")
    freqs = sorted(counts.values(), reverse=True)
    total = sum(freqs)
    cum = np.cumsum(freqs) / total
    budget = vocab_size - NUM_SPECIAL - NUM_BYTE_PIECES - CHAR_MARGIN

    def needed(coverage: float) -> int:  # characters SentencePiece takes for this coverage
        return int(np.searchsorted(cum, coverage, side="left")) + 1

    if needed(TARGET_CHARACTER_COVERAGE) <= budget:
        return TARGET_CHARACTER_COVERAGE
    need = needed(MIN_CHARACTER_COVERAGE)
    if need > budget:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for this corpus: {NUM_BYTE_PIECES} byte pieces "
            f"+ {NUM_SPECIAL} special ids + {need} characters (98% coverage, SentencePiece's "
            f"minimum) + {CHAR_MARGIN} spare need vocab_size >= "
            f"{NUM_SPECIAL + NUM_BYTE_PIECES + need + CHAR_MARGIN}")
    # Halfway between the coverage of `budget - 1` and `budget` characters: exactly `budget`.
    lo = cum[budget - 2] if budget >= 2 else 0.0
    return float(max(MIN_CHARACTER_COVERAGE, (lo + cum[budget - 1]) / 2))


def train_tokenizer(texts: Sequence[str], vocab_size: int, seed: int) -> bytes:
    """The serialized byte-fallback BPE model trained on a deterministic sample of ``texts``.

    The same texts, vocab_size and seed give the same bytes (one training thread; the model is
    serialized from memory, so no output path ends up in its trainer spec)."""
    import io

    import sentencepiece as spm

    chunks = [c for t in texts for c in _chunks(t)]
    random.Random(seed).shuffle(chunks)
    sample: list[str] = []
    n = 0
    for c in chunks:
        if n >= TOKENIZER_SAMPLE_CHARS:
            break
        sample.append(c)
        n += len(c)
    coverage = _character_coverage(sample, vocab_size)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, character_coverage=coverage,
            byte_fallback=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            # Code: keep every space, newline and tab, no NFKC, no dummy prefix -> exact round trip.
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_by_whitespace=False, allow_whitespace_only_pieces=True,
            split_digits=True, max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=0, shuffle_input_sentence=False,  # sampled above, with the seed
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece could not train a vocab_size={vocab_size} tokenizer on "
                         f"{len(texts)} train files ({n} characters sampled): {e}. Try a smaller "
                         f"vocab_size or a larger corpus (max_bytes / source_dir).") from e
    return model.getvalue()


def load_tokenizer(out_dir: PathLike):
    """The prepared directory's tokenizer as a ``sentencepiece.SentencePieceProcessor``."""
    import sentencepiece as spm

    path = Path(out_dir) / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; prepare the corpus first "
                                f"(attent-prepare --out {out_dir})")
    return spm.SentencePieceProcessor(model_file=str(path))


# --------------------------------------------------------------------------------------------
# tokenizing, packing, writing


def _tokenize(sp, texts: Sequence[str], bar) -> np.ndarray:
    """All texts encoded, each followed by EOS, as one int32 array."""
    parts: list[np.ndarray] = []
    threads = max(1, min(os.cpu_count() or 1, 8))
    step = 16
    for i in range(0, len(texts), step):
        batch = texts[i:i + step]
        for ids in sp.encode(list(batch), num_threads=threads):
            parts.append(np.asarray(ids, dtype=np.int32))
            parts.append(np.array([EOS_ID], dtype=np.int32))
        bar.update(len(batch))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    n = len(tokens) // seq_len
    return np.ascontiguousarray(tokens[:n * seq_len].reshape(n, seq_len), dtype=np.int32)


def _write_mds(seqs: np.ndarray, out: Path, shard_bytes: int, progress: bool, desc: str) -> None:
    from streaming import MDSWriter
    from tqdm import tqdm

    # A SHA-1 per shard in index.json lets every job verify its shards before training.
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:int32"},
                   size_limit=shard_bytes, hashes=["sha1"]) as writer:
        for row in tqdm(seqs, desc=desc, unit="seq", disable=not progress, dynamic_ncols=True,
                        mininterval=0.5):
            writer.write({"tokens": row})


def verify_split(split_dir: PathLike, expected_samples: Optional[int] = None,
                 allow_missing: bool = False) -> int:
    """Check an MDS split before training: every shard present, of its recorded size and hash.

    Returns the number of samples. Raises ValueError naming the shard and the fix. A truncated
    or bit-flipped shard would otherwise surface mid-training as a decoding error, or not at all.
    Shards written without hashes (older corpora) are checked by size only. ``allow_missing``:
    shards absent here are fetched from a remote later, and streaming validates those on download.
    """
    split_dir = Path(split_dir)
    index_path = split_dir / "index.json"
    fix = f"delete {split_dir.parent} and prepare the corpus again (attent-prepare)"
    try:
        index = json.loads(index_path.read_text())
        shards = index["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path} is missing or unreadable ({e}); {fix}") from e
    total = 0
    for shard in shards:
        raw = shard["raw_data"]
        path = split_dir / raw["basename"]
        total += int(shard["samples"])
        if not path.is_file():
            if allow_missing:
                continue
            raise ValueError(f"shard {path} listed in {index_path} is missing; {fix}")
        size = path.stat().st_size
        if size != raw["bytes"]:
            raise ValueError(f"shard {path} has {size} bytes, {raw['bytes']} expected (truncated "
                             f"or overwritten); {fix}")
        want = (raw.get("hashes") or {}).get("sha1")
        if want is not None:
            got = hashlib.sha1(path.read_bytes()).hexdigest()
            if got != want:
                raise ValueError(f"shard {path} fails its SHA-1 check (index {want}, file {got}): "
                                 f"the file is corrupt; {fix}")
    if total == 0:
        raise ValueError(f"{split_dir} holds no samples (an empty dataset); prepare a corpus with "
                         "more source text or a smaller seq_len")
    if expected_samples is not None and total != expected_samples:
        raise ValueError(f"{index_path} lists {total} samples but meta.json says "
                         f"{expected_samples}: the shards do not belong to this corpus; {fix}")
    return total


# --------------------------------------------------------------------------------------------
# the entry points


def _check_args(seq_len, vocab_size, val_fraction, max_bytes, seed, shard_bytes) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(seq_len) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (a sequence needs an input and a "
                         f"target), got seq_len={seq_len!r}")
    if not is_int(vocab_size) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} ({NUM_BYTE_PIECES} "
                         f"byte-fallback pieces + {NUM_SPECIAL} special ids + the common "
                         f"characters of Python source), got vocab_size={vocab_size!r}")
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


def _read_meta(out_dir: Path) -> dict:
    path = out_dir / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} exists but cannot be read ({e}); delete {out_dir} and prepare "
                         f"again") from e


def _reuse(out_dir: Path, params: dict, source: Path) -> dict:
    """The existing meta if it was prepared with ``params``; else a ValueError naming the keys."""
    meta = _read_meta(out_dir)
    differ = [k for k in PARAM_KEYS if meta.get(k) != params[k]]
    if not differ and source.is_dir() and (out_dir / "tokenizer.model").is_file():
        # Cheap check that the source files are still the ones used (paths and sizes).
        files = list_source_files(source, params["max_bytes"], skip_dirs=_skip_dirs(params))
        fp = fingerprint(files, params["seq_len"], params["vocab_size"], params["val_fraction"],
                         params["seed"], (out_dir / "tokenizer.model").read_bytes())
        if fp != meta.get("fingerprint"):
            differ = ["fingerprint (the source files changed since preparation)"]
    if differ:
        detail = ", ".join(f"{k}: existing {meta.get(k)!r} vs requested {params[k]!r}"
                           if k in params else k for k in differ)
        raise ValueError(f"{out_dir} was prepared with different parameters ({detail}); pick "
                         f"another out_dir or delete {out_dir} to prepare it again")
    return meta


def _skip_dirs(params: dict) -> frozenset:
    return STDLIB_SKIP_DIRS if params.get("_stdlib") else frozenset()


def prepare_corpus(out_dir: PathLike, *, seq_len: int = 256, vocab_size: int = 2048,
                   val_fraction: float = 0.05, max_bytes: Optional[int] = None,
                   source_dir: Optional[PathLike] = None, seed: int = 0, progress: bool = True,
                   shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Prepare (or reuse) a tokenized, packed, split corpus in ``out_dir``; returns its meta.

    Args:
        out_dir: directory to create (its parent is created if needed).
        seq_len: tokens per sequence (every sample has exactly this many).
        vocab_size: SentencePiece vocabulary size (>= ``MIN_VOCAB_SIZE``).
        val_fraction: expected share of source files held out for validation, in (0, 1).
        max_bytes: cap on the total size of the files read (sorted order); None = all.
        source_dir: tree of ``*.py`` files; None = this interpreter's standard library (without
            site-packages, test suites and idlelib).
        seed: decides the split and the tokenizer's training sample.
        progress: tqdm bars and a one-line summary on stdout.
        shard_bytes: MDS shard size limit (does not change the samples, so not compared on reuse).

    ``meta["train_tokens"]`` / ``meta["val_tokens"]`` count the tokens of the split including
    the EOS after each file; the packed sequences hold ``num * seq_len`` of them (the rest,
    fewer than ``seq_len``, is dropped).
    """
    _check_args(seq_len, vocab_size, val_fraction, max_bytes, seed, shard_bytes)
    if source_dir is None:
        source = default_source()
    else:
        source = Path(source_dir).expanduser().resolve()
        if not source.is_dir():
            raise ValueError(f"source_dir={str(source_dir)!r} is not a directory")
    # The standard library (however named) is read without site-packages, test suites, idlelib.
    stdlib = source == default_source()
    params = {"seq_len": int(seq_len), "vocab_size": int(vocab_size),
              "val_fraction": float(val_fraction), "seed": int(seed),
              "max_bytes": None if max_bytes is None else int(max_bytes), "source": str(source),
              "_stdlib": stdlib}
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))  # "." and ".." get real names
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir={str(out_dir)!r} exists and is not a directory")
    if (out_dir / "meta.json").exists():
        meta = _reuse(out_dir, params, source)
        if progress:
            print(f"attent-prepare: {out_dir} already prepared ({meta['num_train']} train / "
                  f"{meta['num_val']} val sequences, fingerprint {meta['fingerprint'][:12]})")
        return meta
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir={str(out_dir)!r} exists, is not empty and holds no meta.json "
                         f"(not a prepared corpus); pick another out_dir or delete it")

    files = list_source_files(source, params["max_bytes"], skip_dirs=_skip_dirs(params))
    if not files:
        what = "the standard library" if stdlib else f"source_dir={str(source_dir)!r}"
        cap = "" if max_bytes is None else f" within max_bytes={max_bytes}"
        raise ValueError(f"no non-empty .py files found under {what} ({source}){cap}")
    train_files, val_files = split_files(files, params["val_fraction"], params["seed"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        meta = _build(tmp, source, files, train_files, val_files, params, progress, shard_bytes)
        try:
            os.rename(tmp, out_dir)  # atomic; replaces an empty directory
        except OSError:
            # Someone else finished first: theirs is as good as ours if the parameters agree.
            if not (out_dir / "meta.json").exists():
                raise
            meta = _reuse(out_dir, params, source)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"attent-prepare: {out_dir}: {meta['num_train']} train / {meta['num_val']} val "
              f"sequences of {seq_len} tokens from {meta['train_files']} / {meta['val_files']} "
              f"files ({meta['source_bytes'] / 1e6:.1f} MB), vocab {vocab_size}, "
              f"fingerprint {meta['fingerprint'][:12]}, {time.perf_counter() - t0:.1f}s")
    return meta


def _build(tmp: Path, source: Path, files, train_files, val_files, params: dict,
           progress: bool, shard_bytes: int) -> dict:
    from tqdm import tqdm

    texts: dict[str, str] = {}
    for f in tqdm(files, desc="read", unit="file", disable=not progress, dynamic_ncols=True):
        texts[f.rel] = f.path.read_bytes().decode("utf-8", errors="replace")
    train_texts = [texts[f.rel] for f in train_files]
    val_texts = [texts[f.rel] for f in val_files]

    if progress:
        print(f"attent-prepare: training a {params['vocab_size']}-piece BPE tokenizer on "
              f"{len(train_files)} train files", file=sys.stderr, flush=True)
    model = train_tokenizer(train_texts, params["vocab_size"], params["seed"])
    (tmp / "tokenizer.model").write_bytes(model)
    sp = load_tokenizer(tmp)
    if sp.get_piece_size() != params["vocab_size"]:
        raise ValueError(f"SentencePiece produced {sp.get_piece_size()} pieces instead of "
                         f"vocab_size={params['vocab_size']}")
    # Human-readable listing: id, piece (JSON-quoted: pieces hold newlines and tabs), score.
    (tmp / "tokenizer.vocab").write_text("".join(
        f"{i}\t{json.dumps(sp.id_to_piece(i), ensure_ascii=False)}\t{sp.get_score(i):g}\n"
        for i in range(sp.get_piece_size())), encoding="utf-8")

    with tqdm(total=len(files), desc="tokenize", unit="file", disable=not progress,
              dynamic_ncols=True) as bar:
        train_tokens = _tokenize(sp, train_texts, bar)
        val_tokens = _tokenize(sp, val_texts, bar)
    seq_len = params["seq_len"]
    train_seqs, val_seqs = _pack(train_tokens, seq_len), _pack(val_tokens, seq_len)
    for name, seqs, toks in (("train", train_seqs, train_tokens), ("val", val_seqs, val_tokens)):
        if len(seqs) == 0:
            raise ValueError(f"the {name} split has only {len(toks)} tokens, fewer than "
                             f"seq_len={seq_len}; use a smaller seq_len, a larger max_bytes or "
                             f"val_fraction, or a larger source_dir")
    _write_mds(train_seqs, tmp / "train", shard_bytes, progress, "write train")
    _write_mds(val_seqs, tmp / "val", shard_bytes, progress, "write val")

    meta: dict[str, Any] = {
        "format": FORMAT,
        "fingerprint": fingerprint(files, seq_len, params["vocab_size"], params["val_fraction"],
                                   params["seed"], model),
        "seq_len": seq_len,
        "vocab_size": params["vocab_size"],
        "num_train": int(len(train_seqs)),
        "num_val": int(len(val_seqs)),
        "train_files": len(train_files),
        "val_files": len(val_files),
        "train_tokens": int(len(train_tokens)),
        "val_tokens": int(len(val_tokens)),
        "source": params["source"],
        "source_bytes": int(sum(f.size for f in files)),
        "max_bytes": params["max_bytes"],
        "val_fraction": params["val_fraction"],
        "seed": params["seed"],
        "shard_bytes": int(shard_bytes),
        "tokenizer": "tokenizer.model",
        "tokenizer_type": "sentencepiece-bpe-byte-fallback",
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attent-prepare",
        description="Tokenize Python source (default: this interpreter's standard library) into "
                    "packed MDS shards for attent-pretrain.")
    parser.add_argument("--out", required=True, help="output directory (created atomically)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--vocab-size", type=int, default=2048, help="SentencePiece vocabulary")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="expected share of source files held out for validation")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="cap on the total size of the source files read")
    parser.add_argument("--source-dir", default=None,
                        help="tree of .py files (default: the standard library)")
    parser.add_argument("--seed", type=int, default=0, help="split and tokenizer-sample seed")
    parser.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES,
                        help="MDS shard size limit in bytes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        meta = prepare_corpus(args.out, seq_len=args.seq_len, vocab_size=args.vocab_size,
                              val_fraction=args.val_fraction, max_bytes=args.max_bytes,
                              source_dir=args.source_dir, seed=args.seed,
                              progress=not args.quiet, shard_bytes=args.shard_bytes)
    except ValueError as e:
        parser.exit(2, f"attent-prepare: error: {e}\n")
    from .report import format_summary

    keys = ("source", "seq_len", "vocab_size", "train_files", "val_files", "train_tokens",
            "val_tokens", "num_train", "num_val", "fingerprint")
    print(format_summary({k: meta[k] for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
