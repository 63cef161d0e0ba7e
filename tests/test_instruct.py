"""attent-instruct: exact prompt masking, length handling, field names, both output formats."""
from __future__ import annotations

import json

import numpy as np
import pytest

from attent_scale import instruct
from attent_scale.instruct import (DEFAULT_TEMPLATE, Counts, build, encode_example, load,
                                   load_tokenizer, prompt_ids)


@pytest.fixture(scope="module")
def tok(tiny_hf_model):
    return load_tokenizer(tiny_hf_model)


def test_labels_mask_exactly_the_prompt(tok):
    q, a = "Ana has 3 pens and gets 4 more. How many?", "3+4 = 7 pens.\n#### 7"
    ex = encode_example(tok, q, a, max_len=128)
    p = prompt_ids(tok, q)
    assert p[0] == tok.bos_token_id
    assert tok.decode(p[1:]) == DEFAULT_TEMPLATE.replace("{prompt}", q)
    n = len(p)
    assert ex["input_ids"][:n] == p
    assert ex["labels"][:n] == [-100] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]  # every answer token trains
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][n:-1]) == a


def test_overlong_examples_are_truncated_or_dropped_and_counted(tok):
    q, a = "Li has 5 coins.", "Li has 5 coins and 5 more and 5 more.\n#### 15"
    full = encode_example(tok, q, a, max_len=512)
    n_prompt = full["labels"].count(-100)
    c = Counts()
    cut = encode_example(tok, q, a, max_len=n_prompt + 3, counts=c)
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 3]
    assert cut["labels"][n_prompt:] == full["input_ids"][n_prompt:n_prompt + 3]
    assert encode_example(tok, q, a, max_len=n_prompt + 3, overlong="drop", counts=c) is None
    assert encode_example(tok, q, a, max_len=n_prompt, counts=c) is None  # no room for an answer
    assert (c.kept, c.truncated, c.dropped_overlong, c.dropped_no_room) == (1, 1, 1, 1)


def test_custom_fields_template_and_both_formats(tiny_hf_model, tmp_path):
    src = tmp_path / "data.jsonl"
    recs = [{"instruction": f"Add {i} and {i}.", "output": f"{2 * i}\n#### {2 * i}"}
            for i in range(1, 9)]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    template = "### Instruction\n{prompt}\n### Response\n"
    with pytest.raises(KeyError, match="--prompt-field"):
        build(src, tiny_hf_model, tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="placeholder"):
        build(src, tiny_hf_model, tmp_path / "bad", prompt_field="instruction",
              answer_field="output", template="no placeholder", progress=False)
    tok = load_tokenizer(tiny_hf_model)
    want = [encode_example(tok, r["instruction"], r["output"], template=template, max_len=64)
            for r in recs]
    for fmt in ("hf", "mds"):
        out = tmp_path / fmt
        rc = instruct.main(["--input", str(src), "--tokenizer", str(tiny_hf_model), "--out",
                            str(out), "--format", fmt, "--prompt-field", "instruction",
                            "--answer-field", "output", "--template", template,
                            "--max-len", "64"])
        assert rc == 0
        meta = json.loads((out / "instruct_meta.json").read_text())
        assert meta["kept"] == 8 and meta["template"] == template and meta["format"] == fmt
        ds = load(out, micro_batch=1)
        got = [ds[i] for i in range(8)]
        for g, w in zip(got, want):
            assert list(np.asarray(g["input_ids"])) == w["input_ids"]
            assert list(np.asarray(g["labels"])) == w["labels"]
