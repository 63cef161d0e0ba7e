"""Pretrain a causal LM with DeepSpeed and (optionally) the AtteNT teacher.

One CPU process, embedded corpus (the interpreter's standard library), teacher on:
    attent-pretrain --deepspeed_config configs/zero1.json --out runs/demo
Two ranks on one machine (CPU or GPU):
    deepspeed --num_gpus 2 --module attent_scale.pretrain --deepspeed_config configs/zero2.json
    torchrun --nproc_per_node 2 -m attent_scale.pretrain --deepspeed_config configs/zero3.json
Your corpus and model: --data (attent-prepare's output, or MDS shards of your own), --model-config
or --init-from. The same job without the teacher: remove the "attent" section, set
"enabled": false, or pass --no-teacher.

Build order: config, distributed init, data, model, teacher, engine, resume, then the pass loop;
loop.Run keeps the books around it (progress, logs, evaluation, checkpoints), shared with the
FSDP2 job (pretrain_fsdp.py).
"""
from __future__ import annotations

import os
import sys

import torch

from .loop import build_parser


def parse_args(argv=None):
    return build_parser(__doc__.split("\n")[0], "configs/zero1.json").parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .loop import run_main
    return run_main("attent-pretrain", args, lambda: train(args))


def train(args) -> int:
    # A bad "attent" section or option fails before the slow imports.
    from .loop import start_job
    ds_config, attent = start_job(args, "attent-pretrain")
    import deepspeed
    from torch.utils.data import DataLoader

    from . import deepspeed_plugin as dsp
    from .comm import make_comm
    from .loop import Progress, Run, local_device, open_job, resume_elastic, train_forward
    from .model import describe
    from .monitor import open_monitor
    from .teaching import print0

    # -- distributed ----------------------------------------------------------------------------
    # Checked before the process group exists: every rank exits alone, with nothing to tear down.
    try:
        micro, global_batch = dsp.global_batch_size(ds_config, int(os.environ["WORLD_SIZE"]))
    except ValueError as exc:
        raise SystemExit(f"attent-pretrain: {args.deepspeed_config}: {exc}") from None
    from .startup import skip_shm_allreduce
    skip_shm_allreduce()  # training needs gloo only: no g++ build, no /dev/shm buffers
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    device = local_device()
    comm = make_comm()

    # -- data, model, teacher, engine -----------------------------------------------------------
    job = open_job(args, "attent-pretrain", attent, micro, global_batch, comm, device)
    teaching, planned = job.teaching, job.planned
    engine = dsp.build_engine(job.model, dsp.resolve_auto(ds_config, planned))
    print0(f"model {args.model_config or args.init_from or args.model}: {describe(job.model)}; "
           f"{job.meta['num_train']} train sequences of {job.meta['seq_len']} tokens; world "
           f"{comm.world}, micro batch {micro}, global batch {global_batch}; teacher "
           f"{'on' if attent else 'off'}; loss {job.kernel}; planned {planned} steps")

    # -- resume ---------------------------------------------------------------------------------
    prog, saved = job.fresh_progress, job.saved
    if saved is not None:
        elastic = saved.get("world", 0) not in (0, comm.world)
        if elastic and (dsp.zero_stage(ds_config) == 3 or args.budget_fraction < 1.0):
            raise SystemExit(f"attent-pretrain: the checkpoint in {job.ckpt} was written by "
                             f"{saved['world']} ranks, this job has {comm.world}; a resume on "
                             "another world size needs ZeRO stage 0-2 and --budget-fraction 1 "
                             "(see docs/RELIABILITY.md); resume on the original world size")
        try:
            dsp.load_checkpoint(engine, teaching, job.ckpt, load_optimizer_states=not elastic,
                                pass_index=saved["pass_index"])
        except (RuntimeError, ValueError) as exc:  # ValueError: a damaged teacher state
            raise SystemExit(f"attent-pretrain: {exc}") from None
        prog = Progress(**saved)
        print0(f"resumed at step {prog.step}, pass {prog.pass_index}, "
               f"{prog.samples_in_pass} samples into the pass")
        if elastic:
            planned = resume_elastic(prog, teaching.teacher, comm.world, global_batch)
        prog.world = comm.world  # also for checkpoints written before the world was recorded
        teaching.pass_index, teaching.samples_done = prog.pass_index, prog.samples_in_pass

    # -- train ----------------------------------------------------------------------------------
    run = Run(job, prog, planned, engine,
              save=lambda tag: dsp.save_checkpoint(engine, teaching, job.ckpt, tag,
                                                   prog.__dict__),
              monitor=open_monitor(ds_config, engine))
    column = job.meta["token_column"]
    for p in run.passes():
        run.begin_pass(p, engine.module)
        for batch in DataLoader(job.train_ds, batch_size=micro, num_workers=args.workers):
            ids = batch["id"].numpy()
            tokens = batch[column].to(device=device, dtype=torch.long)
            loss = train_forward(engine, ids, tokens, teaching, job.kernel)
            # DeepSpeed accumulates over the window itself: its step() only steps at the end.
            engine.backward(loss)
            engine.step()
            run.trained(p, ids, tokens)
            if run.window_closed() and run.stepped(p, loss, engine.get_lr()[0]):
                break
        if run.end_pass(p):
            break
    run.finish("off (plain DeepSpeed)", f"{args.model} on {job.meta['num_train']} sequences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
