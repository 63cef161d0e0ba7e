"""The Trainer integration: real transformers Trainer, DeepSpeed ZeRO-2, LoRA, 2 gloo ranks (one
job: selection, exactly once, the pass count as the logged epoch, a sharded checkpoint's stop and
resume).

Also, in one process: scores land on their ids (a model whose loss of example i is a known function
of i) and count answer tokens only (a hand computation from the logits), the grad_norm signal gives
torch.func's per-example gradient norms, and train() gives the caller's max_steps back.
"""
from __future__ import annotations

import ast
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


def ds_config(tmp_path_factory, **selection) -> Path:
    cfg = json.loads((ROOT / "configs" / "finetune_zero2.json").read_text())
    if selection:
        cfg["attent"]["selection"] = selection
    path = tmp_path_factory.mktemp("ds") / "zero2.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def zero2(tmp_path_factory) -> Path:
    return ds_config(tmp_path_factory)


@pytest.fixture(scope="module")
def zero2_sharded(tmp_path_factory) -> Path:
    """The same teacher with its score table sharded by id over the ranks (each rank saves its
    own range). Sharding changes where scores live, never what is selected."""
    return ds_config(tmp_path_factory, sharding="sharded")


def logged_epochs(stdout: str) -> tuple[list[float], float]:
    """(epoch of each per-step log, epoch of the end-of-training summary) printed by rank 0."""
    steps, final = [], None
    for line in stdout.splitlines():
        line = line.strip()
        if not (line.startswith("{") and "'epoch'" in line):
            continue
        logs = ast.literal_eval(line)
        if "loss" in logs:
            steps.append(logs["epoch"])
        elif "train_runtime" in logs:
            final = logs["epoch"]
    return steps, final


def pass_fractions(steps: list[int]) -> list[float]:
    """The epoch after each optimizer step: the pass, plus the fraction of it trained."""
    return [p + (k + 1) / n for p, n in enumerate(steps) for k in range(n)]


def test_two_ranks_zero2_lora_agree_train_the_selection_and_resume(tiny_hf_model, gsm8k_tokenized,
                                                                   zero2, zero2_sharded,
                                                                   tmp_path):
    full = tmp_path / "full"
    out = finetune(tiny_hf_model, gsm8k_tokenized, full, zero2, ["--logging-steps", "1"])
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
    # The Trainer's logged epoch is the pass count (passes differ in length: 3, 2, 2 steps),
    # printed rounded to 2 decimals.
    epochs, final = logged_epochs(out)
    assert epochs == pytest.approx(pass_fractions(STEPS), abs=0.006), epochs
    assert final == result["epoch"] == EPOCHS

    # Stop one step into the first subset pass (a checkpoint is saved there), resume. This run
    # shards the score table: both ranks write their range into the Trainer's checkpoint, and the
    # resume must read both back to select what the unsharded run above selected.
    cut = tmp_path / "cut"
    stopped = finetune(tiny_hf_model, gsm8k_tokenized, cut, zero2_sharded,
                       ["--stop-after", str(STEPS[0] + 1), "--logging-steps", "1"])
    assert f"stopped after step {STEPS[0] + 1}" in stopped
    assert not (cut / "result.json").exists() and not (cut / "final").exists()
    ckpt = cut / f"checkpoint-{STEPS[0] + 1}"
    state = json.loads((ckpt / "attent_state.json").read_text())
    assert state["global_step"] == STEPS[0] + 1 and state["selection_pass"] == 1
    assert sorted(map(tuple, state["score_shards"])) == [(0, 24), (24, 48)]
    for lo, hi in state["score_shards"]:
        assert (ckpt / f"attent_scores.{lo}-{hi}.npy").exists()
    # What the Trainer itself persisted: the pass count in its log history and state.
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    assert [h["epoch"] for h in trainer_state["log_history"] if "loss" in h] == \
        pytest.approx(pass_fractions(STEPS)[:STEPS[0] + 1], abs=1e-9)
    assert trainer_state["epoch"] == pytest.approx(1.5)
    resumed = finetune(tiny_hf_model, gsm8k_tokenized, cut, zero2_sharded)
    assert "resuming from" in resumed
    again = read_ids(cut, 2)
    for r in range(2):
        assert again[r]["trained"] == logs[r]["trained"], f"rank {r} trained other ids"
        assert again[r]["passes"] == logs[r]["passes"]
    assert json.loads((cut / "result.json").read_text())["epoch"] == EPOCHS


def _trainer(model_dir, data_dir, out, attent, model_kwargs=None, **targs):
    import datasets
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainingArguments

    from attent_scale import AttentTrainer
    from attent_scale.instruct import load_tokenizer
    ds = datasets.load_from_disk(str(data_dir))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4,
                             **{"num_train_epochs": 2, **targs}, report_to=[], use_cpu=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **(model_kwargs or {}))
    trainer = AttentTrainer(model=model, args=args, train_dataset=ds, attent=attent,
                            data_collator=DataCollatorForSeq2Seq(load_tokenizer(model_dir),
                                                                 padding=True))
    trainer.planned_steps()  # builds the teacher (as train() would)
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
    assert trainer.planned_steps() == 12 + 8  # 48, then 70% = 33 rounded down to 32; micro 4
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
    assert len(ds) == 48 and trainer.planned_steps() == 17  # 12 steps a pass: 2 passes planned
    assert trainer.teaching.num_passes == 2 and not trainer.teaching.enabled
    with pytest.raises(ValueError, match="max_steps=17: the teacher plans whole passes"):
        _trainer(tiny_hf_model, gsm8k_tokenized, tmp_path, {"preset": "attent-simple"},
                 max_steps=17)


def stop_after(steps: int):
    """A Trainer callback that ends training after ``steps`` optimizer steps (no checkpoint)."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= steps
            return control
    return StopAfter()


def test_scores_land_on_their_ids_and_the_run_reports_its_passes(tmp_path):
    """The whole Trainer path (loader, collator, compute_loss, teacher) on user_loop_worker's
    TableLM at learning rate 0: example i's score is a known function of i, so ids shifted
    against their scores fail here. Gradient accumulation 2. Pass 0 scores from the Trainer's own
    loss; passes 1 and 2 weight each example (soft selection with rescale), so compute_loss builds
    the loss itself there: both ways are checked."""
    from transformers import TrainingArguments, default_data_collator

    from attent_scale import AttentTrainer
    from user_loop_worker import Examples, N, TableLM, expected_score
    args = TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=3,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=0.0, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True)
    torch.manual_seed(0)
    trainer = AttentTrainer(model=TableLM(), args=args, train_dataset=Examples(),
                            data_collator=default_data_collator, log_ids=tmp_path / "ids",
                            attent={"preset": "attent-soft", "selection": {"rescale": True}})
    result = trainer.train()

    t = trainer.teaching
    sizes = [rec["selected"] for rec in trainer.pass_log]
    assert sizes[0] == N and sizes[1] < N and len(sizes) == 3  # the teacher selected
    trained = read_ids(tmp_path / "ids", 1)[0]["trained"]
    assert [len(set(trained[p])) for p in range(3)] == [len(trained[p]) for p in range(3)] == sizes
    assert t.weights(trained[2]) is not None  # the last pass trained with weights
    t.flush()
    t.teacher.sync()
    scored = np.flatnonzero(t.teacher.scored)
    assert len(scored) == N
    want = np.array([expected_score(int(i)) for i in scored])
    assert np.abs(np.diff(want)).min() > 1e-3  # neighbouring ids score apart: a shift shows
    np.testing.assert_allclose(t.teacher.scores[scored], want, rtol=0, atol=1e-5)

    # The pass count as the epoch, in the Trainer's own log history and result.
    steps = [n // 8 for n in sizes]  # micro 4 x accumulation 2
    logged = [h["epoch"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx(pass_fractions(steps), abs=1e-9)
    assert result.metrics["epoch"] == trainer.state.log_history[-1]["epoch"] == 3.0
    # The plan's length ran; the caller's arguments are theirs again.
    assert trainer.state.global_step == trainer.state.max_steps == sum(steps)
    assert trainer.args.max_steps == -1 and trainer.args.ignore_data_skip is False


def test_grad_norm_signal_gives_per_example_gradient_norms(tiny_hf_model, gsm8k_tokenized,
                                                           tmp_path):
    """signal grad_norm in the Trainer: one optimizer step (2 accumulated micro batches) scores its
    8 examples with the gradient norm of each one's own mean answer-token loss, as torch.func
    computes it on the weights before the step."""
    import copy

    from gradnorm_worker import reference_norms
    trainer, ds = _trainer(tiny_hf_model, gsm8k_tokenized, tmp_path / "out",
                           {"preset": "attent-simple", "signal": "grad_norm"},
                           model_kwargs={"attn_implementation": "eager"},  # torch.func's vmap
                           gradient_accumulation_steps=2)
    before = copy.deepcopy(trainer.model)
    trainer.add_callback(stop_after(1))
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.args.max_steps == -1  # given back after a stop too

    t = trainer.teaching
    t.flush()
    t.teacher.sync()
    ids = np.flatnonzero(t.teacher.scored)
    assert len(ids) == 8
    got = t.teacher.scores[ids]
    assert np.isfinite(got).all() and (got > 0).all()
    names = list(t.probe.layers)
    want = []
    for i in ids:
        ex = ds[int(i)]
        tokens = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"][1:]])  # next-token labels, -100 on the prompt
        want.append(float(reference_norms(before, names, tokens, labels)[0].detach()))
    assert np.ptp(want) > 0.01 * np.mean(want)  # examples differ: the check can fail
    np.testing.assert_allclose(got, want, rtol=1e-4)
