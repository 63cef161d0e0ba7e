"""Bad input gives one clear error before training, never a corrupt checkpoint or a wrong selection.

Config mistakes (ratio outside (0, 1], interval 0, unknown presets, unknown keys) are covered by
tests/test_config.py and budget/NaN cases by tests/test_teacher.py; docs/RELIABILITY.md maps each
case to its test. Here: corrupt or missing shards, an empty dataset, a tokenizer larger than the
model, strict types, a batch the world size does not divide, a checkpoint of another dataset, and
checkpoints that are not plain data.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attent_scale.config import ConfigError, parse_attent
from attent_scale.loop import check_corpus
from conftest import ROOT, free_port, run_job, write_config


@pytest.fixture
def corpus(tiny_corpus, tmp_path) -> Path:
    """A private copy of the tiny corpus, free to damage."""
    return Path(shutil.copytree(tiny_corpus, tmp_path / "corpus"))


def _meta(root: Path) -> dict:
    return json.loads((root / "meta.json").read_text())


def _shard(root: Path) -> Path:
    return sorted((root / "train").glob("shard.*.mds"))[0]


def _check(root: Path, remote: bool = False) -> str:
    with pytest.raises(SystemExit) as ei:
        check_corpus(root, _meta(root), remote=remote)
    return str(ei.value)


def test_intact_corpus_passes_and_shards_carry_hashes(corpus):
    check_corpus(corpus, _meta(corpus), remote=False)
    index = json.loads((corpus / "train" / "index.json").read_text())
    assert all("sha1" in s["raw_data"]["hashes"] for s in index["shards"])


def test_bit_flipped_shard_is_named_by_its_hash(corpus):
    shard = _shard(corpus)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    msg = _check(corpus)
    assert str(shard) in msg and "SHA-1" in msg and "prepare the corpus again" in msg


def test_truncated_shard(corpus):
    shard = _shard(corpus)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    msg = _check(corpus)
    assert str(shard) in msg and f"{size // 2} bytes, {size} expected" in msg


def test_missing_shard_is_an_error_locally_and_streamed_with_a_remote(corpus):
    shard = _shard(corpus)
    shard.unlink()
    msg = _check(corpus)
    assert str(shard) in msg and "missing" in msg
    # With --remote the cache starts empty: absent shards are fetched (and hash-checked) later.
    check_corpus(corpus, _meta(corpus), remote=True)


def test_empty_dataset(corpus):
    index = corpus / "train" / "index.json"
    index.write_text(json.dumps({"shards": [], "version": 2}))
    meta = _meta(corpus)
    meta["num_train"] = 0
    (corpus / "meta.json").write_text(json.dumps(meta))
    assert "no samples (an empty dataset)" in _check(corpus)


def test_shards_of_another_corpus(corpus):
    meta = _meta(corpus)
    meta["num_train"] += 8
    (corpus / "meta.json").write_text(json.dumps(meta))
    msg = _check(corpus)
    assert f"lists {meta['num_train'] - 8} samples but meta.json says {meta['num_train']}" in msg


def test_tokenizer_larger_than_the_model(corpus):
    meta = _meta(corpus)
    meta["vocab_size"] = 400  # the model's embedding; the tokenizer has 512 pieces
    (corpus / "meta.json").write_text(json.dumps(meta))
    msg = _check(corpus)
    assert "tokenizer has 512 pieces" in msg and "vocab_size (the model's embedding size) is 400" \
        in msg


@pytest.mark.parametrize("section,key,got", [
    ({"ratio": {"value": "0.5"}}, "attent.ratio.value", "'0.5'"),
    ({"enabled": "true"}, "attent.enabled", "'true'"),
    ({"interval": {"every": 1.5}}, "attent.interval.every", "1.5"),
    ({"seed": None}, "attent.seed", "None"),
])
def test_wrong_types_are_not_coerced(section, key, got):
    with pytest.raises(ConfigError) as ei:
        parse_attent(section)
    assert f"{key}: got {got}" in str(ei.value)


def test_world_size_must_divide_the_batch():
    from attent_scale.deepspeed_plugin import global_batch_size
    assert global_batch_size({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 32,
                              "gradient_accumulation_steps": 2}, 2) == (8, 32)
    with pytest.raises(ValueError, match="train_batch_size=25 is not divisible by the world size 2"):
        global_batch_size({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 25}, 2)
    with pytest.raises(ValueError, match=r"train_batch_size=24 != micro batch 8"):
        global_batch_size({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 24}, 2)
    # DeepSpeed derives the micro batch from train_batch_size alone; so do we.
    assert global_batch_size({"train_batch_size": 16}, 2) == (8, 16)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu must be set"):
        global_batch_size({"train_batch_size": 15}, 2)


def _launch(config: Path, corpus: Path, out: Path, nproc: int = 1, extra=()):
    """The real job (torchrun for several ranks); returns the finished process, failed or not."""
    args = ["-m", "attent_scale.pretrain", "--deepspeed_config", str(config), "--data",
            str(corpus), "--out", str(out), "--model", "tiny", "--eval-samples", "16",
            "--eval-every", "0", "--no-plot", "--log-ids", *extra]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)


def test_batch_not_divided_by_world_size_stops_every_rank_cleanly(tiny_corpus, tmp_path):
    cfg = write_config(tmp_path / "ds.json", attent={"preset": "attent-simple"},
                       train_batch_size=25)
    proc = _launch(cfg, tiny_corpus, tmp_path / "run", nproc=2)
    assert proc.returncode != 0
    # One line from each rank, no traceback out of the job (torchrun adds its own summary).
    assert proc.stderr.count("train_batch_size=25 is not divisible by the world size 2") == 2
    assert 'attent_scale/pretrain.py", line' not in proc.stderr
    assert not list((tmp_path / "run").glob("ids.rank*.jsonl")), "nothing may train"


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: stands for any code hidden in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_of_another_dataset_and_unsafe_checkpoints_are_refused(tiny_corpus, tmp_path):
    import torch

    cfg = write_config(tmp_path / "ds.json", attent={"preset": "attent-simple"})
    base = tmp_path / "base"
    common = ["--epochs", "2", "--no-plot"]
    run_job(cfg, tiny_corpus, base, nproc=1, launcher="python",
            extra=[*common, "--stop-after", "2"])
    tag = (base / "checkpoints" / "latest").read_text().strip()

    # Another dataset: same sizes, different content (its fingerprint differs).
    other = Path(shutil.copytree(tiny_corpus, tmp_path / "other"))
    meta = _meta(other)
    theirs = meta["fingerprint"]
    meta["fingerprint"] = "f" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    out = Path(shutil.copytree(base, tmp_path / "fp"))
    proc = _launch(cfg, other, out, extra=common)
    assert proc.returncode != 0
    assert "made on another dataset" in proc.stderr
    assert theirs[:12] in proc.stderr and "f" * 12 in proc.stderr and "--no-resume" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == tag, "checkpoint untouched"

    # A DeepSpeed file that would run code when unpickled: refused before DeepSpeed opens it.
    evil = Path(shutil.copytree(base, tmp_path / "evil"))
    marker = tmp_path / "code-ran"
    torch.save({"module": _Payload(marker)}, evil / "checkpoints" / tag /
               "mp_rank_00_model_states.pt")
    proc = _launch(cfg, tiny_corpus, evil, extra=common)
    assert proc.returncode != 0
    assert "is not plain tensor data" in proc.stderr and "io.open" in proc.stderr
    assert not marker.exists(), "the pickled payload ran"

    # Teacher state is JSON + npz read without pickles: an object array is refused.
    from attent_scale.teacher import Teacher
    bad = Path(shutil.copytree(base / "checkpoints" / tag, tmp_path / "teacher"))
    np.savez(bad / "attent_state.npz", scores=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        Teacher.read(bad)
    assert not marker.exists()


def test_no_config_value_or_state_is_evaluated_as_code():
    """Static guard: the package never evaluates text or unpickles anything itself."""
    import re
    offenders = []
    for path in sorted((ROOT / "attent_scale").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"(?<![\w.])(eval|exec)\(|\bpickle\.(loads?|Unpickler)\b|"
                         r"^\s*(import|from) (c?pickle|dill|marshal)\b|allow_pickle=True|"
                         r"weights_only=False", code):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, offenders
