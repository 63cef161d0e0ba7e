"""Pretrain a Llama-shaped causal LM with PyTorch FSDP2 (fully_shard) and the AtteNT teacher.

The same JSON, corpus, teacher and streaming reader as the DeepSpeed loop (pretrain.py); only the
engine differs. One process (CPU or one GPU):
    attent-pretrain-fsdp --config configs/fsdp.json --out runs/fsdp
Several ranks, one node or many (see launchers/torchrun/pretrain_fsdp.sh):
    torchrun --nproc_per_node 2 -m attent_scale.pretrain_fsdp --config configs/fsdp.json
The same job without the teacher: remove the "attent" section or pass --no-teacher.

Build order: config, distributed init, data, model, teacher, sharding and optimizer, resume, then
the pass loop. Every forward all-gathers each block's parameters (a collective), so every rank
must run the same number of forwards: training batches are equal per rank by the remainder rule,
pool scoring and evaluation pad with invalid rows (partition.lockstep_batches).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from .pretrain import Progress, build_model, build_parser, forward_scores, print0


def parse_args(argv=None):
    p = build_parser()
    p.description = __doc__.split("\n")[0]
    p.set_defaults(deepspeed_config="configs/fsdp.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # A bad section or option fails before the slow imports.
    from .config import ConfigError
    from .loop import start_job
    raw_config, attent = start_job(args, "attent-pretrain-fsdp")
    from . import fsdp_plugin as fsp
    cuda = torch.cuda.is_available()
    try:
        tc = fsp.parse_train_config(raw_config, int(os.environ["WORLD_SIZE"]), cuda)
    except ConfigError as exc:
        raise SystemExit(f"attent-pretrain-fsdp: {args.deepspeed_config}: {exc}") from None
    from torch.utils.data import DataLoader

    from .comm import make_comm, shutdown
    from .loop import (Run, local_device, make_probe, open_data, refuse_foreign_checkpoint,
                       weighted_loss)
    from .teacher import Teacher

    # -- distributed ----------------------------------------------------------------------------
    device = local_device()
    fsp.init_distributed(cuda)
    comm = make_comm()
    world = comm.world
    for note in tc.notes:
        print0(f"note: {note}")
    micro, global_batch, gas = tc.micro_batch, tc.global_batch, tc.grad_accum
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # -- data ---------------------------------------------------------------------------------
    meta, train_ds, val_ds = open_data(args, comm, micro)

    # -- model, teacher, sharding, optimizer --------------------------------------------------
    model = build_model(args.model, meta["vocab_size"], meta["seq_len"], args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    probe = make_probe(model, attent)
    teacher = Teacher(attent, meta["num_train"], args.epochs, global_batch, comm,
                      data_seed=args.seed)
    planned = max(1, math.floor(teacher.planned_steps() * args.budget_fraction))
    model = fsp.shard(model.to(device), tc.bf16)
    optimizer, scheduler = fsp.build_optimizer(model, tc, planned)
    print0(f"model {args.model}: {n_params / 1e6:.2f}M parameters (FSDP2 over {world} ranks); "
           f"{meta['num_train']} train sequences of {meta['seq_len']} tokens; micro batch "
           f"{micro}, global batch {global_batch}; teacher {'on' if attent else 'off'}; planned "
           f"{planned} steps")

    # -- resume ---------------------------------------------------------------------------------
    prog = Progress(fingerprint=meta["fingerprint"], world=world)
    ckpt = out / "checkpoints"
    try:
        saved = None if args.no_resume else fsp.read_trainer_state(ckpt)
    except RuntimeError as exc:
        raise SystemExit(f"attent-pretrain-fsdp: {exc}") from None
    if saved is not None:
        refuse_foreign_checkpoint("attent-pretrain-fsdp", saved, meta, ckpt, args.data)
        # DCP could reshard the weights, but the pass in progress is counted in global batches
        # of the old world size.
        if saved.get("world", 0) not in (0, world):
            raise SystemExit(f"attent-pretrain-fsdp: the checkpoint in {ckpt} was written by "
                             f"{saved['world']} ranks, this job has {world}; resume on the "
                             "original world size")
        fsp.load_checkpoint(model, optimizer, scheduler, teacher, ckpt)
        prog = Progress(**saved)
        print0(f"resumed at step {prog.step}, pass {prog.pass_index}, "
               f"{prog.samples_in_pass} samples into the pass")

    # -- train ----------------------------------------------------------------------------------
    run = Run(args, out, comm, teacher, prog, planned, device, model, val_ds, micro,
              save=lambda tag: fsp.save_checkpoint(model, optimizer, scheduler, teacher, ckpt,
                                                   tag, prog.__dict__))
    for p in run.passes():
        # Streaming hands each rank the same number of micro batches of the selection.
        selection = run.begin_pass(p, train_ds, probe)
        for batch in DataLoader(train_ds, batch_size=micro, num_workers=args.workers):
            ids = batch["id"].numpy()
            tokens = batch["tokens"].to(device=device, dtype=torch.long)
            last_micro = run.last_micro()
            # Inside an accumulation window gradients stay local (unsharded) and are
            # reduce-scattered once, on the window's last backward.
            model.set_requires_gradient_sync(last_micro)
            ce, scores = forward_scores(model, tokens, teacher, probe,
                                         score=teacher.wants_free_scores())
            loss = weighted_loss(ce, ids, teacher)
            (loss / gas).backward()  # the mean over the window, as DeepSpeed's backward does
            run.trained(p, ids, scores, tokens)
            if not last_micro:
                continue
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if run.stepped(p, loss, optimizer.param_groups[0]["lr"]):
                break
        if run.end_pass(p, selection):
            break
    run.finish("off (plain FSDP2)", f"{args.model} on {meta['num_train']} sequences (FSDP2)")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
