"""Time-to-quality benchmark: teacher arms against full-data baselines (see attent_scale.benchmark).

    python tools/bench_ttq.py --out runs/ttq --model small --epochs 3 --micro 16 --seeds 0,1 \
        --arms full@0.5,full@0.65,full@0.8,full@1.0,random,attent-simple

The same as the ``attent-bench`` command.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attent_scale.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
