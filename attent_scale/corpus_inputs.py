"""Corpus inputs: ``--input`` specs, the documents they hold and the train/validation split.

An input spec names one *source*; a corpus is built from one or more sources, each packed into
its own sequences and recorded by its index (the MDS ``source`` column). Syntax::

    [NAME=]KIND:TARGET   or   [NAME=]GLOB   (same as text:GLOB)

=========================  ======================================================================
``text:GLOB``              text files, any extension, one document per file; ``**`` matches any
                           depth; ``.gz`` and ``.zst`` files are decompressed
``jsonl:GLOB``             JSON Lines (also ``.gz``/``.zst``), one document per record, the text
                           in the record's text field (``--text-field``, default ``text``)
``parquet:GLOB``           Parquet files, one document per row, the text in the text field
``hf-disk:PATH[#SPLIT]``   a ``datasets`` dataset saved with ``save_to_disk``; a DatasetDict
                           needs ``#SPLIT`` unless it has a single split
``hf:BUILDER:GLOB``        local files through ``datasets.load_dataset(BUILDER, data_files=...)``
                           (``json``, ``parquet``, ``csv``, ``text``; ``text`` reads each file as
                           one document, not one per line), streamed
=========================  ======================================================================

NAME defaults to the spec as written. Every document must be valid UTF-8; empty documents are
skipped. Without ``--input`` the corpus is the legacy tree of ``*.py`` files (``source_dir``,
by default the standard library), read as before (undecodable bytes replaced).

The split is by document, from a stable hash of the document's location and the seed: a text
file's path relative to the glob's fixed prefix, ``path:line`` for JSON Lines, ``path:row`` for
Parquet and the record index for ``datasets`` sources. For sources of whole files the split is
decided on the file list, so at least one file of a source of two or more lands on each side.
"""
from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import io
import json
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

KINDS = ("text", "jsonl", "parquet", "hf-disk", "hf")
RECORD_KINDS = frozenset({"jsonl", "parquet", "hf-disk", "hf"})
"""Kinds whose documents are records with a text field (the others are whole files)."""
PY_TREE = "py-tree"
"""The legacy source: ``*.py`` files under a directory (``source_dir``)."""
DEFAULT_TEXT_FIELD = "text"

STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                              "__pycache__"})
_HASH_BUCKETS = 10_000
_NAME = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$", re.S)
_KIND = re.compile(r"^([a-z][a-z0-9-]*):(.+)$", re.S)


class InputError(ValueError):
    """A problem with an input, in one line naming the input, the place in it and the fix."""


@dataclass(frozen=True)
class SourceFile:
    rel: str
    """Path relative to the source root, with forward slashes (hashed for the split)."""
    path: Path
    size: int


@dataclass(frozen=True)
class InputSpec:
    """One parsed ``--input``: what to read and how, with absolute paths."""
    name: str
    kind: str
    target: str
    """Glob (text, jsonl, parquet, hf), dataset directory (hf-disk) or directory (py-tree)."""
    builder: Optional[str] = None
    split: Optional[str] = None
    text_field: Optional[str] = None
    skip_dirs: frozenset = field(default=frozenset())

    def describe(self) -> str:
        """The canonical one-line form (compared when an existing corpus is reused)."""
        if self.kind == PY_TREE:
            return self.target  # the legacy meta["source"]
        target = f"{self.builder}:{self.target}" if self.kind == "hf" else self.target
        if self.split is not None:
            target += f"#{self.split}"
        fld = f" field={self.text_field}" if self.kind in RECORD_KINDS else ""
        return f"{self.name}={self.kind}:{target}{fld}"


@dataclass(frozen=True)
class Document:
    key: str
    """The document's location, hashed for the split."""
    text: str


# --------------------------------------------------------------------------------------------
# specs


def default_source() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def py_tree_spec(source_dir: Optional[PathLike]) -> InputSpec:
    """The legacy source: ``source_dir`` (default: the standard library, without test suites)."""
    if source_dir is None:
        root = default_source()
    else:
        root = Path(source_dir).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"source_dir={str(source_dir)!r} is not a directory")
    stdlib = root == default_source()
    return InputSpec(name="stdlib" if stdlib else root.name, kind=PY_TREE, target=str(root),
                     skip_dirs=STDLIB_SKIP_DIRS if stdlib else frozenset())


def _abs(pattern: str) -> str:
    return os.path.abspath(os.path.expanduser(pattern))


def parse_input(spec: str) -> InputSpec:
    """``[NAME=]KIND:TARGET`` or ``[NAME=]GLOB`` as an :class:`InputSpec` (text field unset)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"--input {spec!r} is empty; give KIND:TARGET or a glob of text files")
    name, rest = None, spec
    m = _NAME.match(spec)
    if m:
        name, rest = m.group(1), m.group(2)
    m = _KIND.match(rest)
    kind, target = (m.group(1), m.group(2)) if m else ("text", rest)
    if kind not in KINDS:
        raise InputError(f"--input {spec!r}: unknown kind {kind!r}; use one of "
                         f"{', '.join(KINDS)} (write text:PATH for a path that holds a colon)")
    builder = split = None
    if kind == "hf":
        builder, sep, target = target.partition(":")
        if not sep or not builder or not target:
            raise InputError(f"--input {spec!r}: hf needs a builder and a glob, e.g. "
                             f"hf:json:data/*.jsonl.gz or hf:parquet:data/*.parquet")
    elif kind == "hf-disk" and "#" in target:
        target, split = target.rsplit("#", 1)
    if not target:
        raise InputError(f"--input {spec!r} names no path")
    return InputSpec(name=name or spec, kind=kind, target=_abs(target), builder=builder,
                     split=split)


def parse_inputs(specs: Sequence[str], text_field: Union[None, str, Sequence[str]] = None
                 ) -> list[InputSpec]:
    """Parse every ``--input`` and attach its text field.

    ``text_field``: ``FIELD`` for every record source, or a list of ``FIELD`` / ``NAME=FIELD``
    entries (the latter for one named source).
    """
    from dataclasses import replace

    parsed = [parse_input(s) for s in specs]
    names = [p.name for p in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"--input names {dup} more than once; name each source once "
                         f"(NAME=SPEC)")
    default, per_source = DEFAULT_TEXT_FIELD, {}
    entries = [text_field] if isinstance(text_field, str) else list(text_field or [])
    for entry in entries:
        m = _NAME.match(entry)
        if m and m.group(1) in names:
            per_source[m.group(1)] = m.group(2)
        elif m and "=" in entry and not entry.startswith("="):
            raise InputError(f"--text-field {entry!r}: no source named {m.group(1)!r}; "
                             f"sources are {names}")
        else:
            default = entry
    out = []
    for p in parsed:
        if p.name in per_source and p.kind not in RECORD_KINDS:
            raise InputError(f"--text-field {p.name}={per_source[p.name]}: source {p.name!r} "
                             f"reads whole {p.kind} files and has no fields")
        fld = per_source.get(p.name, default) if p.kind in RECORD_KINDS else None
        out.append(replace(p, text_field=fld))
    return out


# --------------------------------------------------------------------------------------------
# files


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
    return _capped(found, max_bytes)


def _capped(found: Sequence[tuple[str, Path]], max_bytes: Optional[int]) -> list[SourceFile]:
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


def _glob_root(pattern: str) -> Path:
    """The longest leading directory of ``pattern`` without wildcards (rel paths start there)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if globlib.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def glob_files(spec: InputSpec, max_bytes: Optional[int] = None) -> list[SourceFile]:
    """The files of a glob spec in sorted order (a size cap takes a prefix, as for py-trees)."""
    pattern = spec.target
    if os.path.isdir(pattern):
        raise InputError(f"--input {spec.name}: {pattern} is a directory; give a glob of files, "
                         f"e.g. {os.path.join(pattern, '**', '*.txt')}")
    root = _glob_root(pattern)
    found = sorted((Path(p).relative_to(root).as_posix(), Path(p))
                   for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    if not found:
        raise InputError(f"--input {spec.name}: {pattern} matches no files; check the path "
                         f"(wildcards: *, ?, [...], ** for any depth)")
    # Record sources are capped by the text they yield, not by file size.
    cap = None if spec.kind in RECORD_KINDS else max_bytes
    files = _capped(found, cap)
    if not files:
        raise InputError(f"--input {spec.name}: the {len(found)} files matching {pattern} are "
                         f"all empty")
    return files


def source_files(spec: InputSpec, max_bytes: Optional[int] = None) -> list[SourceFile]:
    """The files a source reads, in reading order (their paths and sizes enter the
    fingerprint, so a changed input is noticed when a corpus is reused)."""
    if spec.kind == PY_TREE:
        return list_source_files(spec.target, max_bytes, skip_dirs=spec.skip_dirs)
    if spec.kind == "hf-disk":
        root = Path(spec.target)
        if not root.is_dir():
            raise InputError(f"--input {spec.name}: {root} is not a directory; give a dataset "
                             f"saved with Dataset.save_to_disk")
        found = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                       if p.is_file())
        return [SourceFile(rel, p, p.stat().st_size) for rel, p in found]
    return glob_files(spec, max_bytes)


# --------------------------------------------------------------------------------------------
# the split


def _bucket(rel: str, seed: int) -> int:
    h = hashlib.blake2b(f"{seed}\0{rel}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") % _HASH_BUCKETS


def is_val(key: str, val_fraction: float, seed: int) -> bool:
    """Whether the document at ``key`` is held out (its hash bucket < val_fraction * 10_000)."""
    return _bucket(key, seed) < val_fraction * _HASH_BUCKETS


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


# --------------------------------------------------------------------------------------------
# reading


def open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it ends in ``.gz`` or ``.zst``."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise InputError(f"{path}: reading .zst files needs the zstandard package "
                             f"(pip install zstandard)") from e
        raw = open(path, "rb")
        # read_across_frames: files concatenated with `cat a.zst b.zst` hold several frames.
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                            closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb")


def _compressed(path: Path) -> bool:
    return path.name.lower().endswith((".gz", ".zst"))


def _decode(data: bytes, path: Path, base: int = 0, where: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        off = base + e.start
        newlines = data.count(b"\n", 0, e.start)
        line = "" if where else f", line {newlines + 1}"
        what = " of the decompressed text" if _compressed(path) else ""
        raise InputError(f"{path}{where}: not UTF-8 at byte offset {off}{what}{line} "
                         f"({e.reason}, byte 0x{data[e.start]:02x}); convert the file to UTF-8 "
                         f"(e.g. iconv -f latin1 -t utf-8) or leave it out of the input") from None


def _read_all(path: Path) -> bytes:
    try:
        with open_binary(path) as f:
            return f.read()
    except InputError:
        raise
    except (OSError, EOFError, ValueError) as e:  # bad gzip/zstd data, unreadable file
        raise InputError(f"{path}: cannot be read ({type(e).__name__}: {e}); check the file "
                         f"or leave it out of the input") from None


def _zstd_error() -> tuple:
    try:
        import zstandard
        return (zstandard.ZstdError,)
    except ImportError:
        return ()


def _jsonl_records(path: Path, field_name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a JSON Lines file."""
    offset = 0
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                where = f" line {lineno}"
                line = _decode(raw, path, start, where)
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path} line {lineno}: not valid JSON ({e.msg} at column "
                                     f"{e.colno}); fix or remove this record") from None
                yield lineno, _field(rec, field_name, f"{path} line {lineno}")
    except (OSError, EOFError, *_zstd_error()) as e:
        raise InputError(f"{path}: cannot be read after byte {offset} of its text "
                         f"({type(e).__name__}: {e}); the file may be truncated") from None


def _field(rec, field_name: str, where: str) -> str:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: a JSON {type(rec).__name__} where an object with a "
                         f"{field_name!r} field is expected; fix or remove this record")
    if field_name not in rec:
        keys = ", ".join(map(str, list(rec)[:10])) or "none"
        raise InputError(f"{where}: no field {field_name!r} (fields: {keys}); pass "
                         f"--text-field with the field that holds the text")
    text = rec[field_name]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {field_name!r} is {type(text).__name__}, not a "
                         f"string; fix the record or pick another --text-field")
    return text


def _parquet_rows(path: Path, field_name: str) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    if field_name not in schema.names:
        raise InputError(f"{path}: no column {field_name!r} (columns: "
                         f"{', '.join(schema.names[:10])}); pass --text-field with the column "
                         f"that holds the text")
    typ = schema.field(field_name).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise InputError(f"{path}: column {field_name!r} is {typ}, not a string; pick another "
                         f"--text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[field_name]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise InputError(f"{path} row {row}: {field_name!r} is null; fill or drop the "
                                 f"row")
            yield row, text
            row += 1


def _dataset_rows(spec: InputSpec) -> Iterator[tuple[int, str]]:
    """(record index, text) of a ``datasets`` source, read lazily."""
    import datasets

    fld = spec.text_field
    if spec.kind == "hf-disk":
        try:
            ds = datasets.load_from_disk(spec.target)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--input {spec.name}: {spec.target} is not a dataset saved with "
                             f"save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = sorted(ds)
            pick = spec.split if spec.split is not None else (splits[0] if len(splits) == 1
                                                              else None)
            if pick not in ds:
                raise InputError(f"--input {spec.name}: {spec.target} holds the splits {splits}; "
                                 f"name one as hf-disk:{spec.target}#SPLIT")
            ds = ds[pick]
        elif spec.split is not None:
            raise InputError(f"--input {spec.name}: {spec.target} is a single Dataset without "
                             f"splits; drop #{spec.split}")
        if fld not in ds.column_names:
            raise InputError(f"--input {spec.name}: {spec.target} has no column {fld!r} "
                             f"(columns: {', '.join(ds.column_names[:10])}); pass --text-field")
        # A memory-mapped Arrow table: batches are read from disk as they are consumed.
        row = 0
        for batch in ds.select_columns([fld]).iter(batch_size=1024):
            for text in batch[fld]:
                if not isinstance(text, str):
                    raise InputError(f"--input {spec.name}: {spec.target} row {row}: {fld!r} is "
                                     f"{type(text).__name__}, not a string")
                yield row, text
                row += 1
        return
    files = [str(f.path) for f in glob_files(spec)]
    kwargs = {"sample_by": "document"} if spec.builder == "text" else {}
    try:
        # streaming=True: records are parsed as they are consumed and no Arrow cache is written.
        ds = datasets.load_dataset(spec.builder, data_files=files, split="train",
                                   streaming=True, **kwargs)
        for row, rec in enumerate(ds):
            yield row, _field(rec, fld, f"--input {spec.name} record {row}")
    except InputError:
        raise
    except Exception as e:  # datasets raises many types; all mean "this input is unreadable"
        raise InputError(f"--input {spec.name}: datasets.load_dataset({spec.builder!r}) cannot "
                         f"read {spec.target} ({type(e).__name__}: {str(e)[:300]})") from None


def documents(spec: InputSpec, files: Sequence[SourceFile], max_bytes: Optional[int] = None,
              only: Optional[frozenset] = None) -> Iterator[Document]:
    """The source's non-empty documents in order, read lazily.

    ``files``: from :func:`source_files`. ``max_bytes`` caps a record source by the UTF-8 bytes
    of its documents (the first document that would exceed it ends the source); whole-file
    sources were capped by :func:`source_files`. ``only``: read just these file ``rel`` paths
    (whole-file sources; the other files are not opened).
    """
    if spec.kind in (PY_TREE, "text"):
        for f in files:
            if only is not None and f.rel not in only:
                continue
            if spec.kind == PY_TREE:
                # The legacy corpus replaced undecodable bytes; kept so its figures do not move.
                text = f.path.read_bytes().decode("utf-8", errors="replace")
            else:
                text = _decode(_read_all(f.path), f.path)
            if text:
                yield Document(f.rel, text)
        return
    if spec.kind == "jsonl":
        rows = ((f"{f.rel}:{n}", t) for f in files for n, t in _jsonl_records(f.path,
                                                                                spec.text_field))
    elif spec.kind == "parquet":
        rows = ((f"{f.rel}:{n}", t) for f in files for n, t in _parquet_rows(f.path,
                                                                              spec.text_field))
    else:
        rows = ((str(n), t) for n, t in _dataset_rows(spec))
    total = 0
    for key, text in rows:
        if not text:
            continue
        if max_bytes is not None:
            total += len(text.encode("utf-8"))
            if total > max_bytes:
                return
        yield Document(key, text)
