"""A user's own training script, as a test drives it: its model, its map-style dataset, its loop.

The model scores example i by a known function of i: its logits are a fixed table (the learning
rate is 0), each example's labels are one token t_i, so its loss is -log softmax(table)[t_i].
Any misalignment of ids and scores shows in the teacher's score table.

    torchrun --nproc_per_node 2 tests/user_loop_worker.py --config CFG --out DIR --path initialize
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import CausalLMOutput

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attent_scale  # noqa: E402

VOCAB, SEQ, N = 32, 8, 96


class TableLM(torch.nn.Module):
    """logits[b, t] = table (the same for every position): the loss of example i depends only on
    its label token, so its score is a known function of i."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.linspace(-2.0, 2.0, VOCAB))
        self.mix = torch.nn.Linear(4, 4)  # a layer for ZeRO to partition

    def forward(self, input_ids, labels=None):
        logits = self.table.expand(input_ids.shape[0], input_ids.shape[1], VOCAB)
        logits = logits + 0.0 * self.mix.weight.sum()
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                                     labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


def label_of(i: int) -> int:
    return (7 * i + 3) % VOCAB


def expected_score(i: int) -> float:
    table = torch.linspace(-2.0, 2.0, VOCAB)
    return float(-torch.log_softmax(table, 0)[label_of(i)])


class Examples(torch.utils.data.Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": torch.full((SEQ,), i % VOCAB, dtype=torch.long),
                "labels": torch.full((SEQ,), label_of(i), dtype=torch.long)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--path", choices=["initialize", "sampler"], default="initialize")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--stop-after", type=int, default=0, help="save and exit after this step")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    out = Path(args.out)
    rank = int(os.environ.get("RANK", 0))
    log = open(out / f"steps.rank{rank}.jsonl", "a", buffering=1)
    torch.manual_seed(0)
    model, data = TableLM(), Examples()
    if args.path == "initialize":
        engine, _, loader, _ = attent_scale.initialize(
            model=model, model_parameters=model.parameters(), training_data=data,
            config=args.config, passes=args.passes)
        teaching = loader.sampler.teaching
        train = lambda batch: engine(**batch).loss  # noqa: E731
    else:
        import deepspeed
        cfg = json.loads(Path(args.config).read_text())
        section = cfg.pop("attent", None)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=cfg)
        sampler = attent_scale.AttentSampler(data, {"attent": section} if section else None,
                                             args.passes, cfg["train_micro_batch_size_per_gpu"])
        loader = torch.utils.data.DataLoader(sampler.dataset, batch_size=sampler.batch_size,
                                             sampler=sampler)
        teaching = sampler.teaching

        def train(batch):
            ids = batch.pop("id")
            loader.batch_ids = ids
            out = engine(**batch)
            return sampler.update(ids, logits=out.logits, labels=batch["labels"])
    teaching.listeners.append(lambda r: log.write(json.dumps(
        {"selection": r["pass"], "checksum": r["checksum"], "selected": r["selected"]}) + "\n"))
    ckpt = out / "ckpt"
    if args.resume:
        if args.path == "initialize":
            engine.load_checkpoint(str(ckpt))
        else:
            engine.load_checkpoint(str(ckpt))
            sampler.load(ckpt / "attent")
    for epoch in range(args.passes):
        if args.path == "sampler":
            sampler.set_epoch(epoch)
        for batch in loader:
            p = teaching.pass_index
            ids = batch["id"] if "id" in batch else None
            loss = train(batch)
            ids = loader.batch_ids if ids is None else ids
            engine.backward(loss)
            engine.step()
            log.write(json.dumps({"pass": p, "step": engine.global_steps, "ids": ids.tolist()})
                      + "\n")
            if args.stop_after and engine.global_steps == args.stop_after:
                engine.save_checkpoint(str(ckpt))
                if args.path == "sampler":
                    sampler.save(ckpt / "attent")
                return 0
    teaching.flush()
    teaching.teacher.sync()
    if rank == 0:
        scored = np.flatnonzero(teaching.teacher.scored)
        (out / "scores.json").write_text(json.dumps({
            "ids": scored.tolist(), "scores": teaching.teacher.scores[scored].tolist(),
            "expected": [expected_score(int(i)) for i in scored]}))
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        # As any torch script should (README, "Your own DeepSpeed loop"): after main's engine is
        # gone, collect the cycles that still hold its group, then end it; a group alive at
        # interpreter exit keeps gloo's threads, which can abort a rank (SIGABRT).
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(code)
