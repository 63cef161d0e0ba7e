"""Opening a corpus for training: made by ``attent-prepare``, or an MDS dataset from elsewhere.

:func:`open_corpus` returns the same meta keys for both, so a training job reads either:

- a prepared corpus: its ``meta.json`` (older ones completed with the keys added since);
- an external dataset laid out as ``DIR/train`` and ``DIR/val`` (e.g. written with streaming's
  ``MDSWriter``): its ``index.json`` files are checked against what training needs (a token column
  holding 1-D integer arrays of one fixed length; optional integer ``source`` / ``id`` columns)
  and described in a meta dict, without reading the token values themselves.

:func:`verify_split` checks a split's shards (present, sizes, SHA-1) before training starts.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]

TOKEN_COLUMN = "tokens"
SOURCE_COLUMN = "source"
TOKEN_COLUMN_GUESSES = (TOKEN_COLUMN, "input_ids")
"""Token columns looked for in an external dataset when none is named."""
EXTERNAL_FORMAT = "mds-external"
SPLITS = ("train", "val")

_INT_SCALARS = frozenset({"int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                          "uint64"})
_INT_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                         "uint64"})
# streaming's NDArray codes for value dtypes stored per sample (format/mds/encodings.py).
_DTYPE_CODES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32",
                33: "int32", 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}


# --------------------------------------------------------------------------------------------
# verifying shards


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
# opening


def open_corpus(path: PathLike, token_column: Optional[str] = None) -> dict:
    """The meta dict of a corpus directory, prepared or external (see the module docstring).

    Every meta carries ``seq_len``, ``num_train``, ``num_val``, ``fingerprint``, ``vocab_size``
    (None when unknown: an external dataset), ``token_column``, ``source_column`` (None when
    samples carry no source id), ``sources`` (names by id, or None when unknown), ``eos_id`` and
    ``format``. ``token_column``: the column holding the token ids (external datasets; default
    the first of ``tokens``, ``input_ids`` present). Raises ValueError naming the directory, the
    column and the fix.
    """
    root = Path(path)
    if (root / "meta.json").is_file():
        try:
            meta = json.loads((root / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{root / 'meta.json'} cannot be read ({e}); delete {root} and "
                             f"prepare it again") from None
        meta = complete_meta(meta, root)
        if token_column is not None and token_column != meta["token_column"]:
            raise ValueError(f"{root} is a prepared corpus whose token column is "
                             f"{meta['token_column']!r}, not {token_column!r}; drop the token "
                             f"column option")
        return meta
    return _open_external(root, token_column)


def complete_meta(meta: dict, root: Optional[Path] = None) -> dict:
    """A prepared corpus's meta with the keys added since its format began (older corpora)."""
    meta = dict(meta)
    meta.setdefault("token_column", TOKEN_COLUMN)
    if "source_column" not in meta:
        cols = _index_columns(root / "train") if root is not None else []
        meta["source_column"] = SOURCE_COLUMN if SOURCE_COLUMN in cols else None
    if "sources" not in meta:
        meta["sources"] = [Path(meta["source"]).name] if meta.get("source") else None
    if "tokenizer_origin" not in meta and meta.get("tokenizer") == "tokenizer.model":
        meta["tokenizer_origin"] = {"kind": "sentencepiece-trained", "path": None,
                                    "size": meta.get("vocab_size")}
    return meta


def _index_columns(split_dir: Path) -> list:
    try:
        return json.loads((split_dir / "index.json").read_text())["shards"][0]["column_names"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return []


def _read_index(root: Path, split: str) -> tuple[dict, bytes]:
    path = root / split / "index.json"
    try:
        raw = path.read_bytes()
        index = json.loads(raw)
        shards = index["shards"]
        if not isinstance(shards, list):
            raise TypeError("'shards' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{root}: no meta.json (not a prepared corpus) and {path} is missing or "
                         f"unreadable ({type(e).__name__}: {e}); give a corpus made by "
                         f"attent-prepare or an MDS dataset laid out as DIR/train and "
                         f"DIR/val") from None
    if not shards:
        raise ValueError(f"{path} lists no shards (an empty split); write samples to it or "
                         f"give another dataset")
    for s in shards:
        if s.get("format") != "mds":
            raise ValueError(f"{path}: a shard of format {s.get('format')!r}; only MDS shards "
                             f"(streaming's MDSWriter) are read")
    return index, raw


def _parse_ndarray(encoding: str) -> Optional[tuple[Optional[str], Optional[tuple]]]:
    """(dtype or None, shape or None) of an ``ndarray[:dtype[:shape]]`` encoding, else None."""
    parts = encoding.split(":")
    if parts[0] != "ndarray" or len(parts) > 3:
        return None
    dtype = parts[1] if len(parts) > 1 and parts[1] else None
    shape = tuple(int(d) for d in parts[2].split(",")) if len(parts) > 2 else None
    return dtype, shape


def _open_external(root: Path, token_column: Optional[str]) -> dict:
    indexes = {split: _read_index(root, split) for split in SPLITS}
    first = indexes["train"][0]["shards"][0]
    names, encodings = first["column_names"], first["column_encodings"]
    listing = ", ".join(f"{n} ({e})" for n, e in zip(names, encodings))
    for split, (index, _) in indexes.items():
        for s in index["shards"]:
            if s["column_names"] != names or s["column_encodings"] != encodings:
                got = ", ".join(f"{n} ({e})" for n, e in zip(s["column_names"],
                                                            s["column_encodings"]))
                raise ValueError(f"{root}/{split}: shard {s['raw_data']['basename']} has the "
                                 f"columns {got}, the first train shard {listing}; every shard "
                                 f"of both splits needs the same columns")
    fix = ("pass the column holding the token ids as token_column (an integer ndarray column "
           "of one fixed length)")
    if token_column is None:
        token_column = next((c for c in TOKEN_COLUMN_GUESSES if c in names), None)
        if token_column is None:
            raise ValueError(f"{root}: no token column {' or '.join(TOKEN_COLUMN_GUESSES)} "
                             f"(columns: {listing}); {fix}")
    elif token_column not in names:
        raise ValueError(f"{root}: no column {token_column!r} (columns: {listing}); {fix}")
    enc = encodings[names.index(token_column)]
    parsed = _parse_ndarray(enc)
    if parsed is None or (parsed[0] is not None and parsed[0] not in _INT_DTYPES):
        raise ValueError(f"{root}: column {token_column!r} is {enc}, not an integer ndarray; "
                         f"write the token ids as an int ndarray (e.g. 'ndarray:int32') or {fix}")
    optional = {}
    for col in (SOURCE_COLUMN, "id"):
        if col in names:
            e = encodings[names.index(col)]
            if e not in _INT_SCALARS:
                raise ValueError(f"{root}: column {col!r} is {e}, not an integer; write it as "
                                 f"'int32' or 'int64', or leave it out")
            optional[col] = col
    lengths = {split: _token_length(root / split, index, token_column, parsed)
               for split, (index, _) in indexes.items()}
    if lengths["train"] != lengths["val"]:
        raise ValueError(f"{root}: column {token_column!r} holds {lengths['train']} tokens per "
                         f"sample in train but {lengths['val']} in val; both splits need one "
                         f"sequence length")
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"format": EXTERNAL_FORMAT, "token_column": token_column}).encode())
    for split in SPLITS:
        h.update(f"\0{split}\0".encode())
        h.update(indexes[split][1])
    nums = {split: sum(int(s["samples"]) for s in indexes[split][0]["shards"])
            for split in SPLITS}
    return {
        "format": EXTERNAL_FORMAT,
        "path": str(root),
        "fingerprint": h.hexdigest(),
        "seq_len": lengths["train"],
        "num_train": nums["train"],
        "num_val": nums["val"],
        "vocab_size": None,
        "token_column": token_column,
        "source_column": optional.get(SOURCE_COLUMN),
        "id_column": optional.get("id"),
        "sources": None,
        "tokenizer": None,
        "eos_id": None,
        "pad_id": None,
    }


def _shard_bytes(split_dir: Path, shard: dict) -> np.ndarray:
    raw, zipped = shard.get("raw_data"), shard.get("zip_data")
    if raw and (split_dir / raw["basename"]).is_file():
        return np.memmap(split_dir / raw["basename"], dtype=np.uint8, mode="r")
    if zipped and (split_dir / zipped["basename"]).is_file():
        from streaming.base.compression import decompress
        data = decompress(shard["compression"], (split_dir / zipped["basename"]).read_bytes())
        return np.frombuffer(data, dtype=np.uint8)
    name = (raw or zipped or {}).get("basename")
    raise ValueError(f"shard {split_dir / str(name)} listed in {split_dir / 'index.json'} is "
                     f"missing; copy the whole dataset")


def _u32_at(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return buf[pos[:, None] + np.arange(4)].copy().view("<u4").ravel().astype(np.int64)


def _token_length(split_dir: Path, index: dict, column: str, parsed: tuple) -> int:
    """The one length of ``column``'s arrays in every sample of the split (ValueError if not).

    With the shape in the encoding it is read there. Otherwise each sample's array header is
    read from the shard files (a few bytes per sample, vectorised): the dtype and rank must be
    integer and 1, and the byte size the same in every sample.
    """
    dtype, shape = parsed
    where = f"{split_dir}: column {column!r}"
    if shape is not None:
        if len(shape) != 1:
            raise ValueError(f"{where} holds arrays of shape {shape}; training needs 1-D "
                             f"arrays of token ids (reshape them to ({int(np.prod(shape))},))")
        return int(shape[0])
    length = None
    for shard in index["shards"]:
        n = int(shard["samples"])
        if n == 0:
            continue
        names, sizes = shard["column_names"], shard["column_sizes"]
        buf = _shard_bytes(split_dir, shard)
        offsets = buf[4:4 + 4 * (n + 1)].copy().view("<u4").astype(np.int64)
        starts = offsets[:-1]
        n_var = sum(1 for s in sizes if s is None)
        pos = starts + 4 * n_var
        var_i = 0
        col_size = None
        for name, size in zip(names, sizes):
            this = np.full(n, size, np.int64) if size is not None else \
                _u32_at(buf, starts + 4 * var_i)
            var_i += size is None
            if name == column:
                col_size = this
                break
            pos = pos + this
        shard_name = shard["raw_data"]["basename"]
        header = 0
        itemsize = np.dtype(dtype).itemsize if dtype is not None else None
        if dtype is None:
            codes = buf[pos]
            bad = ~np.isin(codes, [c for c, t in _DTYPE_CODES.items() if t in _INT_DTYPES])
            if bad.any():
                i = int(np.argmax(bad))
                got = _DTYPE_CODES.get(int(codes[i]), f"code {int(codes[i])}")
                raise ValueError(f"{where}: sample {i} of shard {shard_name} holds {got} values, "
                                 f"not integers; write the token ids as an int ndarray")
            if len(np.unique(codes)) > 1:
                raise ValueError(f"{where}: shard {shard_name} mixes dtypes; write every "
                                 f"sample's token ids with one integer dtype")
            itemsize = np.dtype(_DTYPE_CODES[int(codes[0])]).itemsize
            pos, header = pos + 1, 1
        rank_bytes = buf[pos]
        ndim = rank_bytes >> 2
        if (ndim != 1).any():
            i = int(np.argmax(ndim != 1))
            raise ValueError(f"{where}: sample {i} of shard {shard_name} is a {int(ndim[i])}-D "
                             f"array; training needs 1-D arrays of token ids")
        header = header + 1 + (1 << (rank_bytes & 3)).astype(np.int64)
        lens = (col_size - header) // itemsize
        if (lens != lens[0]).any() or (length is not None and lens[0] != length):
            ref = length if length is not None else int(lens[0])
            i = int(np.argmax(lens != ref))
            raise ValueError(f"{where} holds arrays of varying lengths (sample {i} of shard "
                             f"{shard_name}: {int(lens[i])} tokens, others {ref}); pack the "
                             f"tokens into sequences of one fixed length")
        length = int(lens[0])
    if length is None:
        raise ValueError(f"{split_dir} holds no samples (an empty split)")
    return length
