"""GSM8K evaluation: final-number exact match by greedy generation; answer-token validation loss.

GSM8K answers end with ``#### N``. A prediction is correct when the number after its first ``####``
equals the reference's, compared as decimals after removing thousands separators, currency signs
and trailing zeros (``1,000`` = ``1000``, ``3.50`` = ``3.5``, ``-0`` = ``0``). A generation without
``####`` scores wrong under ``strict`` matching (the headline number); the ``flexible`` figure takes
the last number in the text instead, to tell format failures from arithmetic ones.

Prompts are built exactly as in training (:func:`attent_scale.instruct.prompt_ids`), left-padded
and generated greedily in batches until EOS.
"""
from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Optional, Sequence

import torch

from .instruct import DEFAULT_TEMPLATE, IGNORE_INDEX, prompt_ids

MARK = "####"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> Optional[str]:
    """Canonical form of a number written with optional sign, commas, '$' or '%' (None if none)."""
    m = _NUMBER.search(text.replace("\u2212", "-").replace("$", ""))
    if m is None:
        return None
    try:
        value = Decimal(m.group(0).replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def parse_answer(text: str, strict: bool = True) -> Optional[str]:
    """The final number of a GSM8K-style answer: what follows the first '####'.

    Without '####': None when ``strict``, else the last number in the text.
    """
    if MARK in text:
        return normalize_number(text.split(MARK, 1)[1])
    if strict:
        return None
    numbers = _NUMBER.findall(text.replace("\u2212", "-").replace("$", ""))
    return normalize_number(numbers[-1]) if numbers else None


def read_problems(path: str | Path, limit: int = 0, prompt_field: str = "question",
                  answer_field: str = "answer") -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.append({"question": rec[prompt_field], "answer": rec[answer_field]})
                if limit and len(out) >= limit:
                    break
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, template: str = DEFAULT_TEMPLATE,
             batch_size: int = 16, max_new_tokens: int = 256, progress: bool = True) -> list[str]:
    """Greedy completions (answer text only) of the templated prompts, in batches."""
    from tqdm import tqdm
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    outs: list[str] = []
    for s in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        ids = [prompt_ids(tokenizer, p, template) for p in prompts[s:s + batch_size]]
        width = max(len(x) for x in ids)
        # Left padding: every row's next token follows its own last prompt token.
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id)
        outs.extend(tokenizer.decode(row[width:], skip_special_tokens=True) for row in gen)
    return outs


def exact_match(model, tokenizer, problems: Sequence[dict], **kwargs) -> dict:
    """Strict and flexible exact match of the final number over ``problems`` (question/answer)."""
    completions = generate(model, tokenizer, [p["question"] for p in problems], **kwargs)
    records, strict, flexible = [], 0, 0
    for p, c in zip(problems, completions):
        ref = parse_answer(p["answer"])
        got, got_flex = parse_answer(c), parse_answer(c, strict=False)
        strict += int(got is not None and got == ref)
        flexible += int(got_flex is not None and got_flex == ref)
        records.append({"question": p["question"], "reference": ref, "prediction": got,
                        "completion": c})
    n = max(len(problems), 1)
    return {"n": len(problems), "exact_match": strict / n, "flexible_match": flexible / n,
            "records": records}


@torch.no_grad()
def answer_loss(model, dataset, *, batch_size: int = 16, pad_id: int = 0,
                progress: bool = True) -> dict:
    """Mean cross-entropy per answer token (labels != -100) over a tokenized dataset.

    Token-weighted over the whole set (not a mean of batch means), so it does not depend on the
    batch size or on how examples are grouped.
    """
    from tqdm import tqdm
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for s in tqdm(range(0, len(dataset), batch_size), desc="val loss", disable=not progress):
        rows = [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([list(r["input_ids"]) + [pad_id] * (width - len(r["input_ids"]))
                            for r in rows], device=device)
        labels = torch.tensor([list(r["labels"]) + [IGNORE_INDEX] * (width - len(r["labels"]))
                               for r in rows], device=device)
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                             for r in rows], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target,
                                               ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(ce)
        count += int((target != IGNORE_INDEX).sum())
    return {"answer_loss": total / max(count, 1), "answer_tokens": count}


def load_causal_lm(path: str | Path, dtype: Optional[torch.dtype] = None):
    """AutoModelForCausalLM from a local directory (transformers 4.x and 5.x spell dtype apart)."""
    import transformers
    from transformers import AutoModelForCausalLM
    kwargs = {}
    if dtype is not None:
        new = int(transformers.__version__.split(".")[0]) >= 5 or \
            tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
        kwargs["dtype" if new else "torch_dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)


def load_model(model_dir: str | Path, adapter: Optional[str | Path] = None,
               dtype: Optional[torch.dtype] = None, device: Optional[str] = None):
    """(model, tokenizer) from a local directory; a LoRA adapter is merged in for speed.

    ``adapter`` may also be a directory written by ``attent-finetune`` (its ``final`` folder):
    when it holds ``adapter_config.json`` it is applied to ``model_dir``, else it is a full model.
    """
    from .instruct import load_tokenizer
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = Path(adapter) if adapter and not (Path(adapter) / "adapter_config.json").exists() \
        else Path(model_dir)
    model = load_causal_lm(weights, dtype)
    if adapter and (Path(adapter) / "adapter_config.json").exists():
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tokenizer = load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json")
                               .exists() else model_dir)
    return model.to(device), tokenizer
