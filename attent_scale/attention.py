"""The transformers adapter for attention importance.

transformers routes every attention call through a registry of attention functions
(``AttentionInterface``). We register one that records per-token importance for the chosen layers
from the (post-RoPE) queries and keys it receives, then hands the call to the model's own
implementation (SDPA, flash or eager), so the training math is untouched and probabilities are
never materialised by the model.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .signals import attention_importance


def _eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # The model's eager path lives in its own module; import lazily to stay model-agnostic.
    from transformers.models.llama.modeling_llama import eager_attention_forward
    return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                   dropout=dropout, **kwargs)


class AttentionImportance:
    """Records attention importance of ``layers`` while :meth:`recording` is active."""

    def __init__(self, model: torch.nn.Module, layers: list[int], query_chunk: int = 128):
        config = model.config
        n = config.num_hidden_layers
        bad = [layer for layer in layers if not -n <= layer < n]
        if bad:
            raise ValueError(f"attent.attention.layers: {bad} out of range for a model with {n} "
                             f"layers; allowed: -{n}..{n - 1}")
        self.layers = {layer % n for layer in layers}
        self.query_chunk = query_chunk
        self.base = config._attn_implementation or "sdpa"
        self.name = f"attent_probe_{id(self):x}"
        self._active = False
        self._sum: Optional[torch.Tensor] = None
        self._count = 0
        AttentionInterface.register(self.name, self._forward)
        # Keep the mask the model's own implementation expects (e.g. SDPA's boolean mask).
        base_mask = (ALL_MASK_ATTENTION_FUNCTIONS[self.base]
                     if self.base in ALL_MASK_ATTENTION_FUNCTIONS else sdpa_mask)
        ALL_MASK_ATTENTION_FUNCTIONS.register(self.name, base_mask)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(self.name)
        else:
            config._attn_implementation = self.name

    def _forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        if self._active and getattr(module, "layer_idx", None) in self.layers:
            imp = attention_importance(query.detach(), key.detach(),
                                       scaling if scaling is not None else module.scaling,
                                       attention_mask, self.query_chunk)
            self._sum = imp if self._sum is None else self._sum + imp
            self._count += 1
        fn = _eager if self.base == "eager" else ALL_ATTENTION_FUNCTIONS[self.base]
        return fn(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    @contextlib.contextmanager
    def recording(self, enabled: bool = True) -> Iterator[None]:
        """Record during this block only (so a checkpointed layer's recompute is not counted)."""
        self._active, self._sum, self._count = enabled, None, 0
        try:
            yield
        finally:
            self._active = False

    def pop(self) -> torch.Tensor:
        """Mean importance [B, T] over the recorded layers of the last recorded forward."""
        if self._sum is None:
            raise RuntimeError("no attention was recorded: the configured layers did not run")
        out = self._sum / self._count
        self._sum, self._count = None, 0
        return out
