"""Bad input gives one clear error before training, never a corrupt checkpoint or a wrong selection.

Config mistakes (ratio outside (0, 1], interval 0, unknown presets, unknown keys) are covered by
tests/test_config.py and budget/NaN cases by tests/test_teacher.py; docs/RELIABILITY.md maps each
case to its test. Here: corrupt or missing shards, an empty dataset, a tokenizer larger than the
model, strict types, a batch the world size does not divide, a checkpoint of another dataset,
checkpoints that are not plain data, and the entry points' start-up refusals (--data, --out,
--remote, --epochs 0, a micro batch larger than the data): one line and exit code 1 each, a
traceback only with --debug or for a bug. Damaged checkpoints and resumes with changed settings
are in tests/test_reliability.py.
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


# ---- the entry points: an expected failure is one line, exit code 1 -------------------------------
# Every case below runs the real main() of attent-pretrain or attent-pretrain-fsdp, all in one
# driver process (tests/entry_driver.py) so that the imports are paid once; a read-only --out is a
# read-only tmpfs in a private mount namespace where one can be made.

DS, FSDP = "attent-pretrain", "attent-pretrain-fsdp"
MODULES = {DS: "attent_scale.pretrain", FSDP: "attent_scale.pretrain_fsdp"}
NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                  "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None, "S3_ENDPOINT_URL": None,
                  "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                  "AWS_EC2_METADATA_DISABLED": "true"}  # no metadata-service probe, no waiting


@pytest.fixture(scope="module")
def startup(tiny_corpus, tmp_path_factory) -> dict:
    """The start-up refusals of both jobs, run once: {"root", "results", "read_only"}."""
    from entry_driver import can_mount, run_cases
    root = tmp_path_factory.mktemp("startup")
    (root / "a-file").write_text("not a corpus\n")
    (root / "not-a-corpus").mkdir()
    (root / "not-a-corpus" / "notes.txt").write_text("hello\n")
    (root / "garbage-meta").mkdir()
    (root / "garbage-meta" / "meta.json").write_text('{"num_train": 12,')
    simple = {"preset": "attent-simple"}
    cfg = write_config(root / "ds.json", attent=simple)
    huge = write_config(root / "huge.json", attent=simple, train_micro_batch_size_per_gpu=2000)
    broken = root / "broken.json"
    broken.write_text('{"train_micro_batch_size_per_gpu": 8,, }')
    mounts, read_only = {}, None
    if can_mount():
        mounts[str(root / "ro")], read_only = "ro,size=64k", "Read-only file system"
    elif os.geteuid() != 0:  # no mount, but permissions still stop this user
        (root / "ro").mkdir()
        (root / "ro").chmod(0o555)
        read_only = "Permission denied"

    def case(name, job=DS, config=cfg, data=tiny_corpus, out=None, extra=(), env=None):
        argv = ["--deepspeed_config", str(config), "--data", str(data), "--out",
                str(out or root / name), "--model", "tiny", "--epochs", "2", "--eval-samples", "16",
                "--eval-every", "0", "--no-plot", "--log-ids", *extra]
        return {"name": name, "module": MODULES[job], "argv": argv, "env": env}

    cases = [
        case("data-file", data=root / "a-file"),
        case("data-not-a-corpus", data=root / "not-a-corpus"),
        case("data-garbage-meta", data=root / "garbage-meta"),
        case("fsdp-data-file", job=FSDP, data=root / "a-file"),
        case("out-file", out=root / "a-file"),
        case("remote-no-bucket", extra=["--remote", "s3://"], data=root / "cache-a"),
        case("remote-no-credentials", extra=["--remote", "s3://attent-test/corpus"],
             data=root / "cache-b", env=NO_CREDENTIALS),
        case("negative-seed", extra=["--seed", "-1"]),
        case("config-not-json", config=broken),
        case("config-missing", config=root / "missing.json"),
        case("epochs-0", extra=["--epochs", "0"]),
        case("epochs-0-no-teacher", extra=["--epochs", "0", "--no-teacher"]),
        case("fsdp-epochs-0-no-teacher", job=FSDP, extra=["--epochs", "0", "--no-teacher"]),
        case("micro-larger-than-data", config=huge),
        case("micro-larger-than-data-no-teacher", config=huge, extra=["--no-teacher"]),
        case("fsdp-micro-larger-than-data", job=FSDP, config=huge),
    ]
    if read_only:
        cases.append(case("out-read-only", out=root / "ro" / "run"))
    return {"root": root, "read_only": read_only,
            "results": run_cases(cases, root, mounts)}


def _nothing_written(out: Path) -> None:
    """A refused job leaves no metrics, ids, checkpoint or lock behind (at most an empty --out)."""
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else []
    assert left == [], f"the refused job left {left} in {out}"


def test_data_that_is_not_a_corpus_is_one_line(startup):
    from entry_driver import one_line
    r, root = startup["results"], startup["root"]
    assert one_line(r["data-file"], DS) == (
        f"{DS}: --data {root / 'a-file'} is a file; give a corpus directory (attent-prepare "
        "--out DIR) or a new directory to build one in")
    assert "is neither a prepared corpus (no meta.json) nor MDS shards" in \
        one_line(r["data-not-a-corpus"], DS)
    line = one_line(r["data-garbage-meta"], DS)
    assert f"{root / 'garbage-meta' / 'meta.json'} cannot be read" in line and "prepare it again" \
        in line
    # The FSDP2 job says its own name.
    assert one_line(r["fsdp-data-file"], FSDP).startswith(f"{FSDP}: --data {root / 'a-file'} is a")
    for name in ("data-file", "data-not-a-corpus", "data-garbage-meta", "fsdp-data-file"):
        _nothing_written(root / name)
    assert (root / "a-file").read_text() == "not a corpus\n"


def test_out_that_is_a_file_or_read_only_is_one_line(startup):
    from entry_driver import one_line
    r, root = startup["results"], startup["root"]
    assert one_line(r["out-file"], DS) == (
        f"{DS}: --out {root / 'a-file'} is a file; give a directory (a new one, or the --out of "
        "the run to resume)")
    assert (root / "a-file").read_text() == "not a corpus\n", "the file was changed"
    if startup["read_only"] is None:
        pytest.skip("running as root without a mount namespace: no read-only directory to try")
    line = one_line(r["out-read-only"], DS)
    assert line == (f"{DS}: --out {root / 'ro' / 'run'}: cannot create it "
                    f"({startup['read_only']}); fix: choose an --out on a filesystem this user "
                    "can write")


def test_remote_without_a_bucket_or_credentials_is_one_line(startup):
    from entry_driver import one_line
    r, root = startup["results"], startup["root"]
    assert one_line(r["remote-no-bucket"], DS) == (
        f"{DS}: --remote: s3:// names no bucket; give s3://BUCKET/PATH, the directory "
        "attent-prepare's corpus was uploaded to")
    assert not (root / "remote-no-bucket").exists(), "refused before anything was created"
    line = one_line(r["remote-no-credentials"], DS)
    assert line.startswith(f"{DS}: --remote s3://attent-test/corpus: cannot fetch "
                           "s3://attent-test/corpus/meta.json (NoCredentialsError: Unable to "
                           "locate credentials); check the URL and the store's credentials")
    assert "AWS_ACCESS_KEY_ID" in line
    _nothing_written(root / "remote-no-credentials")
    assert not (root / "cache-b" / "meta.json").exists()


def test_epochs_zero_is_one_line_with_or_without_the_teacher(startup):
    from entry_driver import one_line
    r, root = startup["results"], startup["root"]
    want = "--epochs: got 0; allowed: an integer >= 1 (the passes over the training data)"
    for name, job in (("epochs-0", DS), ("epochs-0-no-teacher", DS),
                      ("fsdp-epochs-0-no-teacher", FSDP)):
        assert one_line(r[name], job) == f"{job}: {want}", name
        assert not (root / name).exists(), f"{name}: refused before --out was created"


def test_negative_seed_is_one_line(startup):
    from entry_driver import one_line
    assert one_line(startup["results"]["negative-seed"], DS) == \
        f"{DS}: --seed: got -1; allowed: an integer >= 0"
    assert not (startup["root"] / "negative-seed").exists()


def test_a_config_that_is_not_json_or_missing_names_its_path_once(startup):
    from entry_driver import one_line
    r, root = startup["results"], startup["root"]
    assert one_line(r["config-not-json"], DS) == (
        f"{DS}: {root / 'broken.json'}: not valid JSON (Expecting property name enclosed in "
        "double quotes: line 1 column 38 (char 37))")
    assert one_line(r["config-missing"], DS) == (
        f"{DS}: --deepspeed_config {root / 'missing.json'}: No such file or directory; give a "
        "DeepSpeed JSON config, e.g. configs/zero1.json")
    assert not (root / "config-not-json").exists() and not (root / "config-missing").exists()


def test_micro_batch_larger_than_the_data_is_one_line(startup, tiny_corpus):
    from entry_driver import one_line
    r, root = startup["results"], startup["root"]
    n = _meta(tiny_corpus)["num_train"]
    for name, job in (("micro-larger-than-data", DS), ("micro-larger-than-data-no-teacher", DS),
                      ("fsdp-micro-larger-than-data", FSDP)):
        assert one_line(r[name], job) == (
            f"{job}: --data {tiny_corpus} has {n} training samples, fewer than one global batch "
            "of 2000 (micro batch 2000 x 1 ranks x 1 gradient accumulation steps); fix: lower "
            f"train_micro_batch_size_per_gpu in {root / 'huge.json'}, or use more data"), name
        _nothing_written(root / name)


def test_expected_failures_are_one_line_and_bugs_keep_their_traceback(capsys):
    """run_main itself: which failures become one line (exit code 1), which stay tracebacks."""
    import argparse
    import errno

    from attent_scale.loop import run_main
    from attent_scale.model import ModelError
    quiet, debug = argparse.Namespace(debug=False), argparse.Namespace(debug=True)

    def fails(exc):
        def body():
            raise exc
        return body

    def lines() -> list[str]:
        return capsys.readouterr().err.splitlines()

    assert run_main("job", quiet, lambda: 0) == 0
    assert run_main("job", quiet, fails(SystemExit("job: --x: got 1; fix: y"))) == 1
    assert lines() == ["job: --x: got 1; fix: y"]
    assert run_main("job", quiet, fails(ModelError("--model-config c: no such file"))) == 1
    assert lines() == ["job: --model-config c: no such file"]  # the job's name is added
    full = OSError(errno.ENOSPC, "No space left on device", "/out/metrics.jsonl")
    assert run_main("job", quiet, fails(full)) == 1
    (line,) = lines()
    assert line.startswith("job: the disk is full: cannot write /out/metrics.jsonl (No space "
                           "left on device); fix: free space")
    # --debug: the traceback (with the context a `raise ... from None` hides), then the line.
    try:
        try:
            {}["k"]
        except KeyError:
            raise SystemExit("job: the line") from None
    except SystemExit as exc:
        hidden = exc
    assert run_main("job", debug, fails(hidden)) == 1
    err = lines()
    assert err[0] == "Traceback (most recent call last):" and "KeyError: 'k'" in err
    assert err[-1] == "job: the line"
    # Bugs, and the exit codes argparse and the run lock chose, pass through unchanged.
    with pytest.raises(KeyError):
        run_main("job", quiet, fails(KeyError("k")))
    with pytest.raises(SystemExit) as ei:
        run_main("job", quiet, fails(SystemExit(2)))
    assert ei.value.code == 2
    with pytest.raises(OSError):
        run_main("job", quiet, fails(OSError(errno.EIO, "Input/output error")))
    assert lines() == []


def test_trainer_state_is_checked_field_by_field(tmp_path):
    from attent_scale.checkpoint import CheckpointError
    from attent_scale.loop import Progress, check_progress
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step5").mkdir(parents=True)
    (ckpt / "latest").write_text("step5")
    good = {**Progress(step=5, pass_index=1, samples_in_pass=8, fingerprint="ab", world=1,
                       micro=8, passes=2, budget_fraction=1.0, canonical_nodes=1).__dict__}
    assert check_progress(dict(good), ckpt) == good
    file = ckpt / "step5" / "trainer_state.json"
    for edit, words in (
            ({"step": "fifty"}, "field 'step': got 'fifty'; allowed: an integer >= 0"),
            ({"step": 2.0}, "field 'step': got 2.0; allowed: an integer"),
            ({"pass_index": -1}, "field 'pass_index': got -1; allowed: an integer >= 0"),
            ({"samples_in_pass": True}, "field 'samples_in_pass': got True"),
            ({"micro": 0}, "field 'micro': got 0; allowed: an integer >= 1"),
            ({"wall": float("nan")}, "field 'wall': got nan; allowed: a finite number >= 0"),
            ({"budget_fraction": 1.5}, "field 'budget_fraction': got 1.5; allowed: a number in "
                                       "(0, 1]"),
            ({"fingerprint": 7}, "field 'fingerprint': got 7; allowed: a string"),
            ({"bogus": 1}, "field 'bogus': unknown")):
        with pytest.raises(CheckpointError) as ei:
            check_progress({**good, **edit}, ckpt)
        msg = str(ei.value)
        assert msg.startswith(f"{file}: {words}"), msg
        assert "fix: point" in msg and "--no-resume" in msg and "\n" not in msg
    for key in ("step", "fingerprint"):
        with pytest.raises(CheckpointError, match=f"field '{key}': missing"):
            check_progress({k: v for k, v in good.items() if k != key}, ckpt)
    # Older checkpoints lack the run's identity: None is allowed there.
    assert check_progress({**good, "micro": None, "passes": None}, ckpt)["micro"] is None


def test_every_option_of_the_pretraining_jobs_says_what_it_does():
    from attent_scale.loop import build_parser
    parser = build_parser("job", "configs/zero1.json")
    bare = sorted(a.option_strings[0] for a in parser._actions
                  if a.help is None and a.option_strings)
    assert bare == [], f"options without help text: {bare}"
    assert "--debug" in parser.format_help()
