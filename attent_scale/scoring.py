"""Forwards outside the training step that the pretraining jobs run: evaluation and pool scoring.

Both run in lockstep on every rank (ZeRO-3 and FSDP2 all-gather each layer per forward, a
collective): every rank runs the same number of equally sized batches, padded with rows whose
results are thrown away (:func:`attent_scale.partition.lockstep_batches`).
"""
from __future__ import annotations

import numpy as np
import torch

from .partition import lockstep_batches
from .signals import causal_token_losses
from .teaching import Teaching


def load_tokens(ds, ids: np.ndarray, device, column: str = "tokens") -> torch.Tensor:
    """A [len(ids), T] batch read by random access (lockstep passes choose their own ids)."""
    return torch.stack([torch.from_numpy(np.asarray(ds[int(i)][column]).astype(np.int64))
                        for i in ids]).to(device)


@torch.no_grad()
def evaluate(model, val_ds, n: int, micro: int, comm, device, column: str = "tokens") -> float:
    """Mean per-token validation loss over the first n validation sequences, lockstep on ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for ids, valid in lockstep_batches(np.arange(min(n, len(val_ds))), comm.rank, comm.world,
                                       micro):
        tokens = load_tokens(val_ds, ids, device, column)
        ce, _ = causal_token_losses(model(input_ids=tokens).logits, tokens)
        v = torch.from_numpy(valid).to(device)
        total[0] += ce.sum(dim=1)[v].double().sum()
        total[1] += ce.shape[1] * v.sum()
    model.train()
    comm.sum_(total)
    return float(total[0] / total[1])


def pool_scorer(model, train_ds, teaching: Teaching, device, column: str = "tokens"):
    """``ids -> scores`` for ``source: pool``: a no-grad forward of the model over those ids.

    ``model`` is the bare module (``engine.module`` under DeepSpeed): the ``grad_norm`` signal
    differentiates to its layer outputs, which the engine's own hooks would take for a training
    backward (gradient-accumulation scaling, reduction).
    """
    @torch.no_grad()
    def score(ids: np.ndarray) -> torch.Tensor:
        tokens = load_tokens(train_ds, ids, device, column)
        model.eval()
        try:
            with teaching.recording(True):
                logits = model(input_ids=tokens).logits
                ce, labels = causal_token_losses(logits, tokens)
                return teaching.scores(ce, labels, logits[:, :-1])
        finally:
            model.train()
    return score
