"""GSM8K evaluation: answer parsing, and the generation path end to end on a model that overfits."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from attent_scale.gsm8k import answer_loss, exact_match, normalize_number, parse_answer
from conftest import ROOT, gsm8k_like


@pytest.mark.parametrize("text,want", [
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("#### 1,234,567.00", "1234567"),
    ("#### -5", "-5"),
    ("#### \u221212", "-12"),        # a typographic minus
    ("#### 3.50", "3.5"),
    ("#### .5", "0.5"),
    ("#### -0", "0"),
    ("#### $1,000", "1000"),
    ("#### 25%", "25"),
    ("#### 18 dollars", "18"),
    ("The answer is 7.\n#### 8\n\nQuestion: #### 9", "8"),  # the first mark counts
    ("no final mark, the total is 42", None),
    ("#### ", None),
])
def test_parse_answer_strict(text, want):
    assert parse_answer(text) == want


def test_parse_answer_flexible_takes_the_last_number_without_the_mark():
    assert parse_answer("so 3 + 4 = 7 apples, then -1,200.50 left", strict=False) == "-1200.5"
    assert parse_answer("nothing numeric here", strict=False) is None
    assert parse_answer("#### 6 but later 7", strict=False) == "6"


def test_normalize_number_equates_forms():
    assert normalize_number("1,000") == normalize_number("1000.0") == "1000"
    assert normalize_number("0.250") == "0.25"
    assert normalize_number("abc") is None


def _overfit(model, tok, problems, steps: int = 300):
    from attent_scale.instruct import encode_example
    rows = [encode_example(tok, p["question"], p["answer"], max_len=128) for p in problems]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [tok.pad_token_id] * (width - len(r["input_ids"]))
                        for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    return rows, loss.item()


def test_tiny_model_that_memorised_problems_answers_them_exactly(tiny_hf_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from attent_scale.instruct import load_tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model))
    tok = load_tokenizer(tiny_hf_model)
    problems = gsm8k_like(5, seed=7)
    before = exact_match(model, tok, problems, batch_size=3, max_new_tokens=64, progress=False)
    assert before["exact_match"] == 0.0  # an untrained model cannot pass: the metric can fail
    rows, final = _overfit(model, tok, problems)
    assert final < 0.05, f"the tiny model did not memorise the problems (loss {final:.3f})"
    # Batches of 3 over 5 problems of different lengths: left padding must not change answers.
    em = exact_match(model, tok, problems, batch_size=3, max_new_tokens=64, progress=False)
    assert em["exact_match"] == 1.0, em["records"]
    assert [r["prediction"] for r in em["records"]] == [parse_answer(p["answer"]) for p in problems]

    # Answer-token loss: token-weighted, equal to the model's own per-example losses combined.
    got = answer_loss(model, rows, batch_size=2, pad_id=tok.pad_token_id, progress=False)
    tot = cnt = 0
    with torch.no_grad():
        for r in rows:
            n = sum(1 for v in r["labels"][1:] if v != -100)
            out = model(input_ids=torch.tensor([r["input_ids"]]),
                        labels=torch.tensor([r["labels"]]))
            tot, cnt = tot + out.loss.item() * n, cnt + n
    assert got["answer_tokens"] == cnt
    assert got["answer_loss"] == pytest.approx(tot / cnt, rel=1e-4)

    # The command-line tool on the saved model gives the same exact match.
    model.save_pretrained(str(tmp_path / "memorised"))
    tok.save_pretrained(str(tmp_path / "memorised"))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(p) + "\n" for p in problems))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_gsm8k.py"), "--model",
                           str(tmp_path / "memorised"), "--test", str(test), "--batch-size", "2",
                           "--max-new-tokens", "64", "--out", str(tmp_path / "eval.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["exact_match"] == 1.0 and result["n"] == 5
    assert result["answer_loss"] == pytest.approx(got["answer_loss"], rel=1e-3)
