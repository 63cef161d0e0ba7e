"""What the DeepSpeed loop (pretrain.py) and the FSDP2 loop (pretrain_fsdp.py) share.

Both jobs open the same corpus, probe and teacher, and keep the same books: progress, clocks,
metrics, the id log, the progress bar and the free scores waiting on the device. Only the engine
differs, so forward, backward, optimizer step and checkpoint format stay in each job's own loop,
and this module does everything around them:

    run = Run(args, out, comm, teacher, prog, planned, device, model, val_ds, micro, save)
    for p in run.passes():
        selection = run.begin_pass(p, train_ds, probe)
        for batch in loader:
            ... forward, backward, step (the job's own) ...
            run.trained(p, ids, scores, tokens)
            if run.window_closed() and run.stepped(p, loss, lr):
                break
        if run.end_pass(p, selection):
            break
    run.finish(label, title)
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .pretrain import (DeviceScores, Progress, _single_process_env, check_corpus, evaluate,
                       prepare_data, print0, score_pool)


def start_job(args, job: str):
    """(the config without its "attent" section, the teacher's config or None), checked before
    any process group exists, so a bad file or option stops every rank alone with the key named."""
    from .config import ConfigError, split_deepspeed_config
    from .streaming_data import adopt_launcher_env, check_remote
    if not 0.0 < args.budget_fraction <= 1.0:
        raise SystemExit(f"--budget-fraction must be in (0, 1], got {args.budget_fraction}")
    try:
        raw_config, attent = split_deepspeed_config(args.deepspeed_config)
    except (ConfigError, OSError) as exc:
        raise SystemExit(f"{job}: {args.deepspeed_config}: {exc}") from None
    _single_process_env()
    adopt_launcher_env()
    if args.remote:
        try:
            check_remote(args.remote)
        except ValueError as exc:
            raise SystemExit(f"{job}: --remote: {exc}") from None
    return raw_config, None if args.no_teacher else attent


def local_device() -> torch.device:
    """This rank's GPU (made current before any collective exists), or the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    if "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a CPU must not oversubscribe it: spinning OpenMP threads of two
        # processes on the same cores slow each step down many times over.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.device("cpu")


def open_data(args, comm, micro: int):
    """(meta, train_ds, val_ds): the prepared corpus (built or fetched first) and its readers."""
    from streaming import StreamingDataset

    from .streaming_data import SubsetStreamingDataset, clean_shared_memory
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
    val_ds = StreamingDataset(local=str(Path(args.data) / "val"), remote=remote("val"),
                              batch_size=micro, shuffle=False)
    return meta, train_ds, val_ds


def make_probe(model, attent):
    """The forward hooks a signal needs (attention importance, per-example gradients), or None."""
    if attent is not None and attent.signal == "attention_fgrad":
        from .attention import AttentionImportance
        return AttentionImportance(model, attent.attention.layers, attent.attention.query_chunk)
    if attent is not None and attent.signal == "grad_norm":
        from .grad_norm import GradNormProbe
        return GradNormProbe.from_config(model, attent.grad_norm)
    return None


def refuse_foreign_checkpoint(job: str, saved: dict, meta: dict, ckpt: Path, data: str) -> None:
    """Stops before anything loads: another corpus's scores and selection index other examples."""
    if saved["fingerprint"] != meta["fingerprint"]:
        raise SystemExit(f"{job}: the checkpoint in {ckpt} was made on another dataset (its "
                         f"fingerprint {saved['fingerprint'][:12]}, --data {data} has "
                         f"{meta['fingerprint'][:12]}); use another --out, the original --data, "
                         "or pass --no-resume")


def weighted_loss(ce: torch.Tensor, ids: np.ndarray, teacher) -> torch.Tensor:
    """The batch loss: the mean of per-example mean token losses, each example weighted by the
    teacher where its selection rescales (soft selection with ``rescale``), else plain."""
    per_example = ce.mean(dim=1)
    w = teacher.weights_for(ids)
    if w is not None:
        per_example = per_example * torch.as_tensor(w, device=ce.device, dtype=ce.dtype)
    return per_example.mean()


class Run:
    """Progress, clocks, logs and pass bookkeeping of one pretraining job (see the module doc).

    ``model`` is what evaluation and pool scoring call (the DeepSpeed engine, or the FSDP2
    module); ``save(tag)`` writes a checkpoint in the job's own format with ``prog`` as its state.
    """

    def __init__(self, args, out: Path, comm, teacher, prog: Progress, planned: int, device,
                 model, val_ds, micro: int, save: Callable[[str], None]):
        from tqdm import tqdm

        from .report import MetricsLogger
        self.args, self.out, self.comm, self.teacher = args, out, comm, teacher
        self.prog, self.planned, self.device = prog, planned, device
        self.model, self.val_ds, self.micro, self._save = model, val_ds, micro, save
        self.per_micro = micro * comm.world  # samples the whole group trains per micro batch
        self.gas = teacher.global_batch // self.per_micro
        self.metrics = MetricsLogger(out / "metrics.jsonl" if comm.rank == 0 else None)
        # Line-buffered: a killed job's log still holds every step it trained (crash tests
        # rely on it).
        self.id_log = (open(out / f"ids.rank{comm.rank}.jsonl", "a", buffering=1)
                       if args.log_ids else None)
        self._t0 = time.perf_counter() - prog.wall
        # In a log file (not a terminal) redraw rarely, so the log stays readable.
        self.bar = tqdm(total=planned, initial=prog.step, disable=comm.rank != 0, desc="train",
                        dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15)
        self.window: list[np.ndarray] = []  # this rank's free scores since the last train record
        self.pending = DeviceScores()
        self.stopped = False

    # -- clocks -----------------------------------------------------------------------------
    def now(self) -> float:
        return time.perf_counter() - self._t0

    def sync_clock(self) -> float:
        # CUDA runs ahead of Python: wait for queued work so phase times are not misattributed.
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    # -- evaluation and checkpoints ---------------------------------------------------------
    def evaluate(self) -> None:
        prog = self.prog
        start = self.sync_clock()
        prog.val_loss = evaluate(self.model, self.val_ds, self.args.eval_samples, self.micro,
                                 self.comm, self.device)
        prog.eval_time += self.sync_clock() - start
        self.metrics.log({"type": "eval", "step": prog.step, "time": self.now(),
                          "val_loss": prog.val_loss, "eval_time": prog.eval_time,
                          "tokens": prog.tokens})
        self.bar.set_postfix(val=f"{prog.val_loss:.4f}")

    def checkpoint(self, tag: str) -> None:
        self.pending.flush(self.teacher, self.window)
        self.prog.wall = self.now()
        self._save(tag)

    # -- passes -----------------------------------------------------------------------------
    def passes(self) -> Iterator[int]:
        """The passes still to train; the first evaluation happens before a fresh run's first."""
        if self.prog.step == 0:
            self.evaluate()
        yield from range(self.prog.pass_index, self.args.epochs)

    def begin_pass(self, p: int, train_ds, probe):
        """The teacher's turn (pool scoring, then the same selection on every rank); sets the
        streaming dataset to the selection, from where a resumed pass left off."""
        prog, teacher = self.prog, self.teacher
        resuming = p == prog.pass_index and prog.samples_in_pass > 0
        t_teacher = self.sync_clock()
        pool = teacher.pool_ids(p)
        if pool is not None and not resuming:
            score_pool(self.model, train_ds, pool, teacher, probe, self.micro, self.comm,
                       self.device, prog.step)
        self.pending.flush(teacher, self.window)
        selection, summary = teacher.begin_pass(p)
        prog.teacher_time += self.sync_clock() - t_teacher
        skipped = teacher.full_pass_size - len(selection.ids)
        if not resuming:
            prog.skipped += skipped  # what a full pass would have trained, minus the selection
        if summary is not None:
            if self.comm.rank == 0:
                self.bar.write(summary.line())
            q10, q50, q90 = summary.score_quantiles
            self.metrics.log({"type": "selection", "step": prog.step, "time": self.now(),
                              "pass": p, "kind": summary.kind, "ratio": summary.ratio,
                              "selected": summary.selected, "skipped": summary.skipped,
                              "invalid": summary.invalid, "unscored": summary.unscored,
                              "q10": q10, "q50": q50, "q90": q90,
                              "selected_mean": summary.selected_mean_score})
        elif not resuming:
            self.metrics.log({"type": "selection", "step": prog.step, "time": self.now(),
                              "pass": p, "kind": teacher.plan[p].kind,
                              "ratio": teacher.plan[p].ratio, "selected": len(selection.ids),
                              "skipped": skipped})
        if self.id_log and not resuming:
            self.id_log.write(json.dumps({"pass": p, "selection": selection.checksum,
                                          "size": len(selection.ids)}) + "\n")
        train_ds.set_pass(p, selection.ids, prog.samples_in_pass)
        return selection

    def last_micro(self) -> bool:
        """Whether the micro batch about to train closes a gradient-accumulation window."""
        return (self.prog.samples_in_pass // self.per_micro + 1) % self.gas == 0

    def trained(self, p: int, ids: np.ndarray, scores, tokens: torch.Tensor) -> None:
        """Books one micro batch every rank has trained (its free scores wait on the device)."""
        prog = self.prog
        if self.teacher.wants_free_scores():
            self.pending.add(ids, scores, prog.step)
        if self.id_log:
            self.id_log.write(json.dumps({"pass": p, "step": prog.step,
                                          "ids": ids.tolist()}) + "\n")
        prog.samples_in_pass += self.per_micro
        prog.samples += self.per_micro
        prog.tokens += self.per_micro * tokens.shape[1]

    def window_closed(self) -> bool:
        """After ``trained``: whether that micro batch ended an accumulation window."""
        return (self.prog.samples_in_pass // self.per_micro) % self.gas == 0

    def stepped(self, p: int, loss: torch.Tensor, lr: float) -> bool:
        """Books one optimizer step: logs, evaluation, checkpoint. True: leave the pass (the
        --stop-after point or the step budget is reached)."""
        prog, args = self.prog, self.args
        prog.step += 1
        self.bar.update(1)
        if prog.step % 10 == 0 or prog.step == self.planned:
            record = {"type": "train", "step": prog.step, "time": self.now(),
                      "loss": loss.item(), "lr": lr, "tokens": prog.tokens,
                      "samples": prog.samples}
            self.pending.flush(self.teacher, self.window)
            if self.window:
                q = np.nanquantile(np.concatenate(self.window), [0.1, 0.5, 0.9])
                record.update(score_q10=float(q[0]), score_q50=float(q[1]),
                              score_q90=float(q[2]))
                self.window.clear()
            self.metrics.log(record)
            self.bar.set_postfix(loss=f"{loss.item():.3f}", p=p)
        if args.eval_every and prog.step % args.eval_every == 0:
            self.evaluate()
        if args.save_every and prog.step % args.save_every == 0:
            self.checkpoint(f"step{prog.step}")
        if args.stop_after and prog.step >= args.stop_after:
            self.stopped = True
            return True
        return prog.step >= self.planned  # before the planned end only with --budget-fraction

    def end_pass(self, p: int, selection) -> bool:
        """After a pass's loop. True: the run leaves its pass loop (stopped, or budget spent)."""
        prog = self.prog
        if self.stopped:
            if prog.samples_in_pass >= len(selection.ids):
                prog.pass_index, prog.samples_in_pass = p + 1, 0
            else:
                prog.pass_index = p
            self.checkpoint(f"step{prog.step}")
            print0(f"stopped after step {prog.step} (--stop-after); resume with the same command")
            return True
        if prog.step >= self.planned:
            return True
        prog.pass_index, prog.samples_in_pass = p + 1, 0
        return False

    def finish(self, teacher_off: str, title: str) -> None:
        """Closes the logs; unless stopped: final evaluation, summary table, plot, final save."""
        from .report import format_summary, plot_metrics
        prog, args = self.prog, self.args
        self.bar.close()
        if self.id_log:
            self.id_log.close()
        if self.stopped:
            self.metrics.close()
            return
        if args.eval_every == 0 or prog.step % args.eval_every:
            self.evaluate()
        wall = self.now()
        train_s = max(wall - prog.eval_time - prog.teacher_time, 1e-9)
        rows = {
            "teacher": "on" if self.teacher.enabled else teacher_off,
            "optimizer steps": prog.step,
            "tokens trained": prog.tokens,
            "examples trained": prog.samples,
            "examples skipped by the teacher": prog.skipped,
            "wall time (s)": f"{wall:.1f}",
            "teacher time (s)": f"{prog.teacher_time:.2f}",
            "evaluation time (s)": f"{prog.eval_time:.2f}",
            "training tokens/s": f"{prog.tokens / train_s:.0f}",
            "peak GPU memory (GiB)": (f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"
                                      if self.device.type == "cuda" else "n/a (CPU)"),
            "final validation loss": f"{prog.val_loss:.4f}",
        }
        self.metrics.log({"type": "summary", "time": wall,
                          **{k.replace(" ", "_"): v for k, v in rows.items()}})
        self.metrics.close()
        if self.comm.rank == 0:
            print(format_summary(rows))
            if not args.no_plot:
                plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png", title=title)
                print(f"metrics: {self.out / 'metrics.jsonl'}  plot: {self.out / 'metrics.png'}")
        if args.save_every:
            self.checkpoint("final")
