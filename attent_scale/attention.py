"""The transformers adapter for attention importance.

transformers routes every attention call through a registry of attention functions
(``AttentionInterface``). We register one that records per-token importance for the chosen layers
from the (post-RoPE) queries and keys it receives, then hands the call to the model's own
implementation (SDPA, flash or eager), so the training math is untouched and probabilities are
never materialised by the model.

Nothing here is specific to one architecture: any causal LM whose attention modules call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` and carry their ``layer_idx`` (Llama,
Mistral, Qwen2, GPT-2, ...) is probed the same way. A model that does not is refused when the probe
is built, not at the first training step.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .signals import attention_importance


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The model's attention modules by layer index.

    The same rule transformers itself applies to decide that a model uses the attention interface
    (a class named ``*Attention``), plus the ``layer_idx`` the probe needs to tell layers apart.
    """
    return {m.layer_idx: m for m in model.modules()
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None),
                                                                     int)}


def eager_function(module_type: type) -> Callable:
    """The eager attention function of the model that defines ``module_type``.

    transformers keeps one ``eager_attention_forward`` per model file, with that model's own
    conventions (GPT-2's causal buffer and scaling flags, Llama's grouped keys). The registry has
    no "eager" entry, so the probe calls the one next to the attention class it was handed.
    """
    fn = getattr(sys.modules[module_type.__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{module_type.__name__} runs eager attention but its module "
                         f"{module_type.__module__} has no eager_attention_forward; load the "
                         "model with attn_implementation='sdpa'")
    return fn


def attention_scaling(module: torch.nn.Module, query: torch.Tensor, scaling: Optional[float],
                      eager: bool) -> float:
    """The factor the model's attention multiplies q.k by.

    Llama-like models pass it (``scaling``) or keep it (``module.scaling``). Otherwise SDPA and
    flash apply their default head_dim ** -0.5, while GPT-2's own eager function applies its
    config flags instead (``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx``).
    """
    if scaling is not None:
        return scaling
    if getattr(module, "scaling", None) is not None:
        return module.scaling
    scale = query.shape[-1] ** -0.5
    if eager:
        if not getattr(module, "scale_attn_weights", True):
            scale = 1.0
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(module.layer_idx + 1)
    return scale


def dense_mask(attention_mask: Optional[torch.Tensor], t: int,
               sliding_window: Optional[int] = None) -> Optional[torch.Tensor]:
    """The mask as :func:`~attent_scale.signals.attention_importance` reads it: a [B, 1|H, T, T]
    mask, or None for plain causal attention.

    SDPA and eager receive that form already, sliding window included. Flash attention receives
    None or a [B, T] padding mask (1: a real token) and applies the causal rule and a sliding
    window (``sliding_window`` keys, Mistral's) itself, so both are spelled out here.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    window = sliding_window if sliding_window is not None and sliding_window < t else None
    if attention_mask is None and window is None:
        return None
    device = attention_mask.device if attention_mask is not None else None
    i = torch.arange(t, device=device).unsqueeze(-1)
    j = torch.arange(t, device=device).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, -t:].bool()[:, None, None, :]
    return allowed


class AttentionImportance:
    """Records attention importance of ``layers`` while :meth:`recording` is active.

    Raises ValueError (naming the layers or the model) when the model cannot be probed: layers out
    of range, attention that does not go through transformers' attention interface, or an eager
    model whose eager function cannot be found.
    """

    def __init__(self, model: torch.nn.Module, layers: list[int], query_chunk: int = 128):
        config = model.config
        n = config.num_hidden_layers
        bad = [layer for layer in layers if not -n <= layer < n]
        if bad:
            raise ValueError(f"attent.attention.layers: {bad} out of range for a model with {n} "
                             f"layers; allowed: -{n}..{n - 1}")
        self.layers = {layer % n for layer in layers}
        uses_interface = getattr(model, "_can_set_attn_implementation", None)  # transformers' test
        if uses_interface is not None and not uses_interface():
            raise ValueError(f"{type(model).__name__}'s attention does not go through "
                             "transformers' attention interface")
        found = attention_modules(model)
        missing = sorted(self.layers - set(found))
        if missing:
            raise ValueError(f"{type(model).__name__} has no attention module (a *Attention "
                             f"module with a layer_idx) for layers {missing}: its attention does "
                             "not go through transformers' attention interface")
        self.query_chunk = query_chunk
        self.base = config._attn_implementation or "sdpa"
        # Resolved now, so that an eager model without one is refused before training starts.
        self._eager = ({t: eager_function(t) for t in {type(m) for m in found.values()}}
                       if self.base == "eager" else {})
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
        if config._attn_implementation != self.name:
            # transformers only warns when a model cannot switch (its attention does not call
            # the registry); the probe would then record nothing, silently.
            raise ValueError(f"{type(model).__name__} cannot switch its attention implementation "
                             "(its attention does not go through transformers' attention "
                             "interface)")

    def _forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        eager = self.base == "eager"
        if self._active and getattr(module, "layer_idx", None) in self.layers:
            imp = attention_importance(
                query.detach(), key.detach(), attention_scaling(module, query, scaling, eager),
                dense_mask(attention_mask, key.shape[-2], kwargs.get("sliding_window")),
                self.query_chunk)
            self._sum = imp if self._sum is None else self._sum + imp
            self._count += 1
        fn = self._eager[type(module)] if eager else ALL_ATTENTION_FUNCTIONS[self.base]
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
