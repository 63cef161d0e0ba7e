"""Two real CPU ranks over gloo, for each ZeRO stage: agreement, exactly-once, lockstep, resume."""
from __future__ import annotations

import numpy as np
import pytest

from attent_scale.policy import selection_checksum
from conftest import read_ids, run_job, write_config

# Pool scoring over 49 candidates with micro batch 8 on 2 ranks: rank 0 scores 25 ids (4 batches),
# rank 1 scores 24 (3 batches). Without lockstep padding ZeRO-3 would hang on the 4th forward.
UNEVEN_POOL = {
    "source": "pool", "pool_size": 49, "warmup_passes": 1, "signal": "fgrad_norm",
    "ratio": {"schedule": "constant", "value": 0.5},
    "interval": {"schedule": "fixed", "every": 1},
    "selection": {"method": "soft", "temperature": 0.5},
}
EPOCHS = 3


def check_agreement_and_exactly_once(logs: dict, num_ranks: int) -> None:
    passes = sorted(logs[0]["trained"])
    assert passes == list(range(EPOCHS))
    for p in passes:
        # Identical selection on every rank.
        sums = {logs[r]["passes"][p] for r in range(num_ranks)}
        assert len(sums) == 1, f"pass {p}: ranks logged different selections {sums}"
        checksum, size = sums.pop()
        # The ids the ranks actually received: disjoint, together exactly the selection.
        per_rank = [logs[r]["trained"][p] for r in range(num_ranks)]
        union = np.concatenate(per_rank)
        assert len(union) == size
        assert len(np.unique(union)) == size, f"pass {p}: an id was trained twice"
        assert selection_checksum(np.sort(union), np.ones(size)) == checksum


# ZeRO-2 also reads through a DataLoader worker per rank, so streaming partitions over workers too.
# ZeRO-1 (2 ranks, pool scores, stop and resume at several points) is test_reliability.py's job.
@pytest.mark.parametrize("stage,workers", [(2, 1), (3, 0)])
def test_two_ranks_agree_train_each_selected_id_once_and_resume_exactly(stage, workers,
                                                                        tiny_corpus, tmp_path):
    cfg = write_config(tmp_path / "ds.json", stage=stage, attent=UNEVEN_POOL)
    common = ["--epochs", str(EPOCHS), "--workers", str(workers), "--no-plot"]
    full = tmp_path / "full"
    run_job(cfg, tiny_corpus, full, extra=common)
    logs = read_ids(full, 2)
    check_agreement_and_exactly_once(logs, 2)
    first_subset = logs[0]["passes"][1][1]
    assert first_subset < logs[0]["passes"][0][1], "the teacher skipped nothing"

    # Stop mid-way through the first subset pass, then resume with the same command.
    steps_pass0 = len(logs[0]["trained"][0]) // 8
    stop = steps_pass0 + 3
    cut = tmp_path / "cut"
    run_job(cfg, tiny_corpus, cut, extra=[*common, "--stop-after", str(stop)])
    resumed = run_job(cfg, tiny_corpus, cut, extra=common)
    assert "resumed at step" in resumed.stdout
    again = read_ids(cut, 2)
    for r in range(2):
        assert again[r]["trained"] == logs[r]["trained"], f"rank {r} trained other ids"


def test_deepspeed_launcher_script_two_ranks(tiny_corpus, tmp_path):
    """launchers/deepspeed/pretrain.sh: DeepSpeed's launcher names the per-node world LOCAL_SIZE;
    streaming must still see both ranks on one node and partition the selection between them."""
    cfg = write_config(tmp_path / "ds.json", stage=2, attent={"preset": "attent-simple"})
    out = tmp_path / "run"
    run_job(cfg, tiny_corpus, out, launcher="deepspeed", extra=["--epochs", "2", "--no-plot"])
    logs = read_ids(out, 2)
    for p in (0, 1):
        checksum, size = logs[0]["passes"][p]
        assert logs[1]["passes"][p] == (checksum, size)
        union = np.concatenate([logs[r]["trained"][p] for r in (0, 1)])
        assert len(union) == size == len(np.unique(union))
        assert selection_checksum(np.sort(union), np.ones(size)) == checksum
    assert logs[0]["passes"][1][1] < logs[0]["passes"][0][1]
