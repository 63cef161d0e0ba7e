"""The Trainer integration: real transformers Trainer, DeepSpeed ZeRO-2, LoRA, 2 gloo ranks.

Also, in one process: the scores the Trainer records count answer tokens only (checked against a
hand computation from the logits).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_agree_and_exactly_once, free_port, read_ids

# 48 problems, micro batch 4 x 2 ranks x accumulation 2 = 16 per step: passes of 48, 32, 32.
EPOCHS = 3
STEPS = [3, 2, 2]


def finetune(model: Path, data: Path, out: Path, ds_config: Path, extra=()) -> str:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "attent_scale.finetune",
           "--model", str(model), "--train", str(data), "--deepspeed", str(ds_config),
           "--out", str(out), "--epochs", str(EPOCHS), "--batch-size", "4", "--grad-accum", "2",
           "--lora-rank", "8", "--lora-alpha", "16", "--lr", "1e-3", "--log-ids", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"finetune failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def zero2(tmp_path_factory) -> Path:
    cfg = json.loads((ROOT / "configs" / "finetune_zero2.json").read_text())
    path = tmp_path_factory.mktemp("ds") / "zero2.json"
    path.write_text(json.dumps(cfg))
    return path


def test_two_ranks_zero2_lora_agree_train_the_selection_and_resume(tiny_hf_model, gsm8k_tokenized,
                                                                   zero2, tmp_path):
    full = tmp_path / "full"
    out = finetune(tiny_hf_model, gsm8k_tokenized, full, zero2)
    assert "[attent] pass 1 subset" in out
    logs = read_ids(full, 2)
    assert assert_agree_and_exactly_once(logs, 2) == list(range(EPOCHS))
    sizes = [logs[0]["passes"][p][1] for p in range(EPOCHS)]
    assert sizes == [16 * s for s in STEPS], sizes
    # One record per micro-batch: accumulation trains (and scores) each example once.
    for r in range(2):
        assert [len(logs[r]["trained"][p]) for p in range(EPOCHS)] == [8 * s for s in STEPS]
    result = json.loads((full / "result.json").read_text())
    assert result["steps"] == sum(STEPS) and result["teacher"] is True
    assert (full / "final" / "adapter_config.json").exists()

    # Stop one step into the first subset pass (a checkpoint is saved there), resume.
    cut = tmp_path / "cut"
    finetune(tiny_hf_model, gsm8k_tokenized, cut, zero2, ["--stop-after", str(STEPS[0] + 1)])
    ckpt = cut / f"checkpoint-{STEPS[0] + 1}"
    state = json.loads((ckpt / "attent_state.json").read_text())
    assert state["global_step"] == STEPS[0] + 1 and state["selection_pass"] == 1
    resumed = finetune(tiny_hf_model, gsm8k_tokenized, cut, zero2)
    assert "resuming from" in resumed
    again = read_ids(cut, 2)
    for r in range(2):
        assert again[r]["trained"] == logs[r]["trained"], f"rank {r} trained other ids"
        assert again[r]["passes"] == logs[r]["passes"]


def _trainer(model_dir, data_dir, out, attent, **targs):
    import datasets
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainingArguments

    from attent_scale.hf_trainer import AttentTrainer
    from attent_scale.instruct import load_tokenizer
    ds = datasets.load_from_disk(str(data_dir))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4,
                             **{"num_train_epochs": 2, **targs}, report_to=[], use_cpu=True)
    trainer = AttentTrainer(model=AutoModelForCausalLM.from_pretrained(str(model_dir)), args=args,
                            train_dataset=ds, attent=attent,
                            data_collator=DataCollatorForSeq2Seq(load_tokenizer(model_dir),
                                                                 padding=True))
    trainer.teaching = trainer._build_teaching()
    return trainer, ds


def _hand_nll(trainer, ds, ids, batch):
    """Per example: (answer-token NLLs, all-token NLLs), from the model's logits by hand."""
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
    out = []
    for row, i in enumerate(ids):
        ex = ds[int(i)]
        n_prompt = sum(1 for v in ex["labels"] if v == -100)
        logp = torch.log_softmax(logits[row].double(), dim=-1)
        nll = [-float(logp[t, ex["input_ids"][t + 1]]) for t in range(len(ex["input_ids"]) - 1)]
        answer = nll[n_prompt - 1:]  # position t predicts token t+1: answers start at n_prompt
        assert len(answer) == len(ex["input_ids"]) - n_prompt
        out.append((answer, nll))
    return out


def _batch(trainer, ds, ids):
    from attent_scale.hf_trainer import ID_KEY
    batch = trainer.data_collator([ds[int(i)] for i in ids])
    batch[ID_KEY] = torch.tensor([int(i) for i in ids])
    return batch


def test_scores_count_answer_tokens_only(tiny_hf_model, gsm8k_tokenized, tmp_path):
    """compute_loss records, per example, the mean CE over answer tokens: a hand computation."""
    trainer, ds = _trainer(tiny_hf_model, gsm8k_tokenized, tmp_path, {"preset": "attent-simple"})
    assert trainer.args.max_steps == 12 + 8  # 48, then 70% = 33 rounded down to 32; micro 4
    ids = [5, 0, 17]
    batch = _batch(trainer, ds, ids)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    trainer.teaching.flush()
    trainer.teaching.teacher.sync()
    nll = _hand_nll(trainer, ds, ids, batch)
    got = trainer.teaching.teacher.scores[ids]
    np.testing.assert_allclose(got, [sum(a) / len(a) for a, _ in nll], rtol=1e-4)
    assert not np.allclose(got, [sum(n) / len(n) for _, n in nll], rtol=1e-3), \
        "prompt tokens leaked into the scores"
    tot, cnt = sum(sum(a) for a, _ in nll), sum(len(a) for a, _ in nll)
    assert math.isclose(float(loss.detach()), tot / cnt, rel_tol=1e-4)
    assert trainer.teaching.teacher.scored.sum() == len(ids)


def test_soft_selection_with_rescale_weights_each_examples_tokens(tiny_hf_model, gsm8k_tokenized,
                                                                  tmp_path):
    trainer, ds = _trainer(tiny_hf_model, gsm8k_tokenized, tmp_path,
                           {"preset": "attent-simple",
                            "selection": {"method": "soft", "rescale": True}})
    teacher = trainer.teaching.teacher
    teacher.record(np.arange(48), np.random.default_rng(0).uniform(1.0, 3.0, 48), stamp=0)
    teacher.begin_pass(0)
    sel, _ = teacher.begin_pass(1)
    ids, w = sel.ids[:3], sel.weights[:3]
    assert not np.allclose(w, 1.0)
    batch = _batch(trainer, ds, ids)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    nll = _hand_nll(trainer, ds, ids, batch)
    want = sum(wi * sum(a) for wi, (a, _) in zip(w, nll)) / sum(len(a) for a, _ in nll)
    assert math.isclose(float(loss.detach()), want, rel_tol=1e-4)


def test_step_budget_only_without_the_teacher(tiny_hf_model, gsm8k_tokenized, tmp_path):
    """The budget-matched full-data arm: max_steps plans enough whole passes and stops there."""
    trainer, ds = _trainer(tiny_hf_model, gsm8k_tokenized, tmp_path, None, max_steps=17)
    assert len(ds) == 48 and trainer.args.max_steps == 17  # 12 steps a pass: 2 passes planned
    assert trainer.teaching.num_passes == 2 and not trainer.teaching.enabled
    with pytest.raises(ValueError, match="max_steps=17: the teacher plans whole passes"):
        _trainer(tiny_hf_model, gsm8k_tokenized, tmp_path, {"preset": "attent-simple"},
                 max_steps=17)
