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

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .pretrain import (DeviceScores, Progress, _single_process_env, build_model, build_parser,
                       check_corpus, evaluate, forward_scores, prepare_data, print0, score_pool)


def parse_args(argv=None):
    p = build_parser()
    p.description = __doc__.split("\n")[0]
    p.set_defaults(deepspeed_config="configs/fsdp.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0.0 < args.budget_fraction <= 1.0:
        raise SystemExit(f"--budget-fraction must be in (0, 1], got {args.budget_fraction}")
    # -- config first: a bad section fails before the slow imports ---------------------------
    from .config import ConfigError, split_deepspeed_config
    try:
        raw_config, attent = split_deepspeed_config(args.deepspeed_config)
    except (ConfigError, OSError) as exc:
        raise SystemExit(f"attent-pretrain-fsdp: {args.deepspeed_config}: {exc}") from None
    if args.no_teacher:
        attent = None
    _single_process_env()
    from . import fsdp_plugin as fsp
    cuda = torch.cuda.is_available()
    try:
        tc = fsp.parse_train_config(raw_config, int(os.environ["WORLD_SIZE"]), cuda)
    except ConfigError as exc:
        raise SystemExit(f"attent-pretrain-fsdp: {args.deepspeed_config}: {exc}") from None
    from .streaming_data import adopt_launcher_env, check_remote
    adopt_launcher_env()
    if args.remote:
        try:
            check_remote(args.remote)
        except ValueError as exc:
            raise SystemExit(f"attent-pretrain-fsdp: --remote: {exc}") from None
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from .comm import make_comm
    from .report import MetricsLogger, format_summary, plot_metrics
    from .streaming_data import SubsetStreamingDataset, clean_shared_memory
    from .teacher import Teacher

    # -- distributed ----------------------------------------------------------------------------
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a CPU must not oversubscribe it (see pretrain.py).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    fsp.init_distributed(cuda)
    comm = make_comm()
    world = comm.world
    for note in tc.notes:
        print0(f"note: {note}")
    micro, global_batch, gas = tc.micro_batch, tc.global_batch, tc.grad_accum
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

    # -- model, teacher, sharding, optimizer --------------------------------------------------
    model = build_model(args.model, meta["vocab_size"], meta["seq_len"], args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    probe = None
    if attent is not None and attent.signal == "attention_fgrad":
        from .attention import AttentionImportance
        probe = AttentionImportance(model, attent.attention.layers, attent.attention.query_chunk)
    elif attent is not None and attent.signal == "grad_norm":
        from .grad_norm import GradNormProbe
        probe = GradNormProbe.from_config(model, attent.grad_norm)
    teacher = Teacher(attent, meta["num_train"], args.epochs, global_batch, comm,
                      data_seed=args.seed)
    planned = max(1, math.floor(teacher.planned_steps() * args.budget_fraction))
    model = fsp.shard(model.to(device), tc.bf16)
    optimizer, scheduler = fsp.build_optimizer(model, tc, planned)
    print0(f"model {args.model}: {n_params / 1e6:.2f}M parameters (FSDP2 over {world} ranks); "
           f"{meta['num_train']} train sequences of {meta['seq_len']} tokens; micro batch "
           f"{micro}, global batch {global_batch}; teacher {'on' if attent else 'off'}; planned "
           f"{planned} steps")

    prog = Progress(fingerprint=meta["fingerprint"], world=world)
    ckpt = out / "checkpoints"
    try:
        saved = None if args.no_resume else fsp.read_trainer_state(ckpt)
    except RuntimeError as exc:
        raise SystemExit(f"attent-pretrain-fsdp: {exc}") from None
    if saved is not None:
        # Refused before anything loads: its scores and selection index another dataset.
        if saved["fingerprint"] != meta["fingerprint"]:
            raise SystemExit(f"attent-pretrain-fsdp: the checkpoint in {ckpt} was made on another "
                             f"dataset (its fingerprint {saved['fingerprint'][:12]}, --data "
                             f"{args.data} has {meta['fingerprint'][:12]}); use another --out, "
                             "the original --data, or pass --no-resume")
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
    metrics = MetricsLogger(out / "metrics.jsonl" if comm.rank == 0 else None)
    # Line-buffered: a killed job's log still holds every step it trained.
    id_log = open(out / f"ids.rank{comm.rank}.jsonl", "a", buffering=1) if args.log_ids else None

    # -- train ----------------------------------------------------------------------------------
    t0 = time.perf_counter() - prog.wall
    now = lambda: time.perf_counter() - t0  # noqa: E731
    bar = tqdm(total=planned, initial=prog.step, disable=comm.rank != 0, desc="train",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15)

    def checkpoint(tag: str) -> None:
        pending.flush(teacher, window)
        prog.wall = now()
        fsp.save_checkpoint(model, optimizer, scheduler, teacher, ckpt, tag, prog.__dict__)

    def sync_clock() -> float:
        if cuda:  # CUDA runs ahead of Python: wait, so phase times are not misattributed
            torch.cuda.synchronize()
        return time.perf_counter()

    def run_eval() -> None:
        start = sync_clock()
        prog.val_loss = evaluate(model, val_ds, args.eval_samples, micro, comm, device)
        prog.eval_time += sync_clock() - start
        metrics.log({"type": "eval", "step": prog.step, "time": now(), "val_loss": prog.val_loss,
                     "eval_time": prog.eval_time, "tokens": prog.tokens})
        bar.set_postfix(val=f"{prog.val_loss:.4f}")

    window: list[np.ndarray] = []  # this rank's free scores since the last train record
    pending = DeviceScores()
    if prog.step == 0:
        run_eval()
    stopped = False
    for p in range(prog.pass_index, args.epochs):
        resuming = p == prog.pass_index and prog.samples_in_pass > 0
        # The teacher: pool scoring (lockstep forwards), then the same selection on every rank.
        t_teacher = sync_clock()
        pool = teacher.pool_ids(p)
        if pool is not None and not resuming:
            score_pool(model, train_ds, pool, teacher, probe, micro, comm, device, prog.step)
        pending.flush(teacher, window)
        selection, summary = teacher.begin_pass(p)
        prog.teacher_time += sync_clock() - t_teacher
        if not resuming:
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

        # The pass: streaming hands each rank the same number of micro batches of the selection.
        train_ds.set_pass(p, selection.ids, prog.samples_in_pass)
        for batch in DataLoader(train_ds, batch_size=micro, num_workers=args.workers):
            ids = batch["id"].numpy()
            tokens = batch["tokens"].to(device=device, dtype=torch.long)
            last_micro = (prog.samples_in_pass // (micro * world) + 1) % gas == 0
            # Inside an accumulation window gradients stay local (unsharded) and are
            # reduce-scattered once, on the window's last backward.
            model.set_requires_gradient_sync(last_micro)
            ce, scores = forward_scores(model, tokens, teacher, probe,
                                         score=teacher.wants_free_scores())
            per_example = ce.mean(dim=1)
            w = teacher.weights_for(ids)
            if w is not None:
                per_example = per_example * torch.as_tensor(w, device=device, dtype=ce.dtype)
            loss = per_example.mean()
            (loss / gas).backward()  # the mean over the window, as DeepSpeed's backward does
            if teacher.wants_free_scores():
                pending.add(ids, scores, prog.step)
            if id_log:
                id_log.write(json.dumps({"pass": p, "step": prog.step, "ids": ids.tolist()}) + "\n")
            prog.samples_in_pass += micro * world
            prog.samples += micro * world
            prog.tokens += micro * world * tokens.shape[1]
            if not last_micro:
                continue
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            prog.step += 1
            bar.update(1)
            if prog.step % 10 == 0 or prog.step == planned:
                record = {"type": "train", "step": prog.step, "time": now(),
                          "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
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
        fsp.shutdown()
        return 0

    if args.eval_every == 0 or prog.step % args.eval_every:
        run_eval()
    wall = now()
    summary_rows = {
        "teacher": "on" if attent else "off (plain FSDP2)",
        "optimizer steps": prog.step,
        "tokens trained": prog.tokens,
        "examples trained": prog.samples,
        "examples skipped by the teacher": prog.skipped,
        "wall time (s)": f"{wall:.1f}",
        "teacher time (s)": f"{prog.teacher_time:.2f}",
        "evaluation time (s)": f"{prog.eval_time:.2f}",
        "training tokens/s": f"{prog.tokens / max(wall - prog.eval_time - prog.teacher_time, 1e-9):.0f}",
        "peak GPU memory (GiB)": (f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"
                                  if cuda else "n/a (CPU)"),
        "final validation loss": f"{prog.val_loss:.4f}",
    }
    metrics.log({"type": "summary", "time": wall, **{k.replace(" ", "_"): v
                                                     for k, v in summary_rows.items()}})
    metrics.close()
    if comm.rank == 0:
        print(format_summary(summary_rows))
        if not args.no_plot:
            plot_metrics(out / "metrics.jsonl", out / "metrics.png",
                         title=f"{args.model} on {meta['num_train']} sequences (FSDP2)")
            print(f"metrics: {out / 'metrics.jsonl'}  plot: {out / 'metrics.png'}")
    if args.save_every:
        checkpoint("final")
    fsp.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
