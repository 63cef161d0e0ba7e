"""A plain PyTorch DDP loop that builds its own DataLoader, with the AtteNT teacher.

    torchrun --nproc_per_node 2 examples/ddp_sampler.py --config examples/ds_config.json

Against the same loop with ``DistributedSampler``, the lines marked "attent" differ: the import,
the config option, the sampler, the dataset handed to the DataLoader (its items carry their index
as "id"), the schedule's length (passes shrink once the teacher selects), taking the ids off the
batch, and the loss, which ``sampler.update`` returns after recording the batch's scores. Only
the "attent" section of the config file is read.
"""
import argparse
import gc
import inspect
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
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
    parser.add_argument("--config", default="examples/ds_config.json")  # attent
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() \
        else torch.device("cpu")

    torch.manual_seed(0)
    model = DistributedDataParallel(GPT2LMHeadModel(GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)).to(device))
    data = ByteSequences("".join(inspect.getsource(m) for m in (json, argparse)), length=64)
    sampler = attent_scale.AttentSampler(data, args.config, passes=args.passes,  # attent
                                         batch_size=args.batch_size)
    loader = DataLoader(sampler.dataset, batch_size=args.batch_size, sampler=sampler)  # attent
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                          sampler.planned_steps())  # attent

    for epoch in range(args.passes):
        sampler.set_epoch(epoch)
        for batch in loader:
            ids = batch.pop("id")  # attent
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            loss = sampler.update(ids, logits=out.logits, labels=batch["labels"])  # attent
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        if dist.get_rank() == 0:
            print(f"epoch {epoch}: last loss {loss.item():.3f}", flush=True)


if __name__ == "__main__":
    main()
    # End the process group after main has returned, collecting first: a model or engine holds
    # its group in reference cycles, and a group still referenced at exit keeps gloo's threads,
    # which can abort a rank after a successful run.
    gc.collect()
    dist.destroy_process_group()
