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

import os
import sys

import torch

from .loop import build_parser


def parse_args(argv=None):
    return build_parser(__doc__.split("\n")[0], "configs/fsdp.json").parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .loop import run_main
    return run_main("attent-pretrain-fsdp", args, lambda: train(args))


def train(args) -> int:
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

    from .comm import make_comm
    from .loop import Progress, Run, local_device, open_job, train_forward
    from .model import describe
    from .monitor import open_monitor
    from .teaching import print0

    # -- distributed ----------------------------------------------------------------------------
    device = local_device()
    fsp.init_distributed(cuda)
    comm = make_comm()
    world = comm.world
    for note in tc.notes:
        print0(f"note: {note}")
    micro, global_batch, gas = tc.micro_batch, tc.global_batch, tc.grad_accum

    # -- data, model, teacher, sharding, optimizer ----------------------------------------------
    job = open_job(args, "attent-pretrain-fsdp", attent, micro, global_batch, comm, device)
    teaching, planned = job.teaching, job.planned
    size = describe(job.model)  # before sharding: each rank then holds a part
    model = fsp.shard(job.model.to(device), tc.bf16)
    optimizer, scheduler = fsp.build_optimizer(model, tc, planned)
    print0(f"model {args.model_config or args.init_from or args.model}: {size} (FSDP2 over "
           f"{world} ranks); {job.meta['num_train']} train sequences of {job.meta['seq_len']} "
           f"tokens; micro batch {micro}, global batch {global_batch}; teacher "
           f"{'on' if attent else 'off'}; loss {job.kernel}; planned {planned} steps")

    # -- resume ---------------------------------------------------------------------------------
    prog, saved = job.fresh_progress, job.saved
    if saved is not None:
        # DCP could reshard the weights, but the pass in progress is counted in global batches
        # of the old world size.
        if saved.get("world", 0) not in (0, world):
            raise SystemExit(f"attent-pretrain-fsdp: the checkpoint in {job.ckpt} was written "
                             f"by {saved['world']} ranks, this job has {world}; resume on the "
                             "original world size")
        try:
            fsp.load_checkpoint(model, optimizer, scheduler, teaching, job.ckpt,
                                pass_index=saved["pass_index"])
        except ValueError as exc:  # a damaged teacher state: its message names file and field
            raise SystemExit(f"attent-pretrain-fsdp: {exc}") from None
        # DCP reports a missing or damaged file as an AssertionError, a RuntimeError or a
        # CheckpointException, a BaseException holding each rank's error (`failures`); only
        # comm.py and the adapter import torch.distributed, so it is known by that attribute.
        except BaseException as exc:  # noqa: BLE001 - anything else is raised again
            if not isinstance(exc, (AssertionError, OSError, RuntimeError)) and \
                    not isinstance(getattr(exc, "failures", None), dict):
                raise
            raise SystemExit(f"attent-pretrain-fsdp: {load_failure(exc, job.ckpt)}") from None
        prog = Progress(**saved)
        print0(f"resumed at step {prog.step}, pass {prog.pass_index}, "
               f"{prog.samples_in_pass} samples into the pass")
        teaching.pass_index, teaching.samples_done = prog.pass_index, prog.samples_in_pass

    # -- train ----------------------------------------------------------------------------------
    run = Run(job, prog, planned, model,
              save=lambda tag: fsp.save_checkpoint(model, optimizer, scheduler, teaching,
                                                   job.ckpt, tag, prog.__dict__),
              monitor=open_monitor(raw_config))
    column = job.meta["token_column"]
    for p in run.passes():
        # Streaming hands each rank the same number of micro batches of the selection.
        run.begin_pass(p, model)
        for batch in DataLoader(job.train_ds, batch_size=micro, num_workers=args.workers):
            ids = batch["id"].numpy()
            tokens = batch[column].to(device=device, dtype=torch.long)
            last_micro = run.last_micro()
            # Inside an accumulation window gradients stay local (unsharded) and are
            # reduce-scattered once, on the window's last backward.
            model.set_requires_gradient_sync(last_micro)
            loss = train_forward(model, ids, tokens, teaching, job.kernel)
            (loss / gas).backward()  # the mean over the window, as DeepSpeed's backward does
            run.trained(p, ids, tokens)
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
        if run.end_pass(p):
            break
    run.finish("off (plain FSDP2)",
               f"{args.model} on {job.meta['num_train']} sequences (FSDP2)")
    return 0


def load_failure(exc: BaseException, ckpt) -> str:
    """One line for a checkpoint that DCP (or the schedule's JSON) could not read."""
    from .checkpoint import latest_tag
    tag_dir = ckpt / str(latest_tag(ckpt))
    causes = [exc]
    if isinstance(getattr(exc, "failures", None), dict):  # {rank: (exception, traceback)}
        causes = [f[0] if isinstance(f, tuple) else f for _, f in sorted(exc.failures.items())]
    fix = (f"fix: point {ckpt / 'latest'} at an earlier complete tag, or start fresh "
           "(--no-resume, or another --out)")
    missing = next((c.filename for c in causes if isinstance(c, FileNotFoundError)), None)
    if missing:
        return f"checkpoint {tag_dir} is incomplete: {missing} is missing; {fix}"
    # torch's own messages run on for several sentences; the first says what failed.
    first = (str(causes[0]).strip().splitlines() or [""])[0].split(". ")[0][:300]
    return (f"checkpoint {tag_dir} cannot be loaded ({type(causes[0]).__name__}: {first}); "
            f"it is damaged or was written by another job; {fix}")


if __name__ == "__main__":
    sys.exit(main())
