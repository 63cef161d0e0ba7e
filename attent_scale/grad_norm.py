"""Per-example gradient norms of chosen Linear layers, from module hooks (the ``grad_norm`` signal).

Linear means ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed.

Under ZeRO-3 and FSDP ``param.grad`` is partitioned and holds only the sum over the batch, so the
per-example gradient has to be rebuilt from what each layer sees. For a Linear layer y = x W^T + b
with input A_b [T, d_in] and output gradient G_b = dL_b/dy [T, d_out] of example b:

    ||dW_b||^2 = ||A_b^T G_b||_F^2                  outer form, ~T d_in d_out multiply-adds
               = sum((A_b A_b^T) * (G_b G_b^T))    Gram form, ~T^2 (d_in + d_out)
    ||db_b||^2 = ||sum_t G_b[t]||^2

Both are exact; each layer uses the cheaper one at its sequence length and width. A forward hook
keeps A (the tensor autograd already saves for the weight gradient, so no extra memory) and puts a
tensor hook on the output that receives G during the backward. Forward hooks see the full
activations under ZeRO-3 and FSDP2 because both gather the parameters for the forward; nothing here
reads or writes a parameter or its gradient, so partitioning does not matter.

Normalisation. The score of example b is the gradient norm of *its own* mean token loss
l_b = sum_t m_bt ce_bt / n_b (m: tokens whose label is not the ignore index, n_b = sum_t m_bt),
independent of the batch it was trained in. The backward that delivers G is of some training loss L
(a batch mean, per-example weights, 1/gradient-accumulation and a loss scale all multiply it). As
long as L depends on example b only through a_b * l_b, the gradient reaching b's token losses is
dL/dce_bt = a_b m_bt / n_b, so a hook on the token losses reads a_b = sum_t dL/dce_bt and every G_b
is divided by a_b: the squared norm is divided by a_b^2. Examples with a_b = 0 (weight 0, no valid
token) get NaN, which the teacher counts as invalid and never selects.

Pure module: torch only (no torch.distributed, DeepSpeed or streaming).
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import torch
from torch import nn

Method = Literal["auto", "outer", "gram"]


def choose_method(seq_len: int, d_in: int, d_out: int) -> str:
    """'gram' when T^2 (d_in + d_out) < T d_in d_out, else 'outer' (multiply-adds per example)."""
    return "gram" if seq_len * (d_in + d_out) < d_in * d_out else "outer"


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    # Sums of squares in at least float32, whatever the activation dtype.
    return torch.promote_types(t.dtype, torch.float32)


def outer_sq_norms(a: torch.Tensor, g: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """||A_b^T G_b||_F^2 per example. a: [B, T, d_in], g: [B, T, d_out] -> [B].

    dW blocks of at most ``chunk_elements`` entries are formed at once (examples x rows of dW).
    The products run in the activation dtype (bf16 on GPU, accumulated in float32 by the matmul);
    only the sum of squares is upcast.
    """
    bsz, _, d_in = a.shape
    d_out = g.shape[-1]
    out = torch.zeros(bsz, dtype=_acc_dtype(a), device=a.device)
    rows = max(1, min(d_in, chunk_elements // d_out))
    ex = max(1, min(bsz, chunk_elements // (rows * d_out)))
    g = g.to(a.dtype)
    for b0 in range(0, bsz, ex):
        gb = g[b0:b0 + ex]
        for r0 in range(0, d_in, rows):
            m = torch.bmm(a[b0:b0 + ex, :, r0:r0 + rows].transpose(1, 2), gb)
            out[b0:b0 + ex] += m.to(out.dtype).square().sum(dim=(1, 2))
    return out


def gram_sq_norms(a: torch.Tensor, g: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """sum((A_b A_b^T) * (G_b G_b^T)) per example ("ghost norm"). Same shapes as outer_sq_norms.

    The two T x T Gram matrices are formed ``rows`` query rows at a time, in float32: the sum has
    signed terms that cancel, which low precision would not survive.
    """
    bsz, t, d_in = a.shape
    d_out = g.shape[-1]
    acc = _acc_dtype(a)
    out = torch.zeros(bsz, dtype=acc, device=a.device)
    rows = max(1, min(t, chunk_elements // (2 * t)))
    ex = max(1, min(bsz, chunk_elements // (t * (d_in + d_out) + 2 * rows * t)))
    for b0 in range(0, bsz, ex):
        ab, gb = a[b0:b0 + ex].to(acc), g[b0:b0 + ex].to(acc)
        for t0 in range(0, t, rows):
            ka = torch.bmm(ab[:, t0:t0 + rows], ab.transpose(1, 2))
            kg = torch.bmm(gb[:, t0:t0 + rows], gb.transpose(1, 2))
            out[b0:b0 + ex] += (ka * kg).sum(dim=(1, 2))
    return out


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor, has_bias: bool, method: Method = "auto",
                    chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Squared per-example gradient norm of one Linear layer (weight, plus bias if it has one).

    a: input [B, ..., d_in]; g: output gradient [B, ..., d_out]; every middle dimension counts as
    a token. Returns [B] in float32 (float64 for float64 inputs).
    """
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    g = g.reshape(g.shape[0], -1, g.shape[-1])
    if method == "auto":
        method = choose_method(a.shape[1], a.shape[2], g.shape[2])
    fn = gram_sq_norms if method == "gram" else outer_sq_norms
    sq = fn(a, g, chunk_elements)
    if has_bias:
        sq = sq + g.sum(dim=1).to(sq.dtype).square().sum(dim=1)
    return sq


def is_affine(module: nn.Module) -> bool:
    """Whether the probe handles ``module``: an ``nn.Linear`` (weight [out, in]) or transformers'
    ``Conv1D`` (GPT-2's projections: y = x W + b, weight [in, out]).

    Conv1D's per-example weight gradient is A_b^T G_b, the transpose of a Linear's G_b^T A_b, so
    its norm is the same formula. It is recognised by name and shape attributes: this module stays
    free of transformers (the pure core).
    """
    if isinstance(module, nn.Linear):
        return True
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nx", None), int)
            and isinstance(getattr(module, "nf", None), int)
            and isinstance(getattr(module, "weight", None), nn.Parameter))


def select_linears(model: nn.Module, last_blocks: int = 2, include_head: bool = True,
                   patterns: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The Linear (and Conv1D, see :func:`is_affine`) layers of the last ``last_blocks`` decoder
    blocks, the output head and every such layer whose qualified name matches one of
    ``patterns`` (fnmatch), by name in model order.

    The decoder blocks are the longest ``nn.ModuleList`` of the model (``model.layers`` in
    transformers' decoders); the head is ``model.get_output_embeddings()``. Raises ValueError
    naming the ``attent.grad_norm`` key when the model has nothing to select there, or when a
    selected layer's weight is shared with another module (tied input and output embeddings):
    the hooks would see only this layer's part of that weight's gradient.
    """
    names = {m: n for n, m in model.named_modules()}
    what = type(model).__name__
    chosen: set[nn.Module] = set()
    if last_blocks > 0:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        if not lists:
            raise ValueError("attent.grad_norm.last_blocks: the model has no nn.ModuleList of "
                             "blocks; set last_blocks to 0 and name layers in modules")
        blocks = max(lists, key=len)
        if last_blocks > len(blocks):
            raise ValueError(f"attent.grad_norm.last_blocks: got {last_blocks}; allowed: at most "
                             f"{len(blocks)} (the model's blocks)")
        found = {m for block in list(blocks)[-last_blocks:] for m in block.modules()
                 if is_affine(m)}
        if not found:
            raise ValueError(f"attent.grad_norm.last_blocks: the last {last_blocks} blocks of "
                             f"{what} ({names[blocks]}) hold no nn.Linear or Conv1D layer; set "
                             "last_blocks to 0 and name layers in modules")
        chosen.update(found)
    if include_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not is_affine(head):
            raise ValueError("attent.grad_norm.include_head: the model has no Linear or Conv1D "
                             "output head (get_output_embeddings); set include_head to false")
        chosen.add(head)
    for pattern in patterns:
        hits = [m for m, n in names.items() if is_affine(m) and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"attent.grad_norm.modules: pattern {pattern!r} matches no Linear "
                             "layer of the model; check the module names (model.named_modules())")
        chosen.update(hits)
    # Frozen layers (a LoRA base, say) train nothing: their gradient is not the one the step
    # applies, and with no trainable input they may have no graph to hook at all.
    chosen = {m for m in chosen if m.weight.requires_grad}
    if not chosen:
        raise ValueError("attent.grad_norm: no trainable layer selected (last_blocks 0, "
                         "include_head false, no modules, or every selected layer frozen); "
                         "select at least one layer whose weight trains")
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(n)
    for m in chosen:
        shared = [n for n in owners.get(id(m.weight), []) if n != names[m]]
        if shared:
            key = ("attent.grad_norm.include_head" if include_head and
                   m is model.get_output_embeddings() else "attent.grad_norm")
            raise ValueError(f"{key}: the weight of {names[m]} in {what} is shared with "
                             f"{', '.join(shared)} (tied weights, e.g. tie_word_embeddings), "
                             "whose part of its gradient the hooks cannot see; leave that layer "
                             "out (include_head: false) or untie the weights")
    return {names[m]: m for m in model.modules() if m in chosen}


@dataclass
class _Capture:
    name: str
    a: Optional[torch.Tensor]
    has_bias: bool
    out: Optional[torch.Tensor] = None  # kept only for an immediate (pool) backward


class GradNormProbe:
    """Per-example gradient norms of the selected Linear layers, from forward and tensor hooks.

    Free source (training backward)::

        with probe.recording():
            logits = model(input_ids=x).logits
        ce = token_losses(...)                   # [B, T] with grad
        scores = probe.attach(ce, mask)          # [B], filled in place during the backward
        engine.backward(loss_built_from(ce))

    Pool source (no optimizer step)::

        with torch.enable_grad():
            with probe.recording(keep_outputs=True):
                logits = model(input_ids=x).logits
            ce = token_losses(...)
        scores = probe.score_now(ce, mask)       # torch.autograd.grad to the layer outputs only

    With DeepSpeed, run the pool forward through ``engine.module``: the engine's own forward hooks
    would take this backward for a training one (gradient-accumulation scaling and reduction).
    Hooks stay registered but do nothing outside :meth:`recording`; :meth:`remove` takes them off.
    """

    def __init__(self, model: nn.Module, last_blocks: int = 2, include_head: bool = True,
                 patterns: Sequence[str] = (), method: Method = "auto",
                 chunk_elements: int = 1 << 24):
        if method not in ("auto", "outer", "gram"):
            raise ValueError(f"method: got {method!r}; allowed: 'auto', 'outer', 'gram'")
        self.layers = select_linears(model, last_blocks, include_head, patterns)
        self.method: Method = method
        self.chunk_elements = chunk_elements
        self.chosen: dict[str, str] = {}  # layer name -> method used at the last backward
        self._active = False
        self._keep_outputs = False
        self._captures: dict[str, _Capture] = {}
        self._sq: Optional[torch.Tensor] = None
        self._scale: Optional[torch.Tensor] = None  # 1 / a_b, set by the token-loss hook
        self._scores: Optional[torch.Tensor] = None
        self._handles = [m.register_forward_hook(self._make_forward_hook(n))
                         for n, m in self.layers.items()]

    @classmethod
    def from_config(cls, model: nn.Module, cfg) -> "GradNormProbe":
        """From an ``attent.grad_norm`` section (:class:`attent_scale.config.GradNormConfig`)."""
        return cls(model, cfg.last_blocks, cfg.include_head, cfg.modules, cfg.method,
                   cfg.chunk_elements)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- hooks ---------------------------------------------------------------------------------
    def _make_forward_hook(self, name: str):
        def hook(module: nn.Linear, inputs, output):
            if not self._active or not torch.is_grad_enabled():
                return None
            if name in self._captures:
                # Two uses of one weight in a forward: their gradients add before the norm, which
                # separate hooks cannot see per use.
                raise RuntimeError(f"grad_norm: layer {name} ran twice in one recorded forward; "
                                   "shared weights are not supported, leave it out of the layers")
            if not output.requires_grad:
                raise RuntimeError(f"grad_norm: the output of {name} has no graph (a reentrant "
                                   "activation checkpoint or a frozen layer?); choose other layers")
            cap = _Capture(name, inputs[0].detach(), module.bias is not None)
            if self._keep_outputs:
                cap.out = output
            self._captures[name] = cap
            output.register_hook(lambda g, cap=cap: self._on_output_grad(cap, g))
            return None
        return hook

    def _on_output_grad(self, cap: _Capture, g: torch.Tensor) -> None:
        if cap.a is None or self._scores is None:
            return None  # a second backward through the same graph, or never attached
        method = self.method
        if method == "auto":
            method = choose_method(cap.a[0].numel() // cap.a.shape[-1], cap.a.shape[-1],
                                   g.shape[-1])
        self.chosen[cap.name] = method
        with torch.no_grad():
            sq = linear_sq_norms(cap.a, g.detach(), cap.has_bias, method, self.chunk_elements)
            self._sq = sq if self._sq is None else self._sq + sq
            # Finalised after every layer, so the scores are complete whenever the backward ends
            # (B elements; cheaper than a callback at the end of the backward).
            scale = self._scale if self._scale is not None else 1.0
            self._scores.copy_((self._sq.sqrt() * scale).to(self._scores.dtype))
        cap.a = None  # drop the activation as soon as its layer is done
        return None

    @contextlib.contextmanager
    def recording(self, enabled: bool = True, keep_outputs: bool = False) -> Iterator[None]:
        """Capture the selected layers' activations during this forward (grad mode only).
        ``keep_outputs``: also keep the layer outputs, for :meth:`score_now`."""
        self._active, self._keep_outputs, self._captures = enabled, keep_outputs, {}
        self._sq = self._scale = self._scores = None
        try:
            yield
        finally:
            self._active = False

    # -- scores --------------------------------------------------------------------------------
    def attach(self, token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bind the recorded forward to its token losses [B, T] (with grad); ``mask`` [B, T] marks
        tokens that count. Returns a [B] float32 tensor that the next backward through these
        losses fills in place with each example's gradient norm (see the module docstring)."""
        if not self._captures:
            raise RuntimeError("grad_norm: nothing was recorded; run the forward inside "
                               "probe.recording() with gradients enabled")
        bsz = token_losses.shape[0]
        self._scores = torch.full((bsz,), float("nan"), dtype=torch.float32,
                                  device=token_losses.device)
        maskf = mask.to(torch.float32)

        def on_loss_grad(g: torch.Tensor) -> None:
            # a_b: what the training loss puts on example b's own mean token loss.
            a = (g.detach().to(torch.float32) * maskf).sum(dim=1)
            self._scale = torch.where(a != 0, 1.0 / a, torch.full_like(a, float("nan"))).abs()
            return None

        token_losses.register_hook(on_loss_grad)
        return self._scores

    def score_now(self, token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool scoring: differentiate the sum of the examples' own mean losses to the recorded
        layer outputs only (never to parameters, so no ``param.grad`` is touched)."""
        scores = self.attach(token_losses, mask)
        outs = [c.out for c in self._captures.values()]
        if any(o is None for o in outs):
            raise RuntimeError("grad_norm: score_now needs the forward recorded with "
                               "recording(keep_outputs=True)")
        maskf = mask.to(token_losses.dtype)
        with torch.enable_grad():  # pool passes run under no_grad
            own = (token_losses * maskf).sum(dim=1) / maskf.sum(dim=1).clamp_min(1)
            # Examples are independent in the forward, so d(sum of own losses)/d(output of b)
            # is example b's own gradient; the hooks read it on its way.
            torch.autograd.grad(own.sum(), outs)
        del outs
        for cap in self._captures.values():
            # Each kept output holds (through its gradient hook) the capture that holds it: a
            # cycle through autograd that Python's collector cannot see, which would keep every
            # pool batch's activations alive. Cut it.
            cap.out = cap.a = None
        self._captures, self._sq, self._scale, self._scores = {}, None, None, None
        return scores
