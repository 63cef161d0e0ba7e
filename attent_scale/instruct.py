"""Instruction data: JSONL (prompt, answer) records -> tokenized examples with masked prompts.

    attent-instruct --input train.jsonl --tokenizer MODEL_DIR --out data/gsm8k-train \
        --prompt-field question --answer-field answer --format hf --max-len 512

**Template.** Each record becomes ``BOS + template(prompt) + answer + EOS``, tokenized with the
model's own tokenizer (loaded from a local directory). The default template is::

    Question: {prompt}
    Answer:<space>

``{prompt}`` is replaced by the prompt field; ``--template`` sets another (it must contain
``{prompt}``). The prompt part and the answer part are tokenized separately and concatenated, so the
boundary is exact and generation (:mod:`attent_scale.gsm8k`) feeds the model the very prompt ids
it was trained on.

**Masking.** ``labels`` equal ``input_ids`` on answer tokens (and the final EOS) and ``-100`` on
prompt tokens (BOS included), so the loss and every teacher score count answer tokens only.

**Length.** Examples longer than ``--max-len`` tokens are cut at the end of the answer
(``--overlong truncate``, the default; the prompt is never cut) or dropped (``--overlong drop``).
An example whose prompt leaves no room for one answer token is always dropped. The counts are
printed and stored in ``instruct_meta.json``.

**Output.** ``--format hf`` writes a ``datasets`` dataset (``save_to_disk``) with columns
``input_ids`` and ``labels``; ``--format mds`` writes MDS shards of the same columns, read by
:class:`~attent_scale.streaming_data.SubsetStreamingDataset`. The sample id the teacher uses is the
record's position among the kept examples.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

DEFAULT_TEMPLATE = "Question: {prompt}\nAnswer: "
PLACEHOLDER = "{prompt}"
META = "instruct_meta.json"
IGNORE_INDEX = -100


def format_prompt(prompt: str, template: str = DEFAULT_TEMPLATE) -> str:
    if PLACEHOLDER not in template:
        raise ValueError(f"template {template!r} has no {PLACEHOLDER} placeholder")
    # str.replace, not str.format: prompts and templates may contain braces.
    return template.replace(PLACEHOLDER, prompt)


def prompt_ids(tokenizer, prompt: str, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """BOS (when the tokenizer has one) + the templated prompt: what generation starts from."""
    ids = tokenizer.encode(format_prompt(prompt, template), add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def answer_ids(tokenizer, answer: str) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: generation could not stop; set one "
                         "(tokenizer.eos_token) and save it with the model")
    return list(tokenizer.encode(answer, add_special_tokens=False)) + [eos]


@dataclass
class Counts:
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_room: int = 0
    answer_tokens: int = 0
    prompt_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)


def encode_example(tokenizer, prompt: str, answer: str, *, template: str = DEFAULT_TEMPLATE,
                   max_len: int = 512, overlong: str = "truncate",
                   counts: Optional[Counts] = None) -> Optional[dict]:
    """One example as ``{"input_ids", "labels"}`` (lists of ints), or None when it is dropped."""
    c = counts if counts is not None else Counts()
    p = prompt_ids(tokenizer, prompt, template)
    a = answer_ids(tokenizer, answer)
    if len(p) >= max_len:
        c.dropped_no_room += 1
        return None
    if len(p) + len(a) > max_len:
        if overlong == "drop":
            c.dropped_overlong += 1
            return None
        a = a[:max_len - len(p)]
        c.truncated += 1
    c.kept += 1
    c.prompt_tokens += len(p)
    c.answer_tokens += len(a)
    c.lengths.append(len(p) + len(a))
    return {"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a}


def read_jsonl(path: Path, prompt_field: str, answer_field: str) -> Iterable[tuple[str, str]]:
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = [k for k in (prompt_field, answer_field) if k not in rec]
            if missing:
                raise KeyError(f"{path}:{n}: no field {missing[0]!r} (fields: {sorted(rec)}); "
                               "set --prompt-field / --answer-field")
            yield str(rec[prompt_field]), str(rec[answer_field])


def load_tokenizer(directory: str | Path):
    """The model's tokenizer from a local directory (never downloaded); pad defaults to EOS."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build(input_path: Path, tokenizer_dir: Path, out: Path, *, fmt: str = "hf",
          prompt_field: str = "question", answer_field: str = "answer",
          template: str = DEFAULT_TEMPLATE, max_len: int = 512, overlong: str = "truncate",
          limit: int = 0, progress: bool = True) -> dict:
    """Tokenize ``input_path`` into ``out``; returns the metadata written to ``META``."""
    from tqdm import tqdm
    if fmt not in ("hf", "mds"):
        raise ValueError(f"format {fmt!r}; allowed: hf, mds")
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong {overlong!r}; allowed: truncate, drop")
    if max_len < 2:
        raise ValueError(f"max_len={max_len}; allowed: >= 2")
    format_prompt("", template)  # fails early on a template without the placeholder
    tok = load_tokenizer(tokenizer_dir)
    counts = Counts()
    examples = []
    for prompt, answer in tqdm(read_jsonl(input_path, prompt_field, answer_field),
                               desc=f"tokenize {input_path.name}", disable=not progress):
        if limit and counts.read >= limit:
            break
        counts.read += 1
        ex = encode_example(tok, prompt, answer, template=template, max_len=max_len,
                            overlong=overlong, counts=counts)
        if ex is not None:
            examples.append(ex)
    if not examples:
        raise ValueError(f"{input_path}: no example fits --max-len {max_len}")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        import datasets
        columns = {k: [e[k] for e in examples] for k in ("input_ids", "labels")}
        datasets.Dataset.from_dict(columns).save_to_disk(str(out))
    else:
        from streaming import MDSWriter
        with MDSWriter(out=str(out), columns={"input_ids": "ndarray:int32",
                                              "labels": "ndarray:int32"}) as w:
            for e in examples:
                w.write({"input_ids": np.asarray(e["input_ids"], dtype=np.int32),
                         "labels": np.asarray(e["labels"], dtype=np.int32)})
    lengths = np.asarray(counts.lengths)
    meta = {"format": fmt, "source": str(input_path), "tokenizer": str(tokenizer_dir),
            "prompt_field": prompt_field, "answer_field": answer_field, "template": template,
            "max_len": max_len, "overlong": overlong, "read": counts.read, "kept": counts.kept,
            "truncated": counts.truncated, "dropped_overlong": counts.dropped_overlong,
            "dropped_no_room": counts.dropped_no_room, "prompt_tokens": counts.prompt_tokens,
            "answer_tokens": counts.answer_tokens, "max_tokens": int(lengths.max()),
            "mean_tokens": float(lengths.mean())}
    (out / META).write_text(json.dumps(meta, indent=1))
    return meta


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: build the data with attent-instruct")
    return json.loads(path.read_text())


def load(directory: str | Path, *, micro_batch: int = 1, shuffle_seed: int = 0):
    """The dataset written by :func:`build`: ``datasets.Dataset`` or ``SubsetStreamingDataset``."""
    meta = read_meta(directory)
    if meta["format"] == "hf":
        import datasets
        return datasets.load_from_disk(str(directory))
    from .streaming_data import SubsetStreamingDataset
    return SubsetStreamingDataset(local=str(directory), batch_size=micro_batch,
                                  shuffle_seed=shuffle_seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, type=Path, help="JSONL file, one record per line")
    p.add_argument("--tokenizer", required=True, type=Path,
                   help="local model directory holding the model's tokenizer")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--format", choices=["hf", "mds"], default="hf",
                   help="hf: datasets save_to_disk; mds: MDS shards for streaming")
    p.add_argument("--prompt-field", default="question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help="prompt template with a {prompt} placeholder (default: %(default)r)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example, at most")
    p.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                   help="longer examples: cut the answer's end, or drop them")
    p.add_argument("--limit", type=int, default=0, help="read at most this many records (0: all)")
    a = p.parse_args(argv)
    meta = build(a.input, a.tokenizer, a.out, fmt=a.format, prompt_field=a.prompt_field,
                 answer_field=a.answer_field, template=a.template, max_len=a.max_len,
                 overlong=a.overlong, limit=a.limit)
    print(f"{a.out}: kept {meta['kept']} of {meta['read']} ({meta['truncated']} truncated, "
          f"{meta['dropped_overlong'] + meta['dropped_no_room']} dropped); "
          f"{meta['answer_tokens']} answer tokens, longest {meta['max_tokens']} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
