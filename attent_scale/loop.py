"""What the DeepSpeed job (pretrain.py) and the FSDP2 job (pretrain_fsdp.py) share.

Both jobs take the same options, open the same corpus, model and teacher (:func:`open_job`), and
keep the same books (:class:`Run`): progress, clocks, metrics, the id log, the progress bar,
evaluation and pass bookkeeping. Only the engine differs, so forward, backward, optimizer step and
checkpoint format stay in each job's own loop::

    job = open_job(args, "attent-pretrain", micro, global_batch)
    ... build the engine, resume ...
    run = Run(job, prog, planned, model, save)
    for p in run.passes():
        run.begin_pass(p, pool_model)
        for batch in loader:
            ... forward (inside job.teaching.recording()), loss = teaching.update(...),
                backward, step (the job's own) ...
            run.trained(p, tokens)
            if run.window_closed() and run.stepped(p, loss, lr):
                break
        if run.end_pass(p):
            break
    run.finish(label, title)

The teacher reaches both loops only through the public :class:`~attent_scale.teaching.Teaching`,
exactly as a user's loop would.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from .model import MODEL_SHAPES
from .teaching import Teaching, print0

# Sized so the README's demo finishes in a few minutes on 2 CPU cores.
CORPUS_DEFAULTS = {"max_bytes": 1_000_000, "vocab_size": 1024, "seq_len": 64}


def build_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    """The options of both pretraining jobs."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--deepspeed_config", "--config", default=default_config,
                   help="DeepSpeed JSON; its 'attent' section switches the teacher on")
    p.add_argument("--no-teacher", action="store_true", help="ignore the 'attent' section")
    p.add_argument("--out", default="runs/demo", help="metrics, plot and checkpoints go here")
    p.add_argument("--data", default=".cache/stdlib-corpus",
                   help="a corpus directory: one attent-prepare wrote (built from the standard "
                        "library when missing), or MDS shards of your own in DIR/train and "
                        "DIR/val; with --remote, the local cache of the remote corpus")
    p.add_argument("--token-column", default=None,
                   help="MDS shards of your own: the column holding the token ids (default: "
                        "tokens, else input_ids)")
    p.add_argument("--remote", default=None,
                   help="a prepared corpus in an object store or another path (s3://bucket/dir): "
                        "streamed into --data as a cache instead of building one")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="source bytes read when building the corpus (default 1000000; 0 = all)")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer size (default 1024)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 64)")
    p.add_argument("--model", default="demo",
                   help=f"a named Llama shape: {', '.join(MODEL_SHAPES)} (ignored with "
                        "--model-config or --init-from)")
    p.add_argument("--model-config", default=None,
                   help="a transformers config.json (or its directory) of any causal LM, "
                        "trained from fresh weights")
    p.add_argument("--init-from", default=None,
                   help="a save_pretrained directory to continue pretraining from")
    p.add_argument("--loss-kernel", default="auto",
                   choices=["auto", "logits", "torch", "chunked", "compiled", "liger", "cce"],
                   help="how the training loss (and the teacher's scores) are computed: 'logits' "
                        "materialises [batch, seq, vocab] logits; the others are per-token losses "
                        "straight from the hidden states (attent_scale/fused_loss.py); 'auto': "
                        "the fastest fused kernel on a GPU, 'logits' on a CPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder block (pays a compile time at start)")
    p.add_argument("--reference-scores", default=None,
                   help="per-sample reference scores (.npy, one float per training sample) for "
                        "'score: reducible' (RHO-LOSS); see tools/reference_scores.py")
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
    p.add_argument("--shm-clean", action="store_true",
                   help="also unlink every other streaming shared-memory segment on this node at "
                        "start, live jobs' included (default: only those of ended attent jobs)")
    p.add_argument("--no-shm-clean", action="store_true",
                   help="leave all streaming shared memory on this node alone at start")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--log-ids", action="store_true",
                   help="write the sample ids each rank trains to out/ids.rank<R>.jsonl")
    p.add_argument("--no-plot", action="store_true", help="skip metrics.png at the end")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback behind an expected failure too (bad input, a damaged "
                        "checkpoint, a full disk), not only its one-line message")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


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
    # What the run was started with (checked on resume; None in older checkpoints).
    micro: Optional[int] = None
    passes: Optional[int] = None
    budget_fraction: Optional[float] = None
    canonical_nodes: Optional[int] = None   # streaming's sample order depends on it


# ---- failures ----------------------------------------------------------------------------------

def run_main(name: str, args, body: Callable[[], int]) -> int:
    """A job's ``main``: ``body()``, with every expected failure reported as one line.

    Expected failures are what a user can fix: the job's own refusals (``SystemExit`` with a
    message), a bad config, model, selection or teacher state, a damaged or unwritable checkpoint,
    a full or read-only disk. Each prints ``name: what, where, how to fix`` on stderr and returns
    exit code 1; ``--debug`` prints the traceback behind it first. Anything else is a bug (ours or
    a library's) and keeps its traceback. Exit code 2 stays what argparse and the output-directory
    lock use it for: the command itself was refused before it started.

    The process group ends here, once ``body``'s frames (the engine, the model, the data) are
    gone, not inside it: see :func:`attent_scale.comm.shutdown`.
    """
    try:
        code = body()
    except (SystemExit, Exception) as exc:
        line = expected_failure(exc)
        if line is None:
            raise
        if getattr(args, "debug", False):
            import traceback
            exc.__suppress_context__ = False  # show what a `raise ... from None` hid
            traceback.print_exception(exc)
        if not line.startswith(f"{name}: "):
            line = f"{name}: {line}"
        from tqdm import tqdm
        tqdm.write(line, file=sys.stderr)  # on a line of its own, not after a progress bar's
        sys.stderr.flush()
        code = 1
    # Past the except block: the exception and the frames its traceback held are released.
    from .comm import shutdown
    try:
        shutdown()
    except Exception:  # noqa: BLE001 - after a failure a peer may be gone; the line is what matters
        if code == 0:
            raise
    return code


def expected_failure(exc: BaseException) -> Optional[str]:
    """The one-line message of an expected failure, or None for a bug."""
    import errno

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .model import ModelError
    from .policy import SelectionError
    from .teacher_state import TeacherStateError
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, str) else None
    if isinstance(exc, (ConfigError, ModelError, SelectionError, TeacherStateError,
                        CheckpointError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk is full: cannot write {exc.filename or 'a file'} ({exc.strerror}); "
                "fix: free space there (or use an --out on a larger disk), then run the same "
                "command again: it resumes from the last complete checkpoint")
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"{exc.filename or 'a file'}: {exc.strerror}; fix: choose an --out (or --data) "
                "this user can write")
    return None


# ---- start-up ---------------------------------------------------------------------------------

def single_process_env() -> None:
    """Started without a launcher: describe a world of one so init_distributed needs no MPI."""
    if "RANK" in os.environ:
        return
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


def start_job(args, job: str):
    """(the config without its "attent" section, the teacher's config or None), checked before
    any process group exists, so a bad file or option stops every rank alone with the key named."""
    from .config import ConfigError, split_deepspeed_config
    from .schedules import require_plan
    from .streaming_data import adopt_launcher_env, check_remote
    if not 0.0 < args.budget_fraction <= 1.0:
        raise SystemExit(f"--budget-fraction must be in (0, 1], got {args.budget_fraction}")
    if args.seed < 0:
        raise SystemExit(f"{job}: --seed: got {args.seed}; allowed: an integer >= 0")
    if args.epochs < 1:
        # Before the config: without the teacher nothing else would stop a run that trains nothing.
        raise SystemExit(f"{job}: --epochs: got {args.epochs}; allowed: an integer >= 1 (the "
                         "passes over the training data)")
    try:
        raw_config, attent = split_deepspeed_config(args.deepspeed_config)
        # A plan that never selects (warm-up past the last pass) stops here.
        require_plan(None if args.no_teacher else attent, args.epochs)
    except ConfigError as exc:
        # The file's own errors already begin with its path.
        where = str(args.deepspeed_config)
        msg = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
        raise SystemExit(f"{job}: {msg}") from None
    except OSError as exc:
        raise SystemExit(f"{job}: --deepspeed_config {args.deepspeed_config}: {exc.strerror}; "
                         "give a DeepSpeed JSON config, e.g. configs/zero1.json") from None
    single_process_env()
    adopt_launcher_env()
    from .startup import quiet_known_warnings
    quiet_known_warnings()  # before DeepSpeed is imported: it warns while it is imported
    if args.remote:
        try:
            check_remote(args.remote)
            require_bucket(args.remote)
        except ValueError as exc:
            raise SystemExit(f"{job}: --remote: {exc}") from None
    return raw_config, None if args.no_teacher else attent


# Object stores whose URLs name a bucket (or container, or host) before the path.
_BUCKET_SCHEMES = ("s3", "gs", "oci", "azure", "azure-dl", "sftp")


def require_bucket(remote: str) -> None:
    """``s3://`` alone (or ``s3:///dir``) names no bucket; boto would fail much later, inside a
    download, with a regular expression for a message."""
    from urllib.parse import urlsplit
    parts = urlsplit(remote)
    if parts.scheme in _BUCKET_SCHEMES and not parts.netloc:
        raise ValueError(f"{parts.scheme}:// names no bucket; give {parts.scheme}://BUCKET/PATH, "
                         "the directory attent-prepare's corpus was uploaded to")


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


# ---- data ---------------------------------------------------------------------------------------

def prepare_data(args, comm, name: str = "attent-pretrain") -> dict:
    """The corpus in --data: one attent-prepare wrote, or MDS shards of your own (DIR/train and
    DIR/val, schema-checked); built from the standard library (rank 0, others wait) when the
    directory holds neither.

    Corpus options left unset take the existing corpus's values (or the defaults when building);
    options set explicitly must match an existing corpus.
    """
    from .corpus import open_corpus
    from .data import prepare_corpus
    root = Path(args.data)
    wanted = {k: getattr(args, k) for k in CORPUS_DEFAULTS if getattr(args, k) is not None}
    if root.exists() and not root.is_dir():
        raise SystemExit(f"{name}: --data {root} is a file; give a corpus directory "
                         "(attent-prepare --out DIR) or a new directory to build one in")
    if args.remote:
        fetch_meta(args.remote, root, comm, name)
    if (root / "meta.json").exists() or (root / "train" / "index.json").exists():
        try:
            meta = open_corpus(root, args.token_column)
        except ValueError as exc:
            raise SystemExit(f"{name}: --data {root}: {exc}") from None
        if meta.get("format") == "mds-external":
            if meta["vocab_size"] is None:
                meta["vocab_size"] = args.vocab_size  # the model's embedding size, if given
            return meta
        clash = {k: (v, meta.get(k)) for k, v in wanted.items()
                 if (v or None) != meta.get(k)}
        if clash:
            raise SystemExit(f"{name}: --data {root} holds a corpus built with other settings: " +
                             ", ".join(f"--{k.replace('_', '-')} {v} vs corpus {m}"
                                       for k, (v, m) in clash.items()) +
                             "; drop these options or choose another --data directory")
        return meta
    if root.is_dir() and any(root.iterdir()):
        raise SystemExit(f"{name}: --data {root} is neither a prepared corpus (no "
                         "meta.json) nor MDS shards (no train/index.json); give a corpus "
                         "directory, or an empty or new one to build the standard-library "
                         "corpus in")
    opts = {**CORPUS_DEFAULTS, **wanted}
    if comm.rank == 0:
        prepare_corpus(root, seq_len=opts["seq_len"], vocab_size=opts["vocab_size"],
                       max_bytes=opts["max_bytes"] or None)
    comm.barrier()
    return open_corpus(root)


def fetch_meta(remote: str, root: Path, comm, name: str) -> None:
    """Collective: each node's local rank 0 fetches the remote corpus's meta.json into ``root``
    (the shards stream in on demand later); every rank stops when one of them could not."""
    from urllib.parse import urlsplit

    from .streaming_data import fetch_file
    error = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not (root / "meta.json").exists():
        url = f"{remote.rstrip('/')}/meta.json"
        try:
            fetch_file(url, root / "meta.json")
        except Exception as exc:  # noqa: BLE001 - every store's client has its own exceptions
            # The query of a URL can carry a signature: never echo it.
            shown = urlsplit(url)._replace(query="", fragment="").geturl()
            why = (str(exc).strip().splitlines() or [""])[0][:300]
            error = (f"{name}: --remote {remote}: cannot fetch {shown} ({type(exc).__name__}: "
                     f"{why}); check the URL and the store's credentials, which come from the "
                     "environment (for s3://: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
                     "~/.aws/credentials, and S3_ENDPOINT_URL for a store other than AWS)")
    # Ranks that fetched nothing must not wait for a file that will never come.
    if comm.max_int(int(error is not None)):
        raise SystemExit(error or 1)


def check_corpus(root: Path, meta: dict, remote: bool, name: str = "attent-pretrain") -> None:
    """Refuse, before any training, a corpus that would train on wrong or unreadable data.

    Every rank runs the same checks on the same files, so every rank stops with the same error
    (no rank is left waiting in a collective).
    """
    from .corpus import verify_split
    from .corpus_tokenizer import corpus_tokenizer_size
    try:
        # With a remote, absent shards stream in later and streaming validates them on download;
        # so does index.json itself while the cache is still empty.
        for split, n in (("train", meta["num_train"]), ("val", meta["num_val"])):
            if remote and not (root / split / "index.json").exists():
                continue
            verify_split(root / split, n, allow_missing=remote)
    except ValueError as exc:
        raise SystemExit(f"{name}: --data {root}: {exc}") from None
    if meta.get("tokenizer") and meta.get("vocab_size") is not None:
        try:
            pieces = corpus_tokenizer_size(root)
        except FileNotFoundError:
            return  # a remote corpus whose tokenizer stays remote: its meta is checked
        if pieces > meta["vocab_size"]:
            # Token ids >= the embedding size would index past it: a crash on CPU, silent garbage
            # or a device assert on GPU.
            raise SystemExit(f"{name}: --data {root}: the tokenizer has {pieces} pieces "
                             f"but meta.json's vocab_size (the model's embedding size) is "
                             f"{meta['vocab_size']}; prepare the corpus again so they agree")


def open_data(args, comm, micro: int, canonical_nodes: Optional[int] = None,
              name: str = "attent-pretrain"):
    """(meta, train_ds, val_ds): the prepared corpus (built or fetched first) and its readers.

    ``canonical_nodes``: streaming's sample order depends on it; a resume passes the checkpoint's
    so that a run continued on another node count trains the same samples in the same order.
    """
    from streaming import StreamingDataset

    from .streaming_data import SubsetStreamingDataset, shared_memory_session
    meta = prepare_data(args, comm, name)
    check_corpus(Path(args.data), meta, remote=bool(args.remote), name=name)
    remote = (lambda split: f"{args.remote.rstrip('/')}/{split}") if args.remote else \
        (lambda split: None)
    extra = {} if canonical_nodes is None else {"num_canonical_nodes": canonical_nodes}
    # Other jobs on this node keep their shared memory (see streaming_data.py).
    clean = "none" if args.no_shm_clean else "all" if args.shm_clean else "ended"
    with shared_memory_session(comm, clean) as track:  # collective
        train_ds = track(SubsetStreamingDataset(local=str(Path(args.data) / "train"),
                                                remote=remote("train"), batch_size=micro,
                                                shuffle_seed=args.seed, **extra))
        val_ds = track(StreamingDataset(local=str(Path(args.data) / "val"), remote=remote("val"),
                                        batch_size=micro, shuffle=False))
    return meta, train_ds, val_ds


def read_reference(path: Optional[str], num_samples: int) -> Optional[np.ndarray]:
    """``--reference-scores``: one float per training sample, or a clear refusal."""
    if path is None:
        return None
    try:
        ref = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"attent-pretrain: --reference-scores {path}: unreadable ({exc})")
    if ref.shape != (num_samples,) or not np.issubdtype(ref.dtype, np.floating):
        raise SystemExit(f"attent-pretrain: --reference-scores {path}: got {ref.dtype} "
                         f"{ref.shape}; allowed: floats of shape ({num_samples},), one per "
                         "training sample; fix: score this corpus with tools/reference_scores.py")
    return ref


def read_sources(train_ds, meta: dict) -> Optional[np.ndarray]:
    """Per-sample source ids of the training split, when the corpus records them.

    attent-prepare writes each source's samples as one block, in source order, and records the
    blocks' sizes: the ids then come from meta.json (checked at every block's two ends); MDS
    shards of your own are read sample by sample.
    """
    if len(meta.get("sources") or []) < 2:
        return None
    column = meta.get("source_column") or "source"
    n = train_ds.full_size

    def source_of(i: int) -> int:
        return int(train_ds.get_item(i)[column])

    counts = [inp.get("num_train") for inp in meta.get("inputs") or []]
    if counts and all(isinstance(c, int) for c in counts) and sum(counts) == n:
        ids = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        ends = np.cumsum([0, *counts])
        if all(source_of(i) == s for s, (lo, hi) in enumerate(zip(ends[:-1], ends[1:]))
               if hi > lo for i in (lo, hi - 1)):
            return ids
    return np.fromiter((source_of(i) for i in range(n)), dtype=np.int64, count=n)


# ---- the job ------------------------------------------------------------------------------------

@dataclass
class Job:
    """Everything both pretraining loops build the same way, in build order."""
    args: Any
    name: str
    comm: Any
    device: torch.device
    out: Path
    meta: dict
    train_ds: Any
    val_ds: Any
    model: torch.nn.Module
    teaching: Teaching
    micro: int
    planned: int
    ckpt: Path
    saved: Optional[dict]     # the trainer state of the checkpoint to resume, if any
    kernel: str = "logits"    # how training forwards compute their loss (--loss-kernel)

    @property
    def fresh_progress(self) -> Progress:
        return Progress(fingerprint=self.meta["fingerprint"], world=self.comm.world,
                        **run_identity(self.args, self.micro, self.train_ds))


def open_job(args, name: str, attent, micro: int, global_batch: int, comm, device) -> Job:
    """Data, teacher and model of a pretraining job, and the checkpoint it would resume.

    The teacher is built (and its config checked against the data) before the model, so a
    config that cannot work stops the job before the slow part; a checkpoint made with other
    settings is refused before anything loads.
    """
    from .checkpoint import read_trainer_state
    from .config import ConfigError
    from .model import ModelError, build_model
    from .runlock import lock_output_dir
    from .startup import release_shm_allreduce
    from .teacher import SelectionError
    out = make_out_dir(Path(args.out), name)
    release_shm_allreduce(comm)  # collective; first, so that even a refused job leaves nothing
    lock_output_dir(out, comm, name)  # collective: a second job on this --out stops, exit code 2
    ckpt = out / "checkpoints"
    try:
        saved = None if args.no_resume else read_trainer_state(ckpt)
        if saved is not None:
            saved = check_progress(saved, ckpt)
    except RuntimeError as exc:
        raise SystemExit(f"{name}: {exc}") from None
    meta, train_ds, val_ds = open_data(args, comm, micro,
                                       canonical_nodes=(saved or {}).get("canonical_nodes"),
                                       name=name)
    if meta["num_train"] < global_batch:
        # Said in the batch's own terms; the teacher would only see a ratio too large for it.
        gas = global_batch // (micro * comm.world)
        raise SystemExit(f"{name}: --data {args.data} has {meta['num_train']} training samples, "
                         f"fewer than one global batch of {global_batch} (micro batch {micro} x "
                         f"{comm.world} ranks x {gas} gradient accumulation steps); fix: lower "
                         "train_micro_batch_size_per_gpu"
                         + (" or gradient_accumulation_steps" if gas > 1 else "")
                         + f" in {args.deepspeed_config}, or use more data")
    try:
        teaching = Teaching(attent, meta["num_train"], args.epochs, global_batch, comm=comm,
                            data_seed=args.seed, announce=False, defer_model=True,
                            sources=read_sources(train_ds, meta) if _wants_sources(attent)
                            else None,
                            reference=read_reference(args.reference_scores, meta["num_train"]))
    except (ConfigError, SelectionError) as exc:
        raise SystemExit(f"{name}: {exc}") from None
    if saved is not None:
        check_resume(name, ckpt, saved, meta, teaching, args, micro, comm.world)
    try:
        model = build_model(args.model, meta["vocab_size"], meta["seq_len"], args.seed,
                            model_config=args.model_config, init_from=args.init_from)
        teaching.watch(model)
        kernel = loss_kernel(args.loss_kernel, model, attent, device)
    except (ModelError, ConfigError) as exc:
        raise SystemExit(f"{name}: {exc}") from None
    if args.compile:
        from .model import compile_blocks
        print0(f"torch.compile: {compile_blocks(model)} decoder blocks")
    planned = max(1, math.floor(teaching.planned_steps() * args.budget_fraction))
    return Job(args, name, comm, device, out, meta, train_ds, val_ds, model, teaching, micro,
               planned, ckpt, saved, kernel)


def make_out_dir(out: Path, name: str) -> Path:
    """``--out``, created if new; a file or a path this user cannot write stops the job."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{name}: --out {out} is a file; give a directory (a new one, or the "
                         "--out of the run to resume)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"{name}: --out {out}: cannot create it ({exc.strerror}); fix: choose "
                         "an --out on a filesystem this user can write") from None
    return out


def check_progress(saved: dict, ckpt: Path) -> dict:
    """The trainer state of a checkpoint (``trainer_state.json``), checked field by field
    against :class:`Progress` before any of it is used; returns it unchanged, or raises
    CheckpointError naming the file and the field."""
    from dataclasses import fields

    from .checkpoint import TRAINER_STATE, CheckpointError, latest_tag
    file = ckpt / str(latest_tag(ckpt)) / TRAINER_STATE

    def bad(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{file}: field '{field}': {problem}; the checkpoint is damaged "
                               f"or was edited; fix: point {ckpt / 'latest'} at an earlier tag, "
                               "or start fresh (--no-resume, or another --out)")

    if not isinstance(saved, dict):
        raise bad("(whole file)", f"a JSON object expected, got {type(saved).__name__}")
    known = {f.name for f in fields(Progress)}
    for key in saved:
        if key not in known:
            raise bad(key, "unknown (written by another attent-scale release?)")
    for key in ("step", "pass_index", "samples_in_pass", "fingerprint"):
        if key not in saved:
            raise bad(key, "missing")

    def number(v, integer: bool) -> bool:
        if integer:
            return type(v) is int
        return type(v) in (int, float) and math.isfinite(v)

    rules = {  # field: (integer, smallest, None allowed)
        "step": (True, 0, False), "pass_index": (True, 0, False),
        "samples_in_pass": (True, 0, False), "samples": (True, 0, False),
        "tokens": (True, 0, False), "skipped": (True, 0, False), "world": (True, 0, False),
        "micro": (True, 1, True), "passes": (True, 1, True), "canonical_nodes": (True, 1, True),
        "wall": (False, 0, False), "teacher_time": (False, 0, False),
        "eval_time": (False, 0, False), "val_loss": (False, None, True),
        "budget_fraction": (False, None, True),
    }
    for key, (integer, low, nullable) in rules.items():
        if key not in saved or (nullable and saved[key] is None):
            continue
        v = saved[key]
        kind = "an integer" if integer else "a finite number"
        if not number(v, integer) or (low is not None and v < low):
            bound = "" if low is None else f" >= {low}"
            raise bad(key, f"got {v!r}; allowed: {kind}{bound}")
    fraction = saved.get("budget_fraction")
    if fraction is not None and not 0 < fraction <= 1:
        raise bad("budget_fraction", f"got {fraction!r}; allowed: a number in (0, 1]")
    if not isinstance(saved["fingerprint"], str):
        raise bad("fingerprint", f"got {saved['fingerprint']!r}; allowed: a string")
    return saved


def loss_kernel(choice: str, model, attent, device) -> str:
    """The job's loss path: 'logits', or a fused kernel's name after enabling it on the model.

    A fused kernel never materialises the logits; the signals that need the output head's own
    forward (``grad_norm`` with the head among its layers) keep the logits path.
    """
    from .config import ConfigError
    from .fused_loss import FusedLossError, enable_token_losses
    if choice == "auto":
        if device.type != "cuda":
            return "logits"  # the fused kernels need CUDA; on a CPU the plain path is fastest
        if attent is not None and attent.signal == "grad_norm" and attent.grad_norm.include_head:
            print0("loss kernel: 'logits' (signal grad_norm hooks the output head's forward)")
            return "logits"
    if choice == "logits":
        return choice
    if attent is not None and attent.signal == "grad_norm" and attent.grad_norm.include_head:
        raise ConfigError(f"--loss-kernel {choice}: signal grad_norm with grad_norm.include_head "
                          "needs the output head's forward; fix: --loss-kernel logits, or "
                          "attent.grad_norm.include_head: false")
    try:
        enable_token_losses(model, choice)
    except FusedLossError as exc:
        if choice != "auto":
            raise ConfigError(f"--loss-kernel {choice}: {exc}") from None
        print0(f"loss kernel: 'logits' ({exc})")
        return "logits"
    return choice


def train_forward(model, ids, tokens: torch.Tensor, teaching: Teaching, kernel: str):
    """One micro batch's forward through ``model`` (the engine or the sharded module), the
    teacher's books, and the loss to backpropagate."""
    if kernel == "logits":
        with teaching.recording():
            logits = model(input_ids=tokens).logits
        return teaching.update(ids, logits=logits, labels=tokens)
    cfg = teaching.cfg
    fgrad = (teaching.wants_scores() and cfg.signal in ("fgrad_norm", "attention_fgrad"))
    with teaching.recording():
        out = model(input_ids=tokens, token_losses=True, fgrad=fgrad)
    return teaching.update(ids, token_losses=out.ce, labels=out.labels, fgrad_sq=out.fgrad_sq)


def run_identity(args, micro: int, train_ds) -> dict:
    """What a checkpoint records of the run beyond the teacher's own identity."""
    return {"micro": micro, "passes": args.epochs, "budget_fraction": args.budget_fraction,
            "canonical_nodes": int(train_ds.num_canonical_nodes)}


def check_resume(name: str, ckpt: Path, saved: dict, meta: dict, teaching: Teaching, args,
                 micro: int, world: int) -> None:
    """Refuse, before anything loads, a checkpoint this run cannot continue correctly.

    Another corpus (its fingerprint), or settings that change the plan or the selections: the
    teacher's identity (its config, the global batch, passes, pass sizes, data seed) and the
    job's own (micro batch, passes, budget). A different world size alone is an elastic resume,
    which re-plans (see :func:`resume_elastic`); that is the one change of the global batch let
    through.
    """
    from .teacher_state import change_kind
    fix = (f"resume with the original settings, or start fresh: another --out, or --no-resume "
           f"(which ignores {ckpt})")
    if saved["fingerprint"] != meta["fingerprint"]:
        # Another corpus's scores and selection index other examples.
        raise SystemExit(f"{name}: the checkpoint in {ckpt} was made on another dataset (its "
                         f"fingerprint {saved['fingerprint'][:12]}, --data {args.data} has "
                         f"{meta['fingerprint'][:12]}); use another --out, the original --data, "
                         "or pass --no-resume")
    changes = []
    for key, label, now in (("micro", "micro batch", micro), ("passes", "passes", args.epochs),
                            ("budget_fraction", "--budget-fraction", args.budget_fraction)):
        if key in saved and saved[key] != now:
            changes.append(f"{label}: {saved[key]} -> {now}")
    tag = (ckpt / "latest").read_text().strip()
    state_file = ckpt / tag / "attent_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{name}: {state_file} is missing or unreadable ({exc}); the "
                         f"checkpoint is damaged; {fix}") from None
    elastic = saved.get("world", 0) not in (0, world)
    for line in teaching.teacher.changes_since(state):
        kind = change_kind(line)
        if kind == "safe":
            continue
        if elastic and line.startswith(("global batch:", "pass sizes:")):
            continue  # the elastic resume re-plans these
        if line not in changes:  # "passes" is both the job's setting and the teacher's
            changes.append(line)
    if changes:
        raise SystemExit(f"{name}: the checkpoint in {ckpt} was made with other settings ("
                         + "; ".join(changes) + f"); {fix}")


def _wants_sources(attent) -> bool:
    return attent is not None and bool(getattr(attent.selection, "per_source", False))


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


# ---- the books ----------------------------------------------------------------------------------

class Run:
    """Progress, clocks, logs and pass bookkeeping of one pretraining job (see the module doc).

    ``model`` is what evaluation calls (the DeepSpeed engine, or the FSDP2 module); ``save(tag)``
    writes a checkpoint in the job's own format with ``prog`` as its state.
    """

    def __init__(self, job: Job, prog: Progress, planned: int, model,
                 save: Callable[[str], None], monitor=None):
        from tqdm import tqdm

        from .monitor import MonitorSink
        from .report import MetricsLogger
        self.job, self.args, self.out, self.comm = job, job.args, job.out, job.comm
        self.teaching = job.teaching
        self.prog, self.planned, self.device = prog, planned, job.device
        self.model, self.val_ds, self.micro, self._save = model, job.val_ds, job.micro, save
        self.per_micro = job.micro * job.comm.world  # samples the group trains per micro batch
        self.gas = self.teaching.global_batch // self.per_micro
        self.metrics = MetricsLogger(job.out / "metrics.jsonl" if job.comm.rank == 0 else None)
        # DeepSpeed's monitor sections of the config (TensorBoard, W&B, CSV), when enabled.
        self.sink = MonitorSink(monitor, job.meta.get("sources"))
        self.teaching.listeners.append(self._selected)
        self.teaching.last_scores = []  # the train records' score quantiles read them
        # Line-buffered: a killed job's log still holds every step it trained (crash tests
        # rely on it).
        self.id_log = (open(job.out / f"ids.rank{job.comm.rank}.jsonl", "a", buffering=1)
                       if self.args.log_ids else None)
        self._t0 = time.perf_counter() - prog.wall
        # In a log file (not a terminal) redraw rarely, so the log stays readable.
        self.bar = tqdm(total=planned, initial=prog.step, disable=job.comm.rank != 0,
                        desc="train", dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 15)
        self.stopped = False

    def log(self, record: dict) -> None:
        self.metrics.log(record)
        self.sink.log(record)

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
        from .scoring import evaluate
        prog = self.prog
        start = self.sync_clock()
        prog.val_loss = evaluate(self.model, self.val_ds, self.args.eval_samples, self.micro,
                                 self.comm, self.device, self.job.meta["token_column"])
        prog.eval_time += self.sync_clock() - start
        self.log({"type": "eval", "step": prog.step, "time": self.now(),
                  "val_loss": prog.val_loss, "eval_time": prog.eval_time, "tokens": prog.tokens})
        self.bar.set_postfix(val=f"{prog.val_loss:.4f}")

    def checkpoint(self, tag: str) -> None:
        from .checkpoint import saving
        t = self.teaching
        self.prog.pass_index, self.prog.samples_in_pass = t.pass_index, t.samples_done
        self.prog.wall = self.now()
        with saving(self.job.ckpt, tag):  # a full disk says so; `latest` stays where it was
            self._save(tag)

    # -- passes -----------------------------------------------------------------------------
    def passes(self) -> Iterator[int]:
        """The passes still to train; the first evaluation happens before a fresh run's first."""
        if self.prog.step == 0:
            self.evaluate()
        yield from range(self.teaching.pass_index, self.args.epochs)

    def _selected(self, record: dict) -> None:
        """The teacher began a pass (not a resumed one): count, print and log its decision."""
        self.prog.skipped += record["skipped"]
        if "line" in record and self.comm.rank == 0:
            self.bar.write(record["line"])
        self.log({**{k: v for k, v in record.items() if k not in ("line", "checksum")},
                  "step": self.prog.step, "time": self.now()})
        if self.id_log:
            self.id_log.write(json.dumps({"pass": record["pass"],
                                          "selection": record["checksum"],
                                          "size": record["selected"]}) + "\n")

    def begin_pass(self, p: int, pool_model=None):
        """The teacher's turn (pool scoring, then the same selection on every rank); sets the
        streaming dataset to the selection, from where a resumed pass left off."""
        from .scoring import pool_scorer
        t = self.teaching
        start = self.sync_clock()
        scorer = (pool_scorer(pool_model, self.job.train_ds, t, self.device,
                              self.job.meta["token_column"])
                  if pool_model is not None else None)
        selection = t.begin_pass(p, scorer, self.micro)
        self.prog.teacher_time += self.sync_clock() - start
        self.job.train_ds.set_pass(p, selection.ids, t.samples_done)
        return selection

    def last_micro(self) -> bool:
        """Whether the micro batch about to train closes a gradient-accumulation window."""
        return (self.teaching.samples_done // self.per_micro + 1) % self.gas == 0

    def trained(self, p: int, ids: np.ndarray, tokens: torch.Tensor) -> None:
        """Books one micro batch every rank has trained (after ``teaching.update``)."""
        prog = self.prog
        if self.id_log:
            self.id_log.write(json.dumps({"pass": p, "step": prog.step,
                                          "ids": np.asarray(ids).tolist()}) + "\n")
        prog.samples += self.per_micro
        prog.tokens += self.per_micro * tokens.shape[1]
        self._closed = self.teaching.pass_index != p or \
            (self.teaching.samples_done // self.per_micro) % self.gas == 0

    def window_closed(self) -> bool:
        """After ``trained``: whether that micro batch ended an accumulation window."""
        return self._closed

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
            self.teaching.flush()
            seen = self.teaching.last_scores
            if seen:
                q = np.nanquantile(np.concatenate(seen), [0.1, 0.5, 0.9])
                record.update(score_q10=float(q[0]), score_q50=float(q[1]),
                              score_q90=float(q[2]))
                seen.clear()
            self.log(record)
            self.bar.set_postfix(loss=f"{loss.item():.3f}", p=p)
        if args.eval_every and prog.step % args.eval_every == 0:
            self.evaluate()
        if args.save_every and prog.step % args.save_every == 0:
            self.checkpoint(f"step{prog.step}")
        if args.stop_after and prog.step >= args.stop_after:
            self.stopped = True
            return True
        return prog.step >= self.planned  # before the planned end only with --budget-fraction

    def end_pass(self, p: int) -> bool:
        """After a pass's loop. True: the run leaves its pass loop (stopped, or budget spent)."""
        if self.stopped:
            self.checkpoint(f"step{self.prog.step}")
            print0(f"stopped after step {self.prog.step} (--stop-after); resume with the same "
                   "command")
            return True
        return self.prog.step >= self.planned

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
            "teacher": "on" if self.teaching.enabled else teacher_off,
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
