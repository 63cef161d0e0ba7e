"""The corpus tokenizer: a SentencePiece model trained on the corpus, or one the user brings.

- **Trained** (the default): a byte-fallback BPE SentencePiece model trained on a bounded,
  deterministic sample of the train documents (:class:`TokenizerSample`), saved as
  ``tokenizer.model``, with the fixed special ids ``PAD_ID``..``EOS_ID``.
- **Brought** (``--tokenizer PATH``): a Hugging Face tokenizer directory (``AutoTokenizer``), a
  bare ``tokenizer.json`` (``tokenizers.Tokenizer``) or a SentencePiece ``.model``, loaded offline.
  Its files are copied into the corpus (``tokenizer.model``, or the directory ``tokenizer/``), and
  its end-of-text id is its eos token (or ``--eos-token``).

Documents are encoded without the tokenizer's own special tokens (no BOS), each followed by the
end-of-text id. :func:`encode_stream` encodes batches in worker processes, in input order, with a
bounded number of batches in flight.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io
import json
import os
import queue
import random
import shutil
import struct
import subprocess
import sys
import threading
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
"""Special ids of a trained tokenizer."""
NUM_SPECIAL = 4
NUM_BYTE_PIECES = 256
MIN_VOCAB_SIZE = 320
"""256 byte-fallback pieces + 4 special ids + the ~50 most frequent characters of Python source."""
DEFAULT_VOCAB_SIZE = 2048

SP_FILE = "tokenizer.model"
HF_DIR = "tokenizer"
TRAINED = "sentencepiece-trained"
KINDS = (TRAINED, "sentencepiece", "huggingface", "tokenizers")

# Tokenizer training: a deterministic sample of the train documents, cut into "sentences" of whole
# lines (newlines and indentation kept, so pieces such as "\n    " can be learnt).
TOKENIZER_SAMPLE_CHARS = 4_000_000
TOKENIZER_POOL_CHARS = 1 << 25
"""Train text kept to draw the sample from; a larger corpus is thinned first (bottom-k by hash)."""
TOKENIZER_CHUNK_CHARS = 4096
MAX_SENTENCE_BYTES = 1 << 16  # > 4 bytes per char * TOKENIZER_CHUNK_CHARS
TARGET_CHARACTER_COVERAGE = 0.9999
MIN_CHARACTER_COVERAGE = 0.98  # SentencePiece's own lower limit
CHAR_MARGIN = 8  # vocabulary slots kept free for merges when the character set is capped

# Files of a Hugging Face tokenizer directory beside those its class names (vocab_files_names).
_HF_COMMON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json")


# --------------------------------------------------------------------------------------------
# training


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


class TokenizerSample:
    """A bounded, deterministic sample of train text for SentencePiece.

    Documents are cut into chunks of whole lines. While the chunks total at most ``pool_chars``
    all are kept; beyond that the pool is the chunks of smallest hash(seed, document key, chunk
    index) that fit: a uniform sample that does not depend on the reading order (a chunk evicted
    once lowers the hash limit for good, so the pool is always a prefix in hash order). The
    sample is then the pool in reading order, shuffled with ``seed``, up to ``sample_chars``: for
    a corpus within the pool, exactly the sample the trainer has always drawn.
    """

    def __init__(self, seed: int, pool_chars: int = TOKENIZER_POOL_CHARS,
                 sample_chars: int = TOKENIZER_SAMPLE_CHARS):
        self.seed, self.pool_chars, self.sample_chars = seed, pool_chars, sample_chars
        self._heap: list[tuple[int, int, str]] = []  # (-hash, order, chunk): largest hash first
        self._chars = 0
        self._order = 0
        self._limit: Optional[int] = None  # chunks of this hash or more are not kept
        self.documents = 0

    def add(self, key: str, text: str) -> None:
        self.documents += 1
        for i, chunk in enumerate(_chunks(text)):
            self._order += 1
            h = int.from_bytes(hashlib.blake2b(
                f"{self.seed}\0{key}\0{i}".encode("utf-8", "surrogatepass"),
                digest_size=8).digest(), "big")
            if self._limit is not None and h >= self._limit:
                continue
            heapq.heappush(self._heap, (-h, self._order, chunk))
            self._chars += len(chunk)
            while self._chars > self.pool_chars:
                neg, _, dropped = heapq.heappop(self._heap)
                self._chars -= len(dropped)
                self._limit = -neg if self._limit is None else min(self._limit, -neg)

    def chunks(self) -> list[str]:
        pool = [c for _, _, c in sorted(self._heap, key=lambda e: e[1])]
        random.Random(self.seed).shuffle(pool)
        sample: list[str] = []
        n = 0
        for c in pool:
            if n >= self.sample_chars:
                break
            sample.append(c)
            n += len(c)
        return sample


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


def train_sentencepiece(sample: Sequence[str], vocab_size: int, documents: int) -> bytes:
    """The serialized byte-fallback BPE model trained on ``sample`` (from TokenizerSample).

    Deterministic: one training thread, and the model is serialized from memory, so no output
    path ends up in its trainer spec."""
    import sentencepiece as spm

    if not sample:
        raise ValueError("no train text to train the tokenizer on; add documents to the input")
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
            input_sentence_size=0, shuffle_input_sentence=False,  # sampled already, with the seed
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        chars = sum(map(len, sample))
        raise ValueError(f"SentencePiece could not train a vocab_size={vocab_size} tokenizer on "
                         f"{documents} train documents ({chars} characters sampled): {e}. Try a "
                         f"smaller vocab_size or a larger corpus (max_bytes / inputs).") from e
    return model.getvalue()


def train_tokenizer(texts: Iterable[str], vocab_size: int, seed: int) -> bytes:
    """The serialized byte-fallback BPE model trained on a deterministic sample of ``texts``."""
    sample = TokenizerSample(seed)
    for i, t in enumerate(texts):
        sample.add(str(i), t)
    return train_sentencepiece(sample.chunks(), vocab_size, sample.documents)


# --------------------------------------------------------------------------------------------
# loading


@dataclass(frozen=True)
class TokenizerRecipe:
    """How to load an encoder (plain fields, sent to worker processes as JSON: each loads its
    own)."""
    kind: str
    path: str
    """The ``.model`` file, the Hugging Face directory or the ``tokenizer.json``."""
    eos_id: int
    backend_json: Optional[str] = None
    """A fast Hugging Face tokenizer's backend as transformers loaded it (``to_str()``):
    workers rebuild exactly that with the ``tokenizers`` library, without importing
    transformers (seconds per process) or re-deriving what its loading adjusts."""

    def load(self, threads: int) -> Callable[[list[str]], list[list[int]]]:
        if self.backend_json is not None:
            from tokenizers import Tokenizer
            return _encoder("tokenizers", _untruncated(Tokenizer.from_str(self.backend_json)),
                            threads)
        return _encoder(self.kind, _load_backend(self.kind, self.path), threads)


def _load_backend(kind: str, path: str):
    if kind in (TRAINED, "sentencepiece"):
        import sentencepiece as spm
        return spm.SentencePieceProcessor(model_file=path)
    if kind == "tokenizers":
        from tokenizers import Tokenizer
        return _untruncated(Tokenizer.from_file(path))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _untruncated(tok):
    # A tokenizer.json may carry truncation or padding settings meant for model inputs.
    tok.no_truncation()
    tok.no_padding()
    return tok


def _encoder(kind: str, backend, threads: int) -> Callable[[list[str]], list[list[int]]]:
    if kind in (TRAINED, "sentencepiece"):
        return lambda texts: backend.encode(texts, num_threads=threads)
    if kind == "huggingface" and not getattr(backend, "is_fast", False):
        return lambda texts: backend(texts, add_special_tokens=False, verbose=False)["input_ids"]
    if kind == "huggingface":
        # What a fast tokenizer's __call__ runs, without building a BatchEncoding per batch.
        backend = _untruncated(backend.backend_tokenizer)
    return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def _vocab_extent(kind: str, backend) -> int:
    """The embedding rows the tokenizer's ids need: max(its length, largest id + 1)."""
    if kind in (TRAINED, "sentencepiece"):
        return int(backend.get_piece_size())
    if kind == "tokenizers":
        vocab = backend.get_vocab(with_added_tokens=True)
        return max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    return max(len(backend), max(backend.get_vocab().values()) + 1)


@dataclass(frozen=True)
class ExternalTokenizer:
    """A tokenizer the user brought, inspected: what the corpus records about it."""
    kind: str
    path: str
    """Where it was found (absolute)."""
    files: tuple[str, ...]
    """Its files (absolute), copied into the corpus."""
    sha256: str
    size: int
    """Embedding rows its ids need (>= largest id + 1)."""
    eos_id: int
    eos_token: str
    special_ids: dict

    def origin(self) -> dict:
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256, "size": self.size,
                "files": [Path(f).name for f in self.files], "eos_token": self.eos_token}


def _files_hash(files: Sequence[PathLike]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: Path(p).name):
        data = Path(f).read_bytes()
        h.update(f"{Path(f).name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _hf_files(root: Path, tok) -> tuple[str, ...]:
    names = set(_HF_COMMON_FILES) | set(getattr(tok, "vocab_files_names", {}).values())
    return tuple(str(root / n) for n in sorted(names) if (root / n).is_file())


def inspect_tokenizer(path: PathLike, eos_token: Optional[str] = None) -> ExternalTokenizer:
    """Load a brought tokenizer (offline) and find its end-of-text id; ValueError if unusable."""
    p = Path(path).expanduser().resolve()
    arg = f"--tokenizer {path}"
    fix_eos = "pass --eos-token with the token that ends a document (e.g. </s> or <|endoftext|>)"
    if not p.exists():
        raise ValueError(f"{arg}: no such file or directory; give a Hugging Face tokenizer "
                         f"directory, a tokenizer.json or a SentencePiece .model")
    if p.is_dir():
        kind, files = "huggingface", None
    elif p.suffix == ".json":
        kind, files = "tokenizers", (str(p),)
    elif p.suffix == ".model":
        kind, files = "sentencepiece", (str(p),)
    else:
        raise ValueError(f"{arg}: {p.name} is neither a directory, a tokenizer.json nor a "
                         f"SentencePiece .model")
    try:
        backend = _load_backend(kind, str(p))
        if kind == "huggingface":
            files = _hf_files(p, backend)
    except Exception as e:  # each library raises its own types; all mean "not loadable"
        raise ValueError(f"{arg}: cannot be loaded as a {kind} tokenizer "
                         f"({type(e).__name__}: {str(e)[:300]})") from None

    if kind == "sentencepiece":
        def token_id(t):
            i = backend.piece_to_id(t)
            return i if backend.id_to_piece(i) == t else None
        own = backend.eos_id()
        own = None if own < 0 else backend.id_to_piece(own)
        special = {k: (None if v < 0 else v) for k, v in (
            ("pad_id", backend.pad_id()), ("unk_id", backend.unk_id()),
            ("bos_id", backend.bos_id()))}
    elif kind == "tokenizers":
        token_id, own = backend.token_to_id, None
        special = {"pad_id": None, "unk_id": None, "bos_id": None}
        if eos_token is None:
            specials = [t.content for t in backend.get_added_tokens_decoder().values()
                        if t.special]
            raise ValueError(f"{arg}: a bare tokenizer.json names no eos token; {fix_eos} "
                             f"(its special tokens: {specials[:10]}), or give the directory "
                             f"with its tokenizer_config.json")
    else:
        def token_id(t):
            i = backend.convert_tokens_to_ids(t)
            return i if i is not None and backend.convert_ids_to_tokens(i) == t else None
        own = backend.eos_token
        special = {"pad_id": backend.pad_token_id, "unk_id": backend.unk_token_id,
                   "bos_id": backend.bos_token_id}
    token = eos_token if eos_token is not None else own
    if token is None:
        raise ValueError(f"{arg}: the tokenizer has no eos token; {fix_eos}")
    eos_id = token_id(token)
    if eos_id is None:
        raise ValueError(f"{arg}: the eos token {token!r} is not in its vocabulary; {fix_eos}")
    return ExternalTokenizer(kind=kind, path=str(p), files=tuple(files),
                             sha256=_files_hash(files), size=_vocab_extent(kind, backend),
                             eos_id=int(eos_id), eos_token=token, special_ids=special)


def install_tokenizer(ext: ExternalTokenizer, corpus_dir: Path) -> tuple[str, TokenizerRecipe]:
    """Copy the tokenizer's files into ``corpus_dir``; (its path there, a recipe loading it)."""
    if ext.kind == "sentencepiece":
        shutil.copyfile(ext.files[0], corpus_dir / SP_FILE)
        return SP_FILE, TokenizerRecipe(ext.kind, str(corpus_dir / SP_FILE), ext.eos_id)
    dest = corpus_dir / HF_DIR
    dest.mkdir()
    if ext.kind == "tokenizers":
        shutil.copyfile(ext.files[0], dest / "tokenizer.json")  # whatever its name was
        # Lets AutoTokenizer (export, fine-tuning) load the copy with the corpus's eos token.
        (dest / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": ext.eos_token},
            indent=1) + "\n")
        return HF_DIR, TokenizerRecipe(ext.kind, str(dest / "tokenizer.json"), ext.eos_id)
    for f in ext.files:
        shutil.copyfile(f, dest / Path(f).name)
    copy = _load_backend("huggingface", str(dest))
    if _vocab_extent("huggingface", copy) != ext.size:
        raise ValueError(f"--tokenizer {ext.path}: its copy in {dest} loads differently (files "
                         f"copied: {[Path(f).name for f in ext.files]}); save the tokenizer "
                         f"with save_pretrained into a directory of its own and pass that")
    backend = copy.backend_tokenizer.to_str() if getattr(copy, "is_fast", False) else None
    return HF_DIR, TokenizerRecipe(ext.kind, str(dest), ext.eos_id, backend)


def load_tokenizer(out_dir: PathLike):
    """The prepared directory's SentencePiece tokenizer (``sentencepiece.SentencePieceProcessor``).

    For any corpus tokenizer (also a Hugging Face one) use :func:`load_corpus_tokenizer`."""
    import sentencepiece as spm

    path = Path(out_dir) / SP_FILE
    if not path.is_file():
        if (Path(out_dir) / HF_DIR).is_dir():
            raise FileNotFoundError(f"{out_dir} holds a Hugging Face tokenizer ({HF_DIR}/), not "
                                    f"a SentencePiece {SP_FILE}; use load_corpus_tokenizer")
        raise FileNotFoundError(f"no tokenizer at {path}; prepare the corpus first "
                                f"(attent-prepare --out {out_dir})")
    return spm.SentencePieceProcessor(model_file=str(path))


class CorpusTokenizer:
    """A corpus's tokenizer, whatever its kind: ``encode`` (no special tokens), ``decode``."""

    def __init__(self, kind: str, path: str, eos_id: int):
        self.kind, self.path, self.eos_id = kind, path, eos_id
        self._backend = _load_backend(kind, path)
        self._encode = _encoder(kind, self._backend, threads=1)
        self.size = _vocab_extent(kind, self._backend)
        """Embedding rows the ids need (>= largest id + 1)."""

    def encode(self, text: str) -> list[int]:
        return list(self._encode([text])[0])

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind in (TRAINED, "sentencepiece"):
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=False)


def _corpus_recipe(corpus_dir: Path) -> TokenizerRecipe:
    meta_path = corpus_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    origin = meta.get("tokenizer_origin") or {"kind": TRAINED}
    rel = meta.get("tokenizer") or SP_FILE
    path = corpus_dir / rel
    if origin["kind"] == "tokenizers":
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{corpus_dir} has no tokenizer ({path} is missing); prepare the "
                                f"corpus with attent-prepare, or give the model's vocabulary "
                                f"size yourself for a dataset without one")
    return TokenizerRecipe(origin["kind"], str(path), int(meta.get("eos_id", EOS_ID)))


def load_corpus_tokenizer(corpus_dir: PathLike) -> CorpusTokenizer:
    """The tokenizer a prepared corpus was built with (copied into it), of any kind."""
    r = _corpus_recipe(Path(corpus_dir))
    return CorpusTokenizer(r.kind, r.path, r.eos_id)


def corpus_tokenizer_size(corpus_dir: PathLike) -> int:
    """Embedding rows a model needs for the corpus's tokenizer (largest id + 1, or more).

    The training job refuses a model whose embedding is smaller: an id past it indexes out of
    range (a crash on CPU, a device assert or silent garbage on GPU). FileNotFoundError when
    the corpus holds no tokenizer (an external MDS dataset).
    """
    r = _corpus_recipe(Path(corpus_dir))
    return _vocab_extent(r.kind, _load_backend(r.kind, r.path))


# --------------------------------------------------------------------------------------------
# encoding in worker processes


def _encode_flat(encode, eos_id: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(every text's ids followed by eos, as one int32 array; each text's length with eos)."""
    parts = []
    eos = np.array([eos_id], dtype=np.int32)
    for ids in encode(texts):
        parts.append(np.asarray(ids, dtype=np.int32))
        parts.append(eos)
    lengths = np.array([len(p) + 1 for p in parts[0::2]], dtype=np.int64)
    return np.concatenate(parts) if parts else np.zeros(0, np.int32), lengths


def _read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return data


def _send(stream, obj) -> None:
    """One message to or from a worker, never a pickle: an answer ("ok", ids, lengths) as raw
    little-endian arrays; anything else (the recipe, a batch of texts, an error) as JSON."""
    if isinstance(obj, tuple) and obj and obj[0] == "ok":
        ids, lengths = np.ascontiguousarray(obj[1], "<i4"), np.ascontiguousarray(obj[2], "<i8")
        stream.write(struct.pack("<cQQ", b"A", len(ids), len(lengths)))
        stream.write(ids.tobytes())
        stream.write(lengths.tobytes())
    else:
        if isinstance(obj, TokenizerRecipe):
            obj = {"recipe": dataclasses.asdict(obj)}
        data = json.dumps(obj).encode("utf-8")
        stream.write(struct.pack("<cQ", b"J", len(data)))
        stream.write(data)
    stream.flush()


def _recv(stream):
    kind = stream.read(1)
    if not kind:
        raise EOFError
    if kind == b"A":
        n, m = struct.unpack("<QQ", _read_exactly(stream, 16))
        ids = np.frombuffer(_read_exactly(stream, 4 * n), "<i4").astype(np.int32)
        lengths = np.frombuffer(_read_exactly(stream, 8 * m), "<i8").astype(np.int64)
        return ("ok", ids, lengths)
    (size,) = struct.unpack("<Q", _read_exactly(stream, 8))
    obj = json.loads(_read_exactly(stream, size))
    if isinstance(obj, dict) and "recipe" in obj:
        return TokenizerRecipe(**obj["recipe"])
    return obj


class _Workers:
    """Encoding processes fed batch i by worker i % n; each answers in the order it was fed.

    Plain subprocesses of ``python -m attent_scale.corpus_tokenizer`` rather than a
    multiprocessing pool: spawn and forkserver re-run the caller's main script (a script without
    an ``if __name__ == "__main__"`` guard would then crash its workers), and fork is unsafe in a
    process holding threads (tqdm, a tokenizers pool, a process group).
    """

    def __init__(self, recipe: TokenizerRecipe, n: int):
        pkg_root = str(Path(__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        # One process per worker is the parallelism: no thread pools inside them as well.
        env = {**os.environ, "PYTHONPATH": pkg_root + (os.pathsep + path if path else ""),
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.procs = []
        for _ in range(n):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "attent_scale.corpus_tokenizer"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, env=env))
            _send(self.procs[-1].stdin, recipe)

    def submit(self, i: int, texts: list[str]) -> None:
        try:
            _send(self.procs[i % len(self.procs)].stdin, texts)
        except (BrokenPipeError, OSError):
            self._died(i)

    def result(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            status, *value = _recv(self.procs[i % len(self.procs)].stdout)
        except EOFError:
            self._died(i)
        if status != "ok":
            raise RuntimeError(f"tokenizer worker failed on a batch: {value[0]}")
        return value[0], value[1]

    def _died(self, i: int):
        proc = self.procs[i % len(self.procs)]
        raise RuntimeError(f"tokenizer worker (pid {proc.pid}) exited with code {proc.wait()} "
                           f"(its message is above, on stderr); if it ran out of memory, retry "
                           f"with fewer workers") from None

    def close(self, abort: bool = False) -> None:
        """End the workers: after their last batch, or at once (``abort``: answers unread)."""
        for proc in self.procs:
            if abort:
                proc.kill()
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def _worker_main() -> None:
    """A worker: read the recipe, then encode each batch sent on stdin, answering on stdout."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the answers
    recipe = _recv(inp)
    batches: queue.Queue = queue.Queue()

    def read() -> None:
        # Draining stdin on a thread: the parent may send the next batch while this process is
        # still blocked writing the previous answer; both pipes full would be a deadlock.
        while True:
            try:
                batches.put(_recv(inp))
            except EOFError:
                batches.put(None)
                return

    threading.Thread(target=read, daemon=True).start()
    try:
        encode, failure = recipe.load(threads=1), None
    except Exception as e:  # reported with the first batch, where the parent waits for it
        encode, failure = None, f"{type(e).__name__}: {e}"
    while (texts := batches.get()) is not None:
        try:
            if failure:
                raise RuntimeError(f"the tokenizer did not load ({failure})")
            answer = ("ok", *_encode_flat(encode, recipe.eos_id, texts))
        except Exception:
            answer = ("error", traceback.format_exc(limit=3))
        _send(out, answer)


def encode_stream(recipe: TokenizerRecipe, batches: Iterable[tuple[Any, list[str]]],
                  workers: int) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """(tag, ids, lengths) for each (tag, texts) batch, in input order, see ``_encode_flat``.

    With ``workers > 1`` batches are encoded by that many worker processes; at most
    ``2 * workers`` batches are in flight, so memory stays bounded however long the input.
    """
    if workers <= 1:
        encode = recipe.load(threads=min(os.cpu_count() or 1, 8))
        for tag, texts in batches:
            yield (tag, *_encode_flat(encode, recipe.eos_id, texts))
        return
    pool = _Workers(recipe, workers)
    pending: deque = deque()
    done = False
    try:
        for i, (tag, texts) in enumerate(batches):
            pool.submit(i, texts)
            pending.append((i, tag))
            if len(pending) >= 2 * workers:
                j, tag0 = pending.popleft()
                yield (tag0, *pool.result(j))
        while pending:
            j, tag0 = pending.popleft()
            yield (tag0, *pool.result(j))
        done = True
    finally:
        pool.close(abort=not done)


if __name__ == "__main__":
    _worker_main()
