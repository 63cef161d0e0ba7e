"""Throughput and peak memory of corpus preparation (attent-prepare), one build per run.

    nice -n 10 python tools/bench_prepare.py --out /tmp/bench-corpus \\
        --input 'code=text:SITE_PACKAGES/**/*.py' --max-bytes 120000000 --seq-len 1024

Every option other than ``--out`` and ``--keep`` goes to ``attent-prepare`` as it is (``--input``,
``--tokenizer``, ``--workers``, ...). ``--out`` must not exist; it is deleted after the run
unless ``--keep``. Prints the input size, the tokens written (train + val, end-of-text
included), the wall time of the whole build (tokenizer training included when one is trained),
tokens/s and MB/s, the CPU seconds spent (with the load average: on a shared machine the wall
time measures the neighbours too), and the peak resident memory of this process and of the
largest encoding worker, beside this process's memory once its libraries are imported
(streaming imports torch):
a build whose peak stays near that baseline whatever the input size holds no corpus in memory.
Run it in a fresh process per build, so each peak is that build's alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    """This process's peak resident set so far (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _ChildPeak:
    """Largest VmHWM of this process's children (the encoding workers), sampled on a thread.

    Not RUSAGE_CHILDREN: Linux carries the parent's peak into a child across fork and exec, so
    that figure would be this process's own peak again."""

    def __init__(self, every: float = 0.2):
        import threading

        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        me = os.getpid()
        while not self._stop.wait(every):
            for pid in self._children(me):
                try:
                    # Until its exec a new child still shows this process's memory.
                    if b"attent_scale" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                except OSError:  # ended between listing and reading
                    pass

    @staticmethod
    def _children(pid: int) -> list[str]:
        found = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                found += (task / "children").read_text().split()
            except OSError:
                pass
        return found

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="corpus directory to build (must not exist)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus after the run")
    args, prepare_args = parser.parse_known_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; give a new directory (it is deleted after the run)")

    import streaming  # noqa: F401  (imported here so the baseline below includes it)

    from attent_scale.data import main as prepare

    baseline = _peak_rss_mb()
    children = _ChildPeak()
    load0 = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    code = prepare(["--out", str(out), "--quiet", *prepare_args])
    seconds = time.perf_counter() - t0
    child_mb = children.stop()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    main_cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    load1 = os.getloadavg()[0]
    if code:
        return code
    meta = json.loads((out / "meta.json").read_text())
    tokens = meta["train_tokens"] + meta["val_tokens"]
    mb = meta["source_bytes"] / 1e6
    from attent_scale.data import AUTO_WORKERS_MIN_BYTES
    auto = min(os.cpu_count() or 1, 8) if meta["source_bytes"] >= AUTO_WORKERS_MIN_BYTES else 1
    workers = next((prepare_args[i + 1] for i, a in enumerate(prepare_args[:-1])
                    if a == "--workers"), f"{auto} (auto; {os.cpu_count()} CPU cores)")
    print(f"input:       {mb:.1f} MB, {meta['train_documents'] + meta['val_documents']} "
          f"documents, {len(meta['sources'])} source(s)")
    print(f"tokenizer:   {meta['tokenizer_origin']['kind']}, vocab {meta['vocab_size']}")
    print(f"tokens:      {tokens} ({meta['num_train']} train / {meta['num_val']} val sequences "
          f"of {meta['seq_len']})")
    print(f"seconds:     {seconds:.1f}")
    print(f"tokens/s:    {tokens / seconds:,.0f}")
    print(f"MB/s:        {mb / seconds:.2f}")
    print(f"peak RSS:    {_peak_rss_mb():.0f} MB this process (after imports: {baseline:.0f} MB), "
          f"{child_mb:.0f} MB largest worker")
    print(f"cpu seconds: {main_cpu:.1f} this process, {kids.ru_utime + kids.ru_stime:.1f} "
          f"workers ({tokens / (main_cpu + kids.ru_utime + kids.ru_stime):,.0f} tokens per "
          f"CPU-second)")
    print(f"workers:     {workers}")
    print(f"load avg:    {load0:.1f} at start, {load1:.1f} at end (1 min, all users)")
    if not args.keep:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
