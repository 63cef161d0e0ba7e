"""--remote s3://...: a prepared corpus in an S3-compatible object store, read via a local cache.

The store is moto's standalone server, started on 127.0.0.1 by the fixture below and stopped after
the module. Streaming downloads index.json and the MDS shards with boto3, which S3_ENDPOINT_URL
points at that server.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attent_scale.streaming_data import check_remote
from conftest import assert_agree_and_exactly_once, free_port, read_ids, run_job, write_config

BUCKET = "attent-corpus"
# Dummy credentials; distinctive, so the test can show they never reach a log.
ACCESS_KEY, SECRET_KEY = "AKIATESTATTENT0001", "attent-test-secret-0f3c9a"


@pytest.fixture(scope="module")
def s3_corpus(tiny_corpus, tmp_path_factory):
    """Upload the tiny corpus to a moto server on 127.0.0.1; yield its s3:// URL."""
    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        pytest.skip(f"{server} is missing: install moto[server] into the environment")
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with pytest.MonkeyPatch.context() as mp:
        # Read by boto3 here and by streaming's downloader in every rank.
        for key, value in {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                           "AWS_DEFAULT_REGION": "us-east-1",
                           "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                           "NO_PROXY": "127.0.0.1,localhost"}.items():
            mp.setenv(key, value)
        with open(log_path, "w") as log:
            proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"moto_server exited ({proc.returncode}):\n"
                                f"{log_path.read_text()[-2000:]}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail("moto_server did not listen within 60 s")
                    time.sleep(0.2)
            import boto3
            s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
            s3.create_bucket(Bucket=BUCKET)
            # The whole prepared directory, as `aws s3 sync` would copy it.
            for path in sorted(p for p in tiny_corpus.rglob("*") if p.is_file()):
                s3.upload_file(str(path), BUCKET, f"tiny/{path.relative_to(tiny_corpus)}")
            yield f"s3://{BUCKET}/tiny"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_two_ranks_stream_from_s3_exactly_once_and_resume_with_an_empty_cache(s3_corpus,
                                                                               tmp_path):
    cfg = write_config(tmp_path / "ds.json", stage=1, attent={"preset": "attent-simple"})
    common = ["--remote", s3_corpus, "--epochs", "2", "--no-plot"]
    cache = tmp_path / "cache"
    full = run_job(cfg, cache, tmp_path / "full", extra=common)
    assert list((cache / "train").glob("shard.*.mds")), "no shard reached the local cache"
    logs = read_ids(tmp_path / "full", 2)
    assert assert_agree_and_exactly_once(logs, 2) == [0, 1]
    assert logs[0]["passes"][1][1] < logs[0]["passes"][0][1], "the teacher skipped nothing"

    # Stop a few steps into the teacher's subset pass, lose the cache, resume from the store.
    steps_pass0 = len(logs[0]["trained"][0]) // 8
    cut = tmp_path / "cut"
    shutil.rmtree(cache)
    first = run_job(cfg, cache, cut, extra=[*common, "--stop-after", str(steps_pass0 + 3)])
    shutil.rmtree(cache)
    resumed = run_job(cfg, cache, cut, extra=common)
    assert "resumed at step" in resumed.stdout
    again = read_ids(cut, 2)
    for r in range(2):
        assert again[r]["trained"] == logs[r]["trained"], f"rank {r} trained other ids"
    for proc in (full, first, resumed):
        assert SECRET_KEY not in proc.stdout + proc.stderr
        assert ACCESS_KEY not in proc.stdout + proc.stderr


@pytest.mark.parametrize("url", ["s3://bucket/corpus", "gs://bucket/corpus", "relative/dir",
                                 "/abs/dir"])
def test_check_remote_accepts_paths_and_streaming_schemes(url):
    assert check_remote(url) == url


def test_check_remote_names_the_allowed_schemes():
    with pytest.raises(ValueError, match=r"scheme 'ftp://'.*allowed: a local path or .*s3://"):
        check_remote("ftp://host/corpus")


def test_check_remote_masks_a_password_in_the_url():
    with pytest.raises(ValueError) as err:
        check_remote(f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/corpus")
    assert SECRET_KEY not in str(err.value) and ":***@" in str(err.value)


def test_pretrain_rejects_an_unsupported_remote_before_starting(tmp_path):
    from conftest import ROOT
    cfg = write_config(tmp_path / "ds.json")
    proc = subprocess.run([sys.executable, "-m", "attent_scale.pretrain", "--deepspeed_config",
                           str(cfg), "--remote", "https://user:hunter2@example.com/corpus",
                           "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "--remote:" in proc.stderr and "hunter2" not in proc.stderr
    assert not (tmp_path / "run").exists()
