"""attent-export: a 2-rank ZeRO-2 / ZeRO-3 pretraining checkpoint becomes a standard HF model.

The exported model must reproduce the validation loss the pretraining job itself measured at the
end (same weights, same sequences), and the exported tokenizer the SentencePiece ids.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_job, write_config


@pytest.mark.parametrize("stage", [2, 3])
def test_export_reproduces_pretraining_val_loss_and_tokenizer(stage, tiny_corpus, tmp_path):
    from streaming import StreamingDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attent_scale.data import load_tokenizer
    from attent_scale.export import main as export_main
    cfg = write_config(tmp_path / "ds.json", stage=stage)
    run = tmp_path / "run"
    run_job(cfg, tiny_corpus, run, extra=["--epochs", "1", "--budget-fraction", "0.1",
                                          "--save-every", "100000", "--no-plot"])
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_loss = [e for e in evals if e.get("type") == "eval"][-1]["val_loss"]

    out = tmp_path / "hf"
    assert export_main(["--run", str(run), "--data", str(tiny_corpus), "--model", "tiny",
                        "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)

    val = StreamingDataset(local=str(tiny_corpus / "val"), batch_size=8, shuffle=False)
    tokens = torch.from_numpy(np.stack([val[i]["tokens"] for i in range(32)]).astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert float(ce) == pytest.approx(val_loss, rel=1e-4)

    sp = load_tokenizer(tiny_corpus)
    text = sp.decode(val[0]["tokens"].tolist()) + "\n\tx = [1, 2]  # tab, spaces, digits\n"
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 2, 3)
