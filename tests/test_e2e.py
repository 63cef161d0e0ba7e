"""The README job at tiny size, end to end, in one process."""
from __future__ import annotations

import json

import numpy as np

from attent_scale.policy import PURPOSE_SELECT, make_rng, round_budget, select_random
from conftest import read_ids, run_job, write_config


def test_readme_job_teaches_and_learns(tiny_corpus, tmp_path):
    monitor = {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "demo"}
    cfg = write_config(tmp_path / "ds.json", stage=1, attent={"preset": "attent-simple"},
                       csv_monitor=monitor)
    out = tmp_path / "run"
    proc = run_job(cfg, tiny_corpus, out, nproc=1, launcher="python",
                   extra=["--epochs", "3", "--eval-every", "40"])
    # The teacher's one-line summary and the final table are printed.
    assert "[attent] pass 1 subset" in proc.stdout + proc.stderr
    assert "final validation loss" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if r["type"] == "summary")
    assert summary["examples_skipped_by_the_teacher"] > 0
    evals = [r["val_loss"] for r in records if r["type"] == "eval"]
    assert len(evals) >= 3 and evals[-1] < evals[0] - 0.5, evals

    # What was trained in the subset passes is not what a random draw of the same size gives.
    meta = json.loads((tiny_corpus / "meta.json").read_text())
    trained = read_ids(out, 1)[0]["trained"]
    k = round_budget(meta["num_train"], 0.7, 8)
    assert len(trained[1]) == k and sorted(trained[1]) == sorted(trained[2])
    rand = select_random(np.arange(meta["num_train"]), k, make_rng(0, 1, PURPOSE_SELECT)).ids
    overlap = len(np.intersect1d(rand, trained[1])) / k
    assert overlap < 0.9, overlap
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The config's monitor section (DeepSpeed's CSV monitor) got the teacher's per-pass figures
    # beside the training curve.
    csv = tmp_path / "monitor" / "demo"
    kept = (csv / "attent_teacher_kept.csv").read_text().splitlines()
    full = (meta["num_train"] // 8) * 8
    assert kept[0] == "step,kept" and [float(r.split(",")[1]) for r in kept[1:]] == [full, k, k]
    assert len((csv / "attent_teacher_q50.csv").read_text().splitlines()) == 2  # pass 1 selects
    assert len((csv / "attent_eval_val_loss.csv").read_text().splitlines()) == len(evals) + 1


def test_plain_deepspeed_job_without_section_trains_full_passes(tiny_corpus, tmp_path):
    cfg = write_config(tmp_path / "ds.json", stage=1, attent={"preset": "attent-simple",
                                                               "enabled": False})
    out = tmp_path / "run"
    run_job(cfg, tiny_corpus, out, nproc=1, launcher="python", extra=["--epochs", "2"])
    meta = json.loads((tiny_corpus / "meta.json").read_text())
    trained = read_ids(out, 1)[0]["trained"]
    full = (meta["num_train"] // 8) * 8
    assert [len(trained[p]) for p in (0, 1)] == [full, full]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if r["type"] == "summary")
    assert summary["teacher"].startswith("off")


def test_bad_attent_section_fails_at_start_with_every_problem(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8,
                               "attent": {"ration": 0.5, "selection": {"method": "best"}}}))
    proc = subprocess.run([sys.executable, "-m", "attent_scale.pretrain", "--deepspeed_config",
                           str(cfg), "--out", str(tmp_path / "run")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "attent.ration: unknown key" in proc.stderr
    assert "attent.selection.method: got 'best'" in proc.stderr
    assert not (tmp_path / "run").exists(), "nothing may start before the config is valid"


def test_training_reads_a_remote_corpus_through_a_local_cache(tiny_corpus, tmp_path):
    """--remote streams a prepared corpus into an empty --data cache (a path remote here; the
    object-store case goes through the same streaming downloader)."""
    cfg = write_config(tmp_path / "ds.json", stage=1, attent={"preset": "attent-simple"})
    cache, out = tmp_path / "cache", tmp_path / "run"
    proc = run_job(cfg, cache, out, nproc=1, launcher="python",
                   extra=["--epochs", "2", "--remote", str(tiny_corpus), "--no-plot"])
    assert "final validation loss" in proc.stdout
    meta = json.loads((tiny_corpus / "meta.json").read_text())
    assert json.loads((cache / "meta.json").read_text())["fingerprint"] == meta["fingerprint"]
    assert list((cache / "train").glob("shard.*.mds")), "train shards were not cached"
    trained = read_ids(out, 1)[0]["trained"]
    assert len(trained[0]) == (meta["num_train"] // 8) * 8
