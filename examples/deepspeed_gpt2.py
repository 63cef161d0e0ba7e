"""An ordinary DeepSpeed training script, with the AtteNT teacher switched on.

    torchrun --nproc_per_node 2 examples/deepspeed_gpt2.py --deepspeed_config examples/ds_config.json
    deepspeed --num_gpus 2 examples/deepspeed_gpt2.py --deepspeed_config examples/ds_config.json

A GPT-2 built from a config, an in-memory map-style dataset, the usual forward / backward / step
loop. Against plain DeepSpeed, the lines marked "attent" differ: the import, and
``attent_scale.initialize`` with ``passes=`` in place of ``deepspeed.initialize``. The "attent"
section of the JSON switches the teacher on; without it this is plain DeepSpeed, except that
``attent_scale.initialize`` still fills the config's two "auto" schedule lengths from ``passes``
(plain ``deepspeed.initialize`` refuses "auto" there).
"""
import argparse
import gc
import inspect
import json
import os

import deepspeed
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import attent_scale  # attent


class ByteSequences(torch.utils.data.Dataset):
    """Fixed-length byte sequences of some text held in memory (a stand-in for your corpus)."""

    def __init__(self, text: str, length: int):
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        self.rows = data[: len(data) // length * length].view(-1, length)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--checkpoint", default="runs/example-gpt2")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2,
                                       n_head=4))
    data = ByteSequences("".join(inspect.getsource(m) for m in (json, argparse)), length=64)

    engine, _, loader, _ = attent_scale.initialize(  # attent: was deepspeed.initialize
        args=args, model=model, model_parameters=model.parameters(), training_data=data,
        passes=args.passes)  # attent: the passes the run is planned for
    for epoch in range(args.passes):
        for batch in loader:
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"epoch {epoch}: last loss {loss.item():.3f}", flush=True)
    engine.save_checkpoint(args.checkpoint)


if __name__ == "__main__":
    main()
    # End the process group after main has returned, collecting first: a model or engine holds
    # its group in reference cycles, and a group still referenced at exit keeps gloo's threads,
    # which can abort a rank after a successful run.
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
