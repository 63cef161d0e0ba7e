"""Pretrain a Llama-shaped causal LM from scratch with DeepSpeed and (optionally) the AtteNT teacher.

One CPU process, embedded corpus (the interpreter's standard library), teacher on:
    attent-pretrain --deepspeed_config configs/zero1.json --out runs/demo
Two ranks on one machine (CPU or GPU):
    deepspeed --num_gpus 2 --module attent_scale.pretrain --deepspeed_config configs/zero2.json
    torchrun --nproc_per_node 2 -m attent_scale.pretrain --deepspeed_config configs/zero3.json
The same job without the teacher: remove the "attent" section, set "enabled": false, or pass
--no-teacher.

Build order: distributed init, config, data, model, teacher, engine, resume, then train().
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

MODEL_SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate)
    "tiny": (64, 2, 4, 2, 128),
    "demo": (128, 2, 4, 2, 384),
    "small": (384, 6, 6, 2, 1024),
    "100m": (768, 12, 12, 4, 2304),
}


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


def build_model(shape: str, vocab: int, seq_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, layers, heads, kv, inter = MODEL_SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                      max_position_embeddings=seq_len, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    # Model init is user territory; the teacher itself never touches a global RNG.
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


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
    if not 0.0 < args.budget_fraction <= 1.0:
        raise SystemExit(f"--budget-fraction must be in (0, 1], got {args.budget_fraction}")
    # -- config first: a bad "attent" section fails before the slow imports ------------------
    from .config import ConfigError, split_deepspeed_config
    try:
        ds_config, attent = split_deepspeed_config(args.deepspeed_config)
    except (ConfigError, OSError) as exc:
        raise SystemExit(f"attent-pretrain: {args.deepspeed_config}: {exc}") from None
    if args.no_teacher:
        attent = None
    _single_process_env()
    from .streaming_data import adopt_launcher_env, check_remote
    adopt_launcher_env()
    if args.remote:
        try:
            check_remote(args.remote)
        except ValueError as exc:
            raise SystemExit(f"attent-pretrain: --remote: {exc}") from None
    import deepspeed
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from . import deepspeed_plugin as dsp
    from .comm import make_comm
    from .report import MetricsLogger, format_summary, plot_metrics
    from .streaming_data import SubsetStreamingDataset, clean_shared_memory
    from .teacher import Teacher

    # -- distributed ----------------------------------------------------------------------------
    # Checked before the process group exists: every rank exits alone, with nothing to tear down.
    try:
        micro, global_batch = dsp.global_batch_size(ds_config, int(os.environ["WORLD_SIZE"]))
    except ValueError as exc:
        raise SystemExit(f"attent-pretrain: {args.deepspeed_config}: {exc}") from None
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
              if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a CPU must not oversubscribe it: spinning OpenMP threads of two
        # processes on the same cores slow each step down many times over.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    comm = make_comm()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # -- data ---------------------------------------------------------------------------------
    meta = prepare_data(args, comm)
    check_corpus(Path(args.data), meta, remote=bool(args.remote))
    if not args.no_shm_clean:
        # Streaming's cleanup unlinks every segment it finds, a live job's included.
        clean_shared_memory()  # collective: every rank calls it
    remote = (lambda split: f"{args.remote.rstrip('/')}/{split}") if args.remote else \
        (lambda split: None)
    train_ds = SubsetStreamingDataset(local=str(Path(args.data) / "train"),
                                      remote=remote("train"), batch_size=micro,
                                      shuffle_seed=args.seed)
    from streaming import StreamingDataset
    val_ds = StreamingDataset(local=str(Path(args.data) / "val"), remote=remote("val"),
                              batch_size=micro, shuffle=False)

    # -- model, teacher, engine ----------------------------------------------------------------
    model = build_model(args.model, meta["vocab_size"], meta["seq_len"], args.seed)
    probe = None
    if attent is not None and attent.signal == "attention_fgrad":
        from .attention import AttentionImportance
        probe = AttentionImportance(model, attent.attention.layers, attent.attention.query_chunk)
    elif attent is not None and attent.signal == "grad_norm":
        from .grad_norm import GradNormProbe
        probe = GradNormProbe.from_config(model, attent.grad_norm)
    teacher = Teacher(attent, meta["num_train"], args.epochs, global_batch, comm,
                      data_seed=args.seed)
    gas = global_batch // (micro * comm.world)
    planned = max(1, math.floor(teacher.planned_steps() * args.budget_fraction))
    engine = dsp.initialize(model, dsp.resolve_auto(ds_config, planned))
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"model {args.model}: {n_params / 1e6:.2f}M parameters; {meta['num_train']} train "
           f"sequences of {meta['seq_len']} tokens; world {comm.world}, micro batch {micro}, "
           f"global batch {global_batch}; teacher {'on' if attent else 'off'}; planned "
           f"{planned} steps")

    prog = Progress(fingerprint=meta["fingerprint"], world=comm.world)
    ckpt = out / "checkpoints"
    try:
        saved = None if args.no_resume else dsp.read_trainer_state(ckpt)
    except RuntimeError as exc:
        raise SystemExit(f"attent-pretrain: {exc}") from None
    if saved is not None:
        # Refused before anything loads: its scores and selection index another dataset.
        if saved["fingerprint"] != meta["fingerprint"]:
            raise SystemExit(f"attent-pretrain: the checkpoint in {ckpt} was made on another "
                             f"dataset (its fingerprint {saved['fingerprint'][:12]}, --data "
                             f"{args.data} has {meta['fingerprint'][:12]}); use another --out, "
                             "the original --data, or pass --no-resume")
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
    metrics = MetricsLogger(out / "metrics.jsonl" if comm.rank == 0 else None)
    # Line-buffered: a killed job's log still holds every step it trained (crash tests rely on it).
    id_log = open(out / f"ids.rank{comm.rank}.jsonl", "a", buffering=1) if args.log_ids else None

    # -- train ----------------------------------------------------------------------------------
    t0 = time.perf_counter() - prog.wall
    now = lambda: time.perf_counter() - t0  # noqa: E731
    # In a log file (not a terminal) redraw rarely, so the log stays readable.
    bar = tqdm(total=planned, initial=prog.step, disable=comm.rank != 0, desc="train",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15)

    def checkpoint(tag: str) -> None:
        pending.flush(teacher, window)
        prog.wall = now()
        dsp.save_checkpoint(engine, teacher, ckpt, tag, prog.__dict__)

    def sync_clock() -> float:
        # CUDA runs ahead of Python: wait for queued work so phase times are not misattributed.
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def run_eval() -> None:
        start = sync_clock()
        prog.val_loss = evaluate(engine, val_ds, args.eval_samples, micro, comm, device)
        prog.eval_time += sync_clock() - start
        metrics.log({"type": "eval", "step": prog.step, "time": now(), "val_loss": prog.val_loss,
                     "eval_time": prog.eval_time,
                     "tokens": prog.tokens})
        bar.set_postfix(val=f"{prog.val_loss:.4f}")

    window: list[np.ndarray] = []  # this rank's free scores since the last train record
    pending = DeviceScores()
    if prog.step == 0:
        run_eval()
    stopped = False
    for p in range(prog.pass_index, args.epochs):
        resuming = p == prog.pass_index and prog.samples_in_pass > 0
        t_teacher = sync_clock()
        pool = teacher.pool_ids(p)
        if pool is not None and not resuming:
            score_pool(engine, train_ds, pool, teacher, probe, micro, comm, device, prog.step)
        pending.flush(teacher, window)
        selection, summary = teacher.begin_pass(p)
        prog.teacher_time += sync_clock() - t_teacher
        if not resuming:
            # Skipped by the teacher: what a full pass would have trained, minus the selection.
            prog.skipped += teacher.full_pass_size - len(selection.ids)
        if summary is not None:
            if comm.rank == 0:
                bar.write(summary.line())
            metrics.log({"type": "selection", "step": prog.step, "time": now(), "pass": p,
                         "kind": summary.kind, "ratio": summary.ratio,
                         "selected": summary.selected, "skipped": summary.skipped,
                         "invalid": summary.invalid, "unscored": summary.unscored,
                         "q10": summary.score_quantiles[0], "q50": summary.score_quantiles[1],
                         "q90": summary.score_quantiles[2],
                         "selected_mean": summary.selected_mean_score})
        elif not resuming:
            metrics.log({"type": "selection", "step": prog.step, "time": now(), "pass": p,
                         "kind": teacher.plan[p].kind, "ratio": teacher.plan[p].ratio,
                         "selected": len(selection.ids),
                         "skipped": teacher.full_pass_size - len(selection.ids)})
        if id_log and not resuming:
            id_log.write(json.dumps({"pass": p, "selection": selection.checksum,
                                     "size": len(selection.ids)}) + "\n")
        train_ds.set_pass(p, selection.ids, prog.samples_in_pass)
        loader = DataLoader(train_ds, batch_size=micro, num_workers=args.workers)
        for batch in loader:
            ids = batch["id"].numpy()
            tokens = batch["tokens"].to(device=device, dtype=torch.long)
            ce, scores = forward_scores(engine, tokens, teacher, probe,
                                         score=teacher.wants_free_scores())
            per_example = ce.mean(dim=1)
            w = teacher.weights_for(ids)
            if w is not None:
                per_example = per_example * torch.as_tensor(w, device=device, dtype=ce.dtype)
            loss = per_example.mean()
            engine.backward(loss)
            engine.step()
            if teacher.wants_free_scores():
                pending.add(ids, scores, prog.step)
            if id_log:
                id_log.write(json.dumps({"pass": p, "step": prog.step, "ids": ids.tolist()}) + "\n")
            prog.samples_in_pass += micro * comm.world
            prog.samples += micro * comm.world
            prog.tokens += micro * comm.world * tokens.shape[1]
            if (prog.samples_in_pass // (micro * comm.world)) % gas:
                continue  # inside a gradient-accumulation window: no optimizer step yet
            prog.step += 1
            bar.update(1)
            if prog.step % 10 == 0 or prog.step == planned:
                record = {"type": "train", "step": prog.step, "time": now(),
                          "loss": loss.item(), "lr": engine.get_lr()[0],
                          "tokens": prog.tokens, "samples": prog.samples}
                pending.flush(teacher, window)
                if window:
                    q = np.nanquantile(np.concatenate(window), [0.1, 0.5, 0.9])
                    record.update(score_q10=float(q[0]), score_q50=float(q[1]),
                                  score_q90=float(q[2]))
                    window.clear()
                metrics.log(record)
                bar.set_postfix(loss=f"{loss.item():.3f}", p=p)
            if args.eval_every and prog.step % args.eval_every == 0:
                run_eval()
            if args.save_every and prog.step % args.save_every == 0:
                checkpoint(f"step{prog.step}")
            if args.stop_after and prog.step >= args.stop_after:
                stopped = True
                break
            if prog.step >= planned:
                break  # budget reached (only before the planned end with --budget-fraction)
        if stopped:
            if prog.samples_in_pass >= len(selection.ids):
                prog.pass_index, prog.samples_in_pass = p + 1, 0
            else:
                prog.pass_index = p
            checkpoint(f"step{prog.step}")
            print0(f"stopped after step {prog.step} (--stop-after); resume with the same command")
            break
        if prog.step >= planned:
            break
        prog.pass_index, prog.samples_in_pass = p + 1, 0
    bar.close()
    if id_log:
        id_log.close()
    if stopped:
        metrics.close()
        return 0

    if args.eval_every == 0 or prog.step % args.eval_every:
        run_eval()
    wall = now()
    summary_rows = {
        "teacher": "on" if attent else "off (plain DeepSpeed)",
        "optimizer steps": prog.step,
        "tokens trained": prog.tokens,
        "examples trained": prog.samples,
        "examples skipped by the teacher": prog.skipped,
        "wall time (s)": f"{wall:.1f}",
        "teacher time (s)": f"{prog.teacher_time:.2f}",
        "evaluation time (s)": f"{prog.eval_time:.2f}",
        "training tokens/s": f"{prog.tokens / max(wall - prog.eval_time - prog.teacher_time, 1e-9):.0f}",
        "peak GPU memory (GiB)": (f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"
                                  if device.type == "cuda" else "n/a (CPU)"),
        "final validation loss": f"{prog.val_loss:.4f}",
    }
    metrics.log({"type": "summary", "time": wall, **{k.replace(" ", "_"): v
                                                     for k, v in summary_rows.items()}})
    metrics.close()
    if comm.rank == 0:
        print(format_summary(summary_rows))
        if not args.no_plot:
            plot_metrics(out / "metrics.jsonl", out / "metrics.png",
                         title=f"{args.model} on {meta['num_train']} sequences")
            print(f"metrics: {out / 'metrics.jsonl'}  plot: {out / 'metrics.png'}")
    if args.save_every:
        checkpoint("final")
    return 0


if __name__ == "__main__":
    sys.exit(main())
