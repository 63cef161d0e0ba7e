"""Evaluate a model on GSM8K: final-number exact match (greedy) and answer-token validation loss.

    python tools/eval_gsm8k.py --model runs/100m/hf --adapter runs/ft-attent/final \
        --test data/gsm8k/test.jsonl --limit 500 --out runs/ft-attent/eval.json

--model is a local Hugging Face directory; --adapter the LoRA (or full) output of attent-finetune.
The validation loss is computed on the same test problems, tokenized exactly as attent-instruct
tokenizes training data (prompt tokens masked), unless --val names an attent-instruct dataset.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attent_scale import gsm8k, instruct  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None)
    p.add_argument("--test", required=True, help="GSM8K-format JSONL (question, answer)")
    p.add_argument("--limit", type=int, default=0, help="first N problems (0: all)")
    p.add_argument("--val", default=None, help="attent-instruct dataset for the loss")
    p.add_argument("--template", default=instruct.DEFAULT_TEMPLATE)
    p.add_argument("--max-len", type=int, default=512, help="tokens per example for the loss")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=None, help="write the result (with every completion) here")
    a = p.parse_args(argv)

    import torch
    model, tok = gsm8k.load_model(a.model, a.adapter,
                                  dtype=torch.bfloat16 if a.bf16 else None)
    problems = gsm8k.read_problems(a.test, a.limit)
    t0 = time.perf_counter()
    if a.val:
        val = instruct.load(a.val)
    else:
        val = [e for e in (instruct.encode_example(tok, q["question"], q["answer"],
                                                   template=a.template, max_len=a.max_len)
                           for q in problems) if e is not None]
    loss = gsm8k.answer_loss(model, val, batch_size=a.batch_size, pad_id=tok.pad_token_id)
    em = gsm8k.exact_match(model, tok, problems, template=a.template, batch_size=a.batch_size,
                           max_new_tokens=a.max_new_tokens)
    result = {"model": a.model, "adapter": a.adapter, "test": a.test, **loss,
              **{k: v for k, v in em.items() if k != "records"},
              "eval_seconds": time.perf_counter() - t0}
    print(json.dumps(result))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({**result, "records": em["records"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
