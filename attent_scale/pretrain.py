"""Pretrain a Llama-shaped causal LM from scratch with DeepSpeed and (optionally) the AtteNT teacher.

One CPU process, embedded corpus (the interpreter's standard library), teacher on:
    attent-pretrain --deepspeed_config configs/zero1.json --out runs/demo
Two ranks on one machine (CPU or GPU):
    deepspeed --num_gpus 2 --module attent_scale.pretrain --deepspeed_config configs/zero2.json
    torchrun --nproc_per_node 2 -m attent_scale.pretrain --deepspeed_config configs/zero3.json
The same job without the teacher: remove the "attent" section, set "enabled": false, or pass
--no-teacher.

Build order: config, distributed init, data, model, teacher, engine, resume, then the pass loop;
loop.Run keeps the books around it (progress, logs, evaluation, checkpoints), shared with the
FSDP2 job (pretrain_fsdp.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .model import MODEL_SHAPES, build_model  # noqa: F401  (re-exported for old callers)


def build_parser() -> argparse.ArgumentParser:
    """The job's options; the FSDP2 loop (pretrain_fsdp.py) takes the same ones."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed_config", "--config", default="configs/zero1.json",
                   help="DeepSpeed JSON; its 'attent' section switches the teacher on")
    p.add_argument("--no-teacher", action="store_true", help="ignore the 'attent' section")
    p.add_argument("--out", default="runs/demo", help="metrics, plot and checkpoints go here")
    p.add_argument("--data", default=".cache/stdlib-corpus",
                   help="prepared corpus directory (built from the standard library if missing); "
                        "with --remote, the local cache of the remote corpus")
    p.add_argument("--remote", default=None,
                   help="a prepared corpus in an object store or another path (s3://bucket/dir): "
                        "streamed into --data as a cache instead of building one")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="source bytes read when building the corpus (default 1000000; 0 = all)")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer size (default 1024)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 64)")
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="demo")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training data")
    p.add_argument("--seed", type=int, default=0, help="model init and data order")
    p.add_argument("--budget-fraction", type=float, default=1.0,
                   help="train only this share of the planned steps, with the learning-rate "
                        "schedule fitted to it (full-data baselines at smaller budgets)")
    p.add_argument("--eval-every", type=int, default=50, help="optimizer steps between evals")
    p.add_argument("--eval-samples", type=int, default=256, help="validation sequences per eval")
    p.add_argument("--save-every", type=int, default=0, help="optimizer steps between checkpoints")
    p.add_argument("--stop-after", type=int, default=0,
                   help="save and exit after this many optimizer steps (tests resume)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")
    p.add_argument("--no-shm-clean", action="store_true",
                   help="leave streaming's shared memory alone at start: another streaming job "
                        "runs on this node (each such job must read its own --data path)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--log-ids", action="store_true",
                   help="write the sample ids each rank trains to out/ids.rank<R>.jsonl")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@dataclass
class Progress:
    """Trainer state that goes into every checkpoint (plain JSON)."""
    step: int = 0                 # optimizer steps
    pass_index: int = 0
    samples_in_pass: int = 0      # consumed by the whole data-parallel group in this pass
    samples: int = 0
    tokens: int = 0
    skipped: int = 0
    wall: float = 0.0             # training seconds before this process started
    teacher_time: float = 0.0     # pool scoring, score gathering, selection
    eval_time: float = 0.0
    fingerprint: str = ""
    val_loss: Optional[float] = None
    world: int = 0                # data-parallel ranks that wrote the checkpoint (0: unknown)


def print0(*args) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


# Sized so the README's demo finishes in a few minutes on 2 CPU cores.
CORPUS_DEFAULTS = {"max_bytes": 1_000_000, "vocab_size": 1024, "seq_len": 64}


def prepare_data(args, comm) -> dict:
    """Use the corpus in --data; build it (rank 0, others wait) when it does not exist yet.

    Corpus options left unset take the existing corpus's values (or the defaults when building);
    options set explicitly must match an existing corpus.
    """
    from .data import prepare_corpus
    root = Path(args.data)
    wanted = {k: getattr(args, k) for k in CORPUS_DEFAULTS if getattr(args, k) is not None}
    if args.remote:
        # One download per node; the shards themselves stream in on demand.
        if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not (root / "meta.json").exists():
            from .streaming_data import fetch_file
            fetch_file(f"{args.remote.rstrip('/')}/meta.json", root / "meta.json")
        comm.barrier()
    if (root / "meta.json").exists():
        meta = json.loads((root / "meta.json").read_text())
        clash = {k: (v, meta.get(k)) for k, v in wanted.items()
                 if (v or None) != meta.get(k)}
        if clash:
            raise SystemExit(f"--data {root} holds a corpus built with other settings: " +
                             ", ".join(f"--{k.replace('_', '-')} {v} vs corpus {m}"
                                       for k, (v, m) in clash.items()) +
                             "; drop these options or choose another --data directory")
        return meta
    opts = {**CORPUS_DEFAULTS, **wanted}
    if comm.rank == 0:
        prepare_corpus(root, seq_len=opts["seq_len"], vocab_size=opts["vocab_size"],
                       max_bytes=opts["max_bytes"] or None)
    comm.barrier()
    return json.loads((root / "meta.json").read_text())


def resume_elastic(prog: Progress, teacher, world: int, global_batch: int) -> int:
    """Adapt a checkpoint written on another world size; returns the new planned step count.

    The teacher's state is global (the whole score table, the selection), so it carries over as
    it is, except that a kept selection is cut to whole global batches of this world size. The
    pass in progress continues where it stopped when the samples it consumed are whole global
    batches here and its selection was not cut (streaming's sample order depends on the
    canonical nodes, not on the rank count, so the same samples are skipped); otherwise it ends
    at the checkpoint and its untrained ids are counted as skipped.
    """
    old_world = prog.world
    resized = teacher.selection_resized
    p, done = prog.pass_index, prog.samples_in_pass
    note = ""
    if done > 0:
        size = resized[0] if resized else len(teacher.selection.ids)
        if resized is not None or done % global_batch:
            prog.skipped += size - done
            prog.pass_index, prog.samples_in_pass = p + 1, 0
            note = f"; pass {p} ends here, {size - done} of its {size} selected ids untrained"
        else:
            note = f"; pass {p} continues after its first {done} samples"
    if resized is not None:
        note += f"; the kept selection was cut from {resized[0]} to {resized[1]} ids"
    print0(f"elastic resume: checkpoint of {old_world} ranks, now {world} (global batch "
           f"{global_batch}); optimizer moments restart from the loaded weights{note}")
    prog.world = world
    # Steps so far had another global batch: the remaining plan is counted in this world's steps.
    return prog.step + teacher.planned_steps()


def check_corpus(root: Path, meta: dict, remote: bool) -> None:
    """Refuse, before any training, a corpus that would train on wrong or unreadable data.

    Every rank runs the same checks on the same files, so every rank stops with the same error
    (no rank is left waiting in a collective).
    """
    from .data import load_tokenizer, verify_split
    try:
        # With a remote, absent shards stream in later and streaming validates them on download;
        # so does index.json itself while the cache is still empty.
        for split, n in (("train", meta["num_train"]), ("val", meta["num_val"])):
            if remote and not (root / split / "index.json").exists():
                continue
            verify_split(root / split, n, allow_missing=remote)
    except ValueError as exc:
        raise SystemExit(f"attent-pretrain: --data {root}: {exc}") from None
    if (root / "tokenizer.model").exists():
        pieces = load_tokenizer(root).get_piece_size()
        if pieces > meta["vocab_size"]:
            # Token ids >= the embedding size would index past it: a crash on CPU, silent garbage
            # or a device assert on GPU.
            raise SystemExit(f"attent-pretrain: --data {root}: the tokenizer has {pieces} pieces "
                             f"but meta.json's vocab_size (the model's embedding size) is "
                             f"{meta['vocab_size']}; prepare the corpus again so they agree")


def token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token CE [B, T-1] with grad, labels [B, T-1]): next-token prediction."""
    labels = tokens[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="none")
    return ce.view(labels.shape), labels


def forward_scores(engine, tokens, teacher, probe, score: bool):
    """Forward, per-token losses and (when ``score``) the teacher's per-example scores."""
    cfg = teacher.cfg
    score = score and cfg is not None
    grad_norm = score and cfg.signal == "grad_norm"
    pool = grad_norm and not torch.is_grad_enabled()  # score_pool runs under no_grad
    if grad_norm:
        recording = probe.recording(keep_outputs=pool)
    else:
        recording = probe.recording(score) if probe else contextlib.nullcontext()
    # grad_norm differentiates the losses to its layers' outputs, in a pool pass too, and there
    # past the DeepSpeed engine, whose forward would take that backward for a training one
    # (gradient-accumulation scaling, gradient reduction).
    net = getattr(engine, "module", engine) if pool else engine
    with torch.enable_grad() if pool else contextlib.nullcontext():
        with recording:
            logits = net(input_ids=tokens).logits
        ce, labels = token_losses(logits, tokens)
    scores = None
    if grad_norm:
        from .signals import IGNORE_INDEX
        mask = labels != IGNORE_INDEX
        # Training step: filled in place by engine.backward; pool pass: computed here.
        scores = probe.score_now(ce, mask) if pool else probe.attach(ce, mask)
    elif score:
        from .signals import example_scores
        importance = probe.pop()[:, :-1] if probe else None
        scores = example_scores(cfg.signal, ce.detach(), labels, logits.detach()[:, :-1],
                                importance, cfg.score_chunk_tokens)
    return ce, scores


class DeviceScores:
    """Free scores kept on the device and copied to the host in bulk.

    Copying each step's scores at once would make the host wait for the GPU every step; flushing
    at points that synchronise anyway (logging, pass ends, checkpoints) keeps the step loop async.
    """

    def __init__(self):
        self.items: list[tuple[np.ndarray, torch.Tensor, int]] = []

    def add(self, ids: np.ndarray, scores: torch.Tensor, stamp: int) -> None:
        self.items.append((ids, scores.detach(), stamp))

    def flush(self, teacher, window: list) -> None:
        if not self.items:
            return
        host = torch.cat([s for _, s, _ in self.items]).float().cpu().numpy()
        start = 0
        for ids, _, stamp in self.items:
            teacher.record(ids, host[start:start + len(ids)], stamp)
            start += len(ids)
        window.append(host)
        self.items.clear()


def load_tokens(ds, ids: np.ndarray, device) -> torch.Tensor:
    """A [len(ids), T] batch read by random access (lockstep passes choose their own ids)."""
    return torch.stack([torch.from_numpy(ds[int(i)]["tokens"].astype(np.int64))
                        for i in ids]).to(device)


@torch.no_grad()
def evaluate(engine, val_ds, n: int, micro: int, comm, device) -> float:
    """Mean per-token validation loss over the first n validation sequences, lockstep on ranks."""
    from .partition import lockstep_batches
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for ids, valid in lockstep_batches(np.arange(min(n, len(val_ds))), comm.rank, comm.world,
                                       micro):
        tokens = load_tokens(val_ds, ids, device)
        ce, _ = token_losses(engine(input_ids=tokens).logits, tokens)
        v = torch.from_numpy(valid).to(device)
        total[0] += ce.sum(dim=1)[v].double().sum()
        total[1] += ce.shape[1] * v.sum()
    engine.train()
    comm.sum_(total)
    return float(total[0] / total[1])


@torch.no_grad()
def score_pool(engine, train_ds, ids, teacher, probe, micro, comm, device, stamp) -> None:
    """No-grad scoring of the candidate pool: every rank runs the same number of forwards."""
    from .partition import lockstep_batches
    engine.eval()
    for batch_ids, valid in lockstep_batches(ids, comm.rank, comm.world, micro):
        tokens = load_tokens(train_ds, batch_ids, device)
        _, scores = forward_scores(engine, tokens, teacher, probe, score=True)
        teacher.record(batch_ids[valid], scores.cpu().numpy()[valid], stamp)
    engine.train()


def _single_process_env() -> None:
    # Started without a launcher: describe a world of one so init_distributed needs no MPI.
    if "RANK" not in os.environ:
        # Bare `srun -n N` would start N jobs of one rank each, all writing to the same --out.
        tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", 1))
        if tasks > 1:
            raise SystemExit(
                f"attent-pretrain: srun started {tasks} tasks but RANK is unset, so each would "
                "train alone; submit launchers/slurm/pretrain.sbatch, or set RANK, WORLD_SIZE, "
                "LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in every task")
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(argv=None) -> int:
    args = parse_args(argv)
    # A bad "attent" section or option fails before the slow imports.
    from .loop import start_job
    ds_config, attent = start_job(args, "attent-pretrain")
    import deepspeed
    from torch.utils.data import DataLoader

    from . import deepspeed_plugin as dsp
    from .comm import make_comm, shutdown
    from .loop import (Run, local_device, make_probe, open_data, refuse_foreign_checkpoint,
                       weighted_loss)
    from .teacher import Teacher

    # -- distributed ----------------------------------------------------------------------------
    # Checked before the process group exists: every rank exits alone, with nothing to tear down.
    try:
        micro, global_batch = dsp.global_batch_size(ds_config, int(os.environ["WORLD_SIZE"]))
    except ValueError as exc:
        raise SystemExit(f"attent-pretrain: {args.deepspeed_config}: {exc}") from None
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    device = local_device()
    comm = make_comm()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # -- data ---------------------------------------------------------------------------------
    meta, train_ds, val_ds = open_data(args, comm, micro)

    # -- model, teacher, engine ----------------------------------------------------------------
    model = build_model(args.model, meta["vocab_size"], meta["seq_len"], args.seed)
    probe = make_probe(model, attent)
    teacher = Teacher(attent, meta["num_train"], args.epochs, global_batch, comm,
                      data_seed=args.seed)
    planned = max(1, math.floor(teacher.planned_steps() * args.budget_fraction))
    engine = dsp.initialize(model, dsp.resolve_auto(ds_config, planned))
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"model {args.model}: {n_params / 1e6:.2f}M parameters; {meta['num_train']} train "
           f"sequences of {meta['seq_len']} tokens; world {comm.world}, micro batch {micro}, "
           f"global batch {global_batch}; teacher {'on' if attent else 'off'}; planned "
           f"{planned} steps")

    # -- resume ---------------------------------------------------------------------------------
    prog = Progress(fingerprint=meta["fingerprint"], world=comm.world)
    ckpt = out / "checkpoints"
    try:
        saved = None if args.no_resume else dsp.read_trainer_state(ckpt)
    except RuntimeError as exc:
        raise SystemExit(f"attent-pretrain: {exc}") from None
    if saved is not None:
        refuse_foreign_checkpoint("attent-pretrain", saved, meta, ckpt, args.data)
        elastic = saved.get("world", 0) not in (0, comm.world)
        if elastic and (dsp.zero_stage(ds_config) == 3 or args.budget_fraction < 1.0):
            raise SystemExit(f"attent-pretrain: the checkpoint in {ckpt} was written by "
                             f"{saved['world']} ranks, this job has {comm.world}; a resume on "
                             "another world size needs ZeRO stage 0-2 and --budget-fraction 1 "
                             "(see docs/RELIABILITY.md); resume on the original world size")
        try:
            dsp.load_checkpoint(engine, teacher, ckpt, load_optimizer_states=not elastic)
        except RuntimeError as exc:
            raise SystemExit(f"attent-pretrain: {exc}") from None
        prog = Progress(**saved)
        print0(f"resumed at step {prog.step}, pass {prog.pass_index}, "
               f"{prog.samples_in_pass} samples into the pass")
        if elastic:
            planned = resume_elastic(prog, teacher, comm.world, global_batch)
        prog.world = comm.world  # also for checkpoints written before the world was recorded

    # -- train ----------------------------------------------------------------------------------
    run = Run(args, out, comm, teacher, prog, planned, device, engine, val_ds, micro,
              save=lambda tag: dsp.save_checkpoint(engine, teacher, ckpt, tag, prog.__dict__))
    for p in run.passes():
        selection = run.begin_pass(p, train_ds, probe)
        for batch in DataLoader(train_ds, batch_size=micro, num_workers=args.workers):
            ids = batch["id"].numpy()
            tokens = batch["tokens"].to(device=device, dtype=torch.long)
            ce, scores = forward_scores(engine, tokens, teacher, probe,
                                         score=teacher.wants_free_scores())
            loss = weighted_loss(ce, ids, teacher)
            # DeepSpeed accumulates over the window itself: its step() only steps at the end.
            engine.backward(loss)
            engine.step()
            run.trained(p, ids, scores, tokens)
            if run.window_closed() and run.stepped(p, loss, engine.get_lr()[0]):
                break
        if run.end_pass(p, selection):
            break
    run.finish("off (plain DeepSpeed)", f"{args.model} on {meta['num_train']} sequences")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
