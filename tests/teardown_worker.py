"""One rank of the process-group teardown check (started by tests/test_reliability.py, torchrun).

A gloo group's worker threads end only when nothing references the group any more; left alive to
interpreter exit they can abort a rank after a successful run. ``run_main`` must end the group
after the job's body has returned, whether it finished (``ok``) or failed with a one-line error
(``fail``), while the body keeps references to its groups to the end, as an engine or a device
mesh does. It counts this process's threads before the group, while it runs and after
``run_main``; rank 0 writes them to OUT as JSON. One case a launch: a group cannot start again
under the same torchrun.

    torchrun --nproc_per_node 2 tests/teardown_worker.py ok|fail OUT
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attent_scale.loop import run_main  # noqa: E402


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def case(fail: bool) -> dict[str, int]:
    counts = {"before": threads()}

    def body() -> int:
        dist.init_process_group("gloo")
        # Held in a reference cycle, as an engine or a model with hooks holds its groups: freed
        # only by a collection, not when the body returns.
        engine = {"world": dist.group.WORLD, "pair": dist.new_group([0, 1])}
        engine["self"] = engine
        x = torch.ones(2)
        dist.all_reduce(x, group=engine["world"])
        dist.all_reduce(x, group=engine["pair"])
        counts["running"] = threads()
        if fail:
            raise SystemExit("teardown: a refusal after the group started")
        return 0

    counts["code"] = run_main("teardown", None, body)
    counts["after"] = threads()
    counts["initialized"] = int(dist.is_initialized())
    return counts


if __name__ == "__main__":
    result = case(fail=sys.argv[1] == "fail")
    if int(os.environ["RANK"]) == 0:
        Path(sys.argv[2]).write_text(json.dumps(result))
