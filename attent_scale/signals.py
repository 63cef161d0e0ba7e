"""Per-example teaching signals from tensors the training forward already has.

All functions work on detached tensors under ``torch.no_grad`` and in chunks of tokens, so no
second vocabulary-sized tensor per token is ever alive. Tokens whose mask is False (prompt, padding,
the ignore index) count in none of the scores.

Pure module: torch only (no torch.distributed, DeepSpeed or streaming).
"""
from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100


def causal_token_losses(logits: torch.Tensor, labels: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per token: (losses [B, T-1] float32, labels [B, T-1]).

    ``labels`` follow the Hugging Face convention: aligned with the inputs (for pretraining, the
    input ids themselves), so position t predicts ``labels[:, t+1]``; -100 marks tokens that
    neither train nor score (their loss is 0). Computed in float32 whatever the logits' dtype.
    With grad the losses are differentiable; without, rows are reduced a few at a time so only a
    slice of the logits is ever upcast.
    """
    shifted = labels[:, 1:]
    if torch.is_grad_enabled() and logits.requires_grad:
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                               shifted.flatten(), reduction="none",
                                               ignore_index=IGNORE_INDEX)
        return ce.view(shifted.shape), shifted
    out = torch.empty(shifted.shape, dtype=torch.float32, device=logits.device)
    rows = max(1, (1 << 24) // max(1, shifted.shape[1] * logits.shape[-1]))  # 64 MiB of float32
    with torch.no_grad():
        for s in range(0, logits.shape[0], rows):
            out[s:s + rows] = torch.nn.functional.cross_entropy(
                logits[s:s + rows, :-1].float().transpose(1, 2), shifted[s:s + rows],
                reduction="none", ignore_index=IGNORE_INDEX)
    return out, shifted


@torch.no_grad()
def token_grad_sq_norm(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 2048
                       ) -> torch.Tensor:
    """||softmax(z) - onehot(y)||^2 per token: the squared functional gradient dL/dz of CE.

    Uses sum_i p_i^2 = exp(lse(2z) - 2 lse(z)), so ||p - e_y||^2 = sum p^2 - 2 p_y + 1 needs two
    log-sum-exps per token and never the probabilities of a whole sequence at once.
    logits: [..., V]; labels: [...] (IGNORE_INDEX allowed, returns 0 there). Returns float32 [...].
    """
    flat = logits.reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    out = torch.zeros(flat.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], chunk_tokens):
        z = flat[s:s + chunk_tokens].float()
        lse = torch.logsumexp(z, dim=-1)
        sum_p2 = torch.exp(torch.logsumexp(2.0 * z, dim=-1) - 2.0 * lse)
        yc = y[s:s + chunk_tokens]
        valid = yc != IGNORE_INDEX
        zy = z.gather(-1, yc.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        p_y = torch.exp(zy - lse)
        g2 = (sum_p2 - 2.0 * p_y + 1.0).clamp_min(0.0)
        out[s:s + chunk_tokens] = torch.where(valid, g2, torch.zeros_like(g2))
    return out.reshape(labels.shape)


@torch.no_grad()
def attention_importance(query: torch.Tensor, key: torch.Tensor, scaling: float,
                         attention_mask: Optional[torch.Tensor] = None,
                         query_chunk: int = 128) -> torch.Tensor:
    """Attention mass each token receives, averaged over heads, normalised to mean 1 per sequence.

    query: [B, H, T, d]; key: [B, Hkv, T, d] (grouped-query keys are shared by H/Hkv heads);
    attention_mask: an additive [B, 1|H, T, T] mask as transformers passes it, or None for causal.
    Probabilities are formed for ``query_chunk`` queries at a time (B x H x chunk x T), so this works
    when the model itself runs SDPA or flash attention and never materialises them.
    Returns float32 [B, T].
    """
    b, h, t, _ = query.shape
    rep = h // key.shape[1]
    k = key.float().repeat_interleave(rep, dim=1) if rep > 1 else key.float()
    received = torch.zeros(b, t, dtype=torch.float32, device=query.device)
    rows = torch.zeros(b, dtype=torch.float32, device=query.device)
    for s in range(0, t, query_chunk):
        q = query[:, :, s:s + query_chunk].float()
        logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, c, T]
        if attention_mask is None:
            qi = torch.arange(s, s + q.shape[2], device=query.device).unsqueeze(-1)
            kj = torch.arange(t, device=query.device).unsqueeze(0)
            logits = logits.masked_fill(kj > qi, float("-inf"))
        else:
            m = attention_mask[:, :, s:s + q.shape[2], :t]
            logits = logits + (m.float() if m.dtype != torch.bool else
                               torch.zeros_like(m, dtype=torch.float32).masked_fill(~m, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        # A fully masked query row (padding) gives NaN: it receives and gives no mass.
        live = torch.isfinite(logits).any(dim=-1, keepdim=True)
        if attention_mask is not None and m.dtype != torch.bool:
            # transformers' eager masks mark masked keys with finfo(dtype).min, not -inf: a padded
            # query row is then finite everywhere and would spread mass 1/T over every key.
            live = live & (m > torch.finfo(m.dtype).min / 2).any(dim=-1, keepdim=True)
        probs = torch.where(live, probs, torch.zeros_like(probs))
        received += probs.sum(dim=(1, 2)) / h
        rows += live.squeeze(-1).float().mean(dim=1).sum(dim=-1)
    # Each live query row hands out mass 1, so received sums to `rows`; scale to mean 1 over T.
    return received / (rows.clamp_min(1.0) / t).unsqueeze(-1)


@torch.no_grad()
def example_scores(signal: str, token_ce: torch.Tensor, labels: torch.Tensor,
                   logits: Optional[torch.Tensor] = None,
                   importance: Optional[torch.Tensor] = None,
                   chunk_tokens: int = 2048, g2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One score per example ([B], float32) from per-token quantities ([B, T]).

    - loss: mean cross-entropy over the example's unmasked tokens;
    - fgrad_norm: sqrt of the mean over unmasked tokens of ||softmax - onehot||^2 (the RMS
      functional-gradient norm; from ``logits``, or ``g2`` when a fused loss kernel already
      computed it per token);
    - attention_fgrad: the same mean, each token weighted by ``importance`` ([B, T]).
    An example with no unmasked token scores NaN (it has no signal; the teacher never selects it).
    """
    mask = labels != IGNORE_INDEX
    n = mask.sum(dim=-1).float()
    if signal == "loss":
        total = torch.where(mask, token_ce.float(), torch.zeros((), device=token_ce.device)).sum(-1)
        return total / n
    if g2 is None:
        if logits is None:
            raise ValueError(f"signal {signal!r} needs the logits")
        g2 = token_grad_sq_norm(logits, labels, chunk_tokens)
    if signal == "fgrad_norm":
        return torch.sqrt(g2.sum(-1) / n)
    if signal == "attention_fgrad":
        if importance is None:
            raise ValueError("signal 'attention_fgrad' needs the attention importance")
        w = torch.where(mask, importance.float(), torch.zeros((), device=importance.device))
        return torch.sqrt((w * g2).sum(-1) / n)
    raise ValueError(f"unknown signal {signal!r}; allowed: loss, fgrad_norm, attention_fgrad")
