"""Job start-up on a shared machine: DeepSpeed's shared-memory allreduce, and harmless warnings.

DeepSpeed's CPU backend builds a shared-memory allreduce op with g++ (deepspeed/ops/csrc/cpu/comm/
shm.cpp) the first time it starts. When every rank is on one machine (LOCAL_SIZE, which the
deepspeed launcher sets, equals the world size), each rank also creates
/dev/shm/deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>, about 66 MB, and
nothing ever unlinks it. The op serves only ``deepspeed.comm.inference_all_reduce`` (tensor-parallel
inference). Training collectives go through torch.distributed (gloo on CPU), so the jobs switch
the op off before DeepSpeed starts (:func:`skip_shm_allreduce`). Then nothing is compiled and no
buffer is created. Where DeepSpeed started with the op anyway, :func:`release_shm_allreduce`
unlinks the buffers' names once every rank has mapped them. They then vanish with the ranks,
however the ranks end.

The warnings silenced here are ones whose cause is known and harmless; each is matched by the
start of its text, see :data:`HARMLESS` and :data:`HARMLESS_WARNINGS`.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import warnings

import torch

SHM_ALLREDUCE_OP = "deepspeed_shm_comm"  # the op builder's NAME in deepspeed/ops/op_builder/cpu

# logger name -> (message start, why it is harmless, machines it is silenced on)
HARMLESS = [
    ("DeepSpeed", "Attempting to get learning rate from scheduler before it has started",
     "WarmupCosineLR's own constructor reads its first learning rate", "all"),
    ("DeepSpeed", "Setting accelerator to CPU",
     "DeepSpeed found no GPU, and this machine has none", "no-gpu"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found",
     "torch's extension builder found a CUDA toolkit but no GPU, and this machine has none",
     "no-gpu"),
]


# (category, message start, why it is harmless): Python warnings, silenced everywhere.
HARMLESS_WARNINGS = [
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated",
     "DeepSpeed's ZeRO gathers with it; torch 2.14 deprecates it but runs it unchanged"),
]


def machine_has_no_gpu() -> bool:
    """No GPU device at all (NVIDIA or AMD nodes): then "no GPU found" is news to nobody. A GPU
    that torch cannot use keeps those warnings, since they are the hint."""
    return not torch.cuda.is_available() and not glob.glob("/dev/nvidia[0-9]*") and \
        not os.path.exists("/dev/kfd")


class _DropHarmless(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_known_warnings() -> None:
    """Filter the warnings in :data:`HARMLESS` and :data:`HARMLESS_WARNINGS` (idempotent). Call
    before DeepSpeed is imported: it warns about the accelerator while it is imported."""
    no_gpu = machine_has_no_gpu()
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, start, _why, where in HARMLESS:
        if where == "all" or no_gpu:
            by_logger[name] = by_logger.get(name, ()) + (start,)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)  # the same object DeepSpeed/torch configure later
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless(starts))
    for category, start, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)


def skip_shm_allreduce() -> None:
    """Before ``deepspeed.init_distributed`` on CPU: do not build or create the shared-memory
    allreduce (see the module doc). Without effect on GPUs, where it is never used."""
    if torch.cuda.is_available():
        return
    import deepspeed.ops
    # DeepSpeed reads this dict (probed once, then cached in the module) to decide whether to
    # build the op; False makes it fall back to torch.distributed alone.
    deepspeed.ops.__compatible_ops__[SHM_ALLREDUCE_OP] = False


def release_shm_allreduce(comm) -> None:
    """Collective, after ``deepspeed.init_distributed``: unlink this rank's allreduce buffer name.

    Every rank maps every rank's buffer inside init_distributed, so after a barrier no one looks
    a name up again. The memory itself is freed when the last rank holding it exits.
    """
    comm.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{comm.rank}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass  # never created (GPU, ranks on several machines, or skipped)
