"""Shared fixtures: a tiny prepared corpus and a runner for real multi-process training jobs."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A subprocess that runs past this is hung, not slow: a 2-core machine that also runs another
# job or test suite can take several times the usual 15-60 s for one tiny job.
HANG_TIMEOUT = 900

# DeepSpeed compiles its CPU ops with ninja into TORCH_EXTENSIONS_DIR (default: one directory for
# every environment of the user). A job or suite of another environment there (another torch,
# another ninja) takes the build for stale and compiles it again, for minutes each time, under the
# other's feet. So each environment gets its own cache; jobs the tests start inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(
    ROOT / ".cache" / "torch_extensions" / hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]))

# A private /dev/shm (and nothing else) in a mount namespace: jobs inside see only each other's
# shared memory, so a test can count what they leave, and other users' jobs on the machine can
# neither disturb them nor be disturbed. As root, or as a user mapped to root in a user namespace.
UNSHARE = ["unshare", "--mount", "--propagation", "private"] + \
    ([] if os.geteuid() == 0 else ["--map-root-user"])
PRIVATE_SHM = "mount -t tmpfs -o size=512m tmpfs /dev/shm"


def private_shm_or_skip() -> None:
    try:
        probe = subprocess.run([*UNSHARE, "sh", "-c", PRIVATE_SHM], capture_output=True,
                               text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("unshare (util-linux) is missing: the test needs a private /dev/shm")
    if probe.returncode != 0:
        pytest.skip("cannot mount a private /dev/shm in a mount namespace "
                    f"({probe.stderr.strip()}); run as root or enable user namespaces")


TINY_DS = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "steps_per_print": 1000000,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "torch_adam": True}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                             "warmup_type": "linear"}},
    "zero_optimization": {"stage": 1},
}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """~1.5k sequences of 32 tokens from a slice of the standard library."""
    from attent_scale.data import prepare_corpus
    root = tmp_path_factory.mktemp("corpus") / "tiny"
    prepare_corpus(root, seq_len=32, vocab_size=512, max_bytes=150_000, progress=False)
    return root


def load_tool(name: str):
    """A script of tools/ as a module: tools are not part of the package."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, stage: int = 1, attent: dict | None = None, **overrides) -> Path:
    cfg = json.loads(json.dumps(TINY_DS))
    cfg["zero_optimization"] = {"stage": stage}
    cfg.update(overrides)
    if attent is not None:
        cfg["attent"] = attent
    path.write_text(json.dumps(cfg))
    return path


def job_env() -> dict[str, str]:
    """The environment of a job the tests start: this checkout's package, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    return env


def job_command(config: Path, corpus: Path, out: Path, nproc: int = 2, extra: list[str] = (),
                launcher: str = "torchrun") -> tuple[list[str], dict[str, str]]:
    """(command, environment) of the real pretraining entry point with ``nproc`` CPU ranks."""
    args = ["--deepspeed_config", str(config), "--data", str(corpus), "--out", str(out),
            "--model", "tiny", "--seq-len", "32", "--vocab-size", "512", "--max-bytes", "150000",
            "--eval-samples", "32", "--eval-every", "0", "--log-ids", *extra]
    env = job_env()
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "attent_scale.pretrain", *args]
    elif launcher == "deepspeed":
        # The shipped launcher script; it finds the `deepspeed` launcher in VENV.
        env.update(NUM_GPUS=str(nproc), CONFIG=str(config), MASTER_PORT=str(free_port()),
                   VENV=sys.prefix)
        env.pop("DEEPSPEED", None)
        cmd = ["bash", str(ROOT / "launchers" / "deepspeed" / "pretrain.sh"), *args[2:]]
    else:
        cmd = [sys.executable, "-m", "attent_scale.pretrain", *args]
    return cmd, env


def run_job(config: Path, corpus: Path, out: Path, nproc: int = 2, extra: list[str] = (),
            timeout: int = HANG_TIMEOUT, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Run the real pretraining entry point with ``nproc`` CPU ranks over gloo."""
    cmd, env = job_command(config, corpus, out, nproc, extra, launcher)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"job failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_ids(out: Path, nproc: int) -> dict[int, dict]:
    """Per rank: {'passes': {pass: checksum}, 'trained': {pass: [ids in order]}}."""
    logs = {}
    for r in range(nproc):
        passes, trained = {}, {}
        for line in (out / f"ids.rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "selection" in rec:
                passes[rec["pass"]] = (rec["selection"], rec["size"])
            else:
                trained.setdefault(rec["pass"], []).extend(rec["ids"])
        logs[r] = {"passes": passes, "trained": trained}
    return logs


def assert_agree_and_exactly_once(logs: dict, num_ranks: int) -> list[int]:
    """Every pass: one selection on all ranks, and the ranks' trained ids split it exactly.

    Returns the passes checked. ``logs`` is what :func:`read_ids` returns.
    """
    import numpy as np

    from attent_scale.policy import selection_checksum
    passes = sorted(logs[0]["trained"])
    for p in passes:
        sums = {logs[r]["passes"][p] for r in range(num_ranks)}
        assert len(sums) == 1, f"pass {p}: ranks logged different selections {sums}"
        checksum, size = sums.pop()
        union = np.concatenate([logs[r]["trained"].get(p, []) for r in range(num_ranks)])
        assert len(union) == size, f"pass {p}: {len(union)} ids trained, {size} selected"
        assert len(np.unique(union)) == size, f"pass {p}: an id was trained twice"
        assert selection_checksum(np.sort(union), np.ones(size)) == checksum, \
            f"pass {p}: the trained ids are not the selected ones"
    return passes


# ---- fine-tuning fixtures: GSM8K-format problems, a tiny tokenizer and a tiny Llama ----------
NAMES = ["Tom", "Ana", "Li", "Sam", "Eva", "Omar", "Kim", "Raj"]
THINGS = ["apples", "books", "coins", "cards", "pens", "shells"]


def gsm8k_like(n: int, seed: int) -> list[dict]:
    """Word problems in GSM8K's format (question / answer ending in '#### N'), deterministic."""
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if rng.random() < 0.5:
            q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have?"
            ans = f"{name} has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} {thing}.\n#### {a + b}"
        else:
            q = f"{name} has {a + b} {thing} and gives away {b}. How many {thing} are left?"
            ans = f"{name} keeps {a + b}-{b} = <<{a + b}-{b}={a}>>{a} {thing}.\n#### {a}"
        out.append({"question": q, "answer": ans})
    return out


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory) -> Path:
    """train.jsonl (48 problems) and test.jsonl (8) in GSM8K's format."""
    root = tmp_path_factory.mktemp("gsm8k")
    for name, n, seed in (("train", 48, 0), ("test", 8, 1)):
        (root / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in gsm8k_like(n, seed)))
    return root


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory, gsm8k_dir) -> Path:
    """A from-scratch 2-layer Llama and a SentencePiece tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from attent_scale.data import BOS_ID, EOS_ID, PAD_ID, train_tokenizer
    from attent_scale.export import hf_tokenizer
    root = tmp_path_factory.mktemp("tiny_hf")
    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k_like(200, 2)]
    sp = root.parent / f"{root.name}.sp.model"
    sp.write_bytes(train_tokenizer(texts, 400, 0))
    hf_tokenizer(sp, 256).save_pretrained(str(root))
    cfg = LlamaConfig(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                      bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(root))
    sp.unlink()  # the model directory must stand on its own
    return root


@pytest.fixture(scope="session")
def gsm8k_tokenized(tmp_path_factory, gsm8k_dir, tiny_hf_model) -> Path:
    """The train problems through attent-instruct (datasets format), for the Trainer tests."""
    from attent_scale.instruct import build
    out = tmp_path_factory.mktemp("instruct") / "train"
    build(gsm8k_dir / "train.jsonl", tiny_hf_model, out, fmt="hf", max_len=128, progress=False)
    return out
