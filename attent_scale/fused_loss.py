"""Per-token next-token cross-entropy from the final hidden states and the output head, fused.

The training loss and the teacher's free scores both reduce one tensor: the per-token losses
``ce`` [B, T-1]. The usual way to get it materialises the logits [B, T, V] in bf16, casts them to
float32 and runs a log-softmax over them: at 16k tokens x 8192 vocabulary that is 256 MiB of logits
and 1.5 GiB of float32 copies per micro batch, several passes over memory that do no matmul work.
This module computes the same per-token losses from ``hidden`` [B, T, D] and the head weight [V, D]
without ever holding [B, T, V]:

    out = fused_token_losses(hidden, lm_head.weight, input_ids, impl="auto")
    loss = out.ce.mean(dim=1).mean()              # what the job trains on
    scores = scores_from_token_losses(out, "loss")  # what the teacher records (detached)

Implementations (``impl``):

- ``torch``: the materialised reference (``F.linear`` then ``F.cross_entropy`` in float32).
- ``chunked``: a custom autograd Function over token chunks: the forward keeps only each token's
  log-sum-exp, the backward recomputes a chunk's logits and turns them straight into the gradient.
  Pure torch, works on any device; the fallback everywhere.
- ``compiled``: ``chunked`` with each chunk's elementwise work fused by ``torch.compile`` (one pass
  over a chunk's logits instead of about six); a few seconds of compilation per (D, V, dtype).
- ``liger``: Liger Kernel's fused linear cross-entropy with ``reduction="none"`` (>= 0.8.2: older
  releases return wrong weight gradients for per-token losses). Its forward syncs the host once
  (``.item()`` on the count of valid labels).
- ``cce``: Apple's cut-cross-entropy with ``reduction="none"``. Needs bf16/fp16 hidden states.
  By default it skips gradient blocks whose softmax entries are all below ~2.4e-4 ("gradient
  filtering"), so its gradients are close to, not equal to, the reference. Its forward syncs once
  (``nonzero`` on the labels).
- ``auto``: on CPU, ``chunked``. On CUDA, the fastest of the fused ones that can run (installed,
  supported dtype, and able to give ``fgrad`` when asked), timed once per shape with CUDA events
  on the caller's own tensors; :func:`auto_choices` says what was picked and why, for the job's log.
  Ranks time independently and may pick different kernels; pass an explicit ``impl`` to rule that
  out (each kernel matches the reference to bf16 rounding, so only the last bits differ).

Signals under the fused path (the teacher's ``signal``):

- ``loss``: the per-token losses above, detached; no extra work.
- ``fgrad_norm``: ``fgrad=True`` returns ||softmax(z) - onehot(y)||^2 = sum p^2 - 2 p_y + 1 per
  token (``fgrad_sq``), from one more log-sum-exp over each chunk the forward already holds (only
  ``torch``, ``chunked`` and ``compiled``: Liger and CCE do not expose it).
- ``attention_fgrad``: the same ``fgrad_sq`` times the attention probe's importance; the probe's own
  cost (a chunked recomputation of the probed layers' attention) is unchanged by this module, and the
  probed layers must run uncompiled (the probe records from inside the attention call).
- ``grad_norm``: its probe hooks the output head's forward, which the fused path never calls; use
  ``impl="torch"`` with it, or set ``grad_norm.include_head: false`` (its other layers still work).

Where the head weight is valid to read directly (see :func:`enable_token_losses`): DeepSpeed ZeRO
0-2 (full parameters on every rank); ZeRO-3, where DeepSpeed gathers a partitioned parameter read
inside the root module's forward and registers it as an external parameter; FSDP2 when the head sits
in the root's ``fully_shard`` group (attent_scale.fsdp_plugin.shard), which is unsharded during the
root's forward and backward. Not supported: tensor-parallel or vocabulary-parallel heads, output
heads with a bias, and models that scale or soft-cap their logits (Gemma 2/3, Cohere, Granite):
:func:`check_head` refuses those, use ``impl="torch"``.

Pure module: torch only (no torch.distributed, DeepSpeed or transformers import); the optional
kernels are imported when first used.
"""
from __future__ import annotations

import functools
import importlib.metadata
import statistics
import types
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .signals import IGNORE_INDEX, example_scores, token_grad_sq_norm

IMPLS = ("auto", "torch", "chunked", "compiled", "liger", "cce")
# What auto times on CUDA, and which of them can also return fgrad_sq.
AUTO_CANDIDATES = ("liger", "cce", "compiled", "chunked")
FGRAD_IMPLS = ("torch", "chunked", "compiled")
LIGER_MIN_VERSION = (0, 8, 2)  # reduction="none" weight gradients fixed in linkedin/Liger-Kernel#1298
# A chunk's float32 logits take at most this many elements (128 MiB): big enough that each chunk's
# head matmul runs near peak, small enough to be noise next to the activations.
CHUNK_ELEMENTS = 1 << 25


class FusedLossError(ValueError):
    """A call this module cannot serve (one line: what, where, how to fix)."""


class TokenLosses(NamedTuple):
    """What :func:`fused_token_losses` returns (a tuple, so DeepSpeed's output hooks see ``ce``)."""

    ce: torch.Tensor
    """float32 [B, T'] per-token cross-entropy with autograd; 0 where the label is -100."""
    labels: torch.Tensor
    """int64 [B, T'] the targets ``ce`` was computed against (-100 where masked)."""
    fgrad_sq: Optional[torch.Tensor]
    """float32 [B, T'] detached ||softmax - onehot||^2 per token (0 where masked), or None."""
    impl: str
    """The implementation that ran (``auto`` resolved)."""


# -- chunked: pure torch ------------------------------------------------------------------------

def _chunk_forward(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, want_fgrad: bool):
    """(ce, lse, fgrad_sq or None) of one chunk; h [c, D] and w [V, D] already in compute dtype."""
    # The logits are rounded to the compute dtype exactly as the materialised head's output is,
    # so both paths see the same numbers.
    z = (h @ w.t()).float()
    lse = torch.logsumexp(z, dim=-1)
    valid = y != IGNORE_INDEX
    zy = z.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce = torch.where(valid, lse - zy, torch.zeros_like(lse))
    if not want_fgrad:
        return ce, lse, None
    # Same algebra as signals.token_grad_sq_norm: sum_i p_i^2 = exp(lse(2z) - 2 lse(z)).
    sum_p2 = torch.exp(torch.logsumexp(2.0 * z, dim=-1) - 2.0 * lse)
    p_y = torch.exp(zy - lse)
    g2 = (sum_p2 - 2.0 * p_y + 1.0).clamp_min(0.0)
    return ce, lse, torch.where(valid, g2, torch.zeros_like(g2))


def _chunk_dlogits(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
                   grad_ce: torch.Tensor) -> torch.Tensor:
    """d(sum grad_ce * ce)/d logits of one chunk, in the compute dtype: (softmax - onehot) * g."""
    z = (h @ w.t()).float()
    p = torch.exp(z - lse.unsqueeze(-1))
    onehot = torch.arange(z.shape[-1], device=z.device) == y.unsqueeze(-1)
    # Masked rows get weight 0 whatever the upstream gradient holds there (it may be NaN when a
    # caller divides by a zero token count).
    scale = torch.where(y != IGNORE_INDEX, grad_ce.float(), torch.zeros_like(lse))
    return ((p - onehot.to(p.dtype)) * scale.unsqueeze(-1)).to(h.dtype)


@dataclass
class _Kernels:
    forward: Callable
    dlogits: Callable
    pad: bool  # compiled kernels see one chunk shape: the tail chunk is padded with ignored rows


_EAGER = _Kernels(_chunk_forward, _chunk_dlogits, pad=False)


@functools.lru_cache(maxsize=None)
def _compiled_kernels() -> _Kernels:
    # Static shapes: with the tail padded every chunk has the same shape, so each (D, V, dtype)
    # compiles once, and a static V lets the log-sum-exp reduce in one pass.
    return _Kernels(torch.compile(_chunk_forward, dynamic=False),
                    torch.compile(_chunk_dlogits, dynamic=False), pad=True)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: the autocast dtype where autocast is on."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def _accumulate_wgrad(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc [V, D] float32 += g^T h, summed in float32 across chunks."""
    if g.dtype == acc.dtype:
        acc.addmm_(g.t(), h)
        return
    if acc.is_cuda and _FP32_OUT_MM[0]:
        try:
            # bf16 operands, float32 result: no per-chunk rounding of the partial sums.
            torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            _FP32_OUT_MM[0] = False  # this torch has no out_dtype matmul; round per chunk
    acc += (g.t() @ h).float()


_FP32_OUT_MM = [True]


def _chunks(n: int, chunk: int, pad: bool):
    """(start, stop, padded size) of each chunk; padded size > stop - start only for a padded tail."""
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        yield s, e, (chunk if pad and n > chunk else e - s)


def _padded(t: torch.Tensor, size: int, value) -> torch.Tensor:
    if t.shape[0] == size:
        return t
    out = t.new_full((size,) + tuple(t.shape[1:]), value)
    out[:t.shape[0]] = t
    return out


class _ChunkedLinearCE(torch.autograd.Function):
    """ce [N] (and fgrad_sq [N]) from hidden [N, D], weight [V, D], labels [N], chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, want_fgrad, kernels):
        cdtype = _compute_dtype(hidden)
        n = hidden.shape[0]
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(ce)
        g2 = torch.empty_like(ce) if want_fgrad else ce.new_zeros(0)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)
            for s, e, size in _chunks(n, chunk, kernels.pad):
                h = _padded(hidden[s:e].to(cdtype), size, 0)
                y = _padded(labels[s:e], size, IGNORE_INDEX)
                c, lse_c, g2_c = kernels.forward(h, w, y, want_fgrad)
                ce[s:e], lse[s:e] = c[:e - s], lse_c[:e - s]
                if want_fgrad:
                    g2[s:e] = g2_c[:e - s]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk, ctx.kernels, ctx.cdtype = chunk, kernels, cdtype
        ctx.mark_non_differentiable(g2)
        return ce, g2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce, _grad_g2):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_ce is None or not (need_h or need_w):
            return None, None, None, None, None, None
        cdtype, kernels = ctx.cdtype, ctx.kernels
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        # float32 across chunks: the materialised path rounds the head's gradient once, so the
        # chunked one must not round once per chunk.
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if need_w else None)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)
            for s, e, size in _chunks(n, ctx.chunk, kernels.pad):
                h = _padded(hidden[s:e].to(cdtype), size, 0)
                g = kernels.dlogits(h, w, _padded(labels[s:e], size, IGNORE_INDEX),
                                    _padded(lse[s:e], size, 0.0),
                                    # contiguous: a mean's upstream gradient is an
                                    # expanded scalar, whose strides would recompile the kernel
                                    _padded(grad_ce[s:e].float().contiguous(), size, 0.0))
                if need_h:
                    grad_h[s:e] = (g @ w)[:e - s].to(grad_h.dtype)
                if need_w:
                    _accumulate_wgrad(grad_w, g, h)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def default_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk for a vocabulary of ``vocab``: CHUNK_ELEMENTS float32 logits at most."""
    return max(16, CHUNK_ELEMENTS // max(1, vocab))


# -- the optional kernels -------------------------------------------------------------------------

def _version(dist: str) -> Optional[tuple]:
    try:
        raw = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in raw.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def unavailable(impl: str, hidden: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why ``impl`` cannot run here (on ``hidden``'s device and dtype), or None when it can."""
    cuda = hidden is None or hidden.is_cuda
    if impl in ("torch", "chunked"):
        return None
    if impl == "compiled":
        # Allowed on CPU when asked for by name (inductor needs a C++ compiler there); auto on CPU
        # never times or picks it.
        return None
    if impl == "liger":
        version = _version("liger-kernel")
        if version is None:
            return "liger-kernel is not installed (pip install 'liger-kernel>=0.8.2')"
        if version < LIGER_MIN_VERSION:
            return (f"liger-kernel {'.'.join(map(str, version))} returns wrong weight gradients "
                    "for per-token losses (fixed in 0.8.2); pip install 'liger-kernel>=0.8.2'")
        return None if cuda else "liger-kernel's Triton kernels need a CUDA device"
    if impl == "cce":
        if _version("cut-cross-entropy") is None:
            return "cut-cross-entropy is not installed (pip install cut-cross-entropy)"
        if not cuda:
            return "cut-cross-entropy's Triton kernels need a CUDA device"
        if hidden is not None and _compute_dtype(hidden) not in (torch.bfloat16, torch.float16):
            return (f"cut-cross-entropy needs bf16/fp16 hidden states (got {hidden.dtype} without "
                    "autocast); train in bf16 or use 'chunked'/'liger'")
        return None
    raise FusedLossError(f"impl {impl!r}: unknown; allowed: {', '.join(IMPLS)}")


def _liger(h2: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    # float32 weight-gradient accumulation across Liger's chunks, as the chunked path does.
    return liger_fused_linear_cross_entropy(h2, w, y, ignore_index=IGNORE_INDEX,
                                            reduction="none", accum_dtype=torch.float32)


def _cce(hidden: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy
    # Keywords only: the positional order changed between releases (a bias argument was added).
    return linear_cross_entropy(hidden, w, labels, ignore_index=IGNORE_INDEX, reduction="none",
                                shift=shift)


# -- the one entry point ---------------------------------------------------------------------------

def fused_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       impl: str = "auto", *, shift: bool = True, fgrad: bool = False,
                       chunk_tokens: Optional[int] = None) -> TokenLosses:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``labels``, without the logits.

    hidden: [B, T, D] final hidden states (after the last norm), any float dtype; under autocast
        the head runs in the autocast dtype, as ``nn.Linear`` would.
    weight: [V, D] the output head's weight (no bias).
    labels: [B, T] int token ids, -100 where a token must not count. With ``shift`` (the default)
        these are the input ids in the Hugging Face convention and position t is scored against
        label t+1, giving [B, T-1]; with ``shift=False`` label t is position t's target, [B, T].
    impl: see the module doc. ``fgrad=True`` also returns ``fgrad_sq`` (see :class:`TokenLosses`).
    chunk_tokens: tokens per chunk for chunked/compiled (default: :func:`default_chunk_tokens`).
    """
    if impl not in IMPLS:
        raise FusedLossError(f"impl {impl!r}: unknown; allowed: {', '.join(IMPLS)}")
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise FusedLossError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do "
                             "not match: pass hidden [..., D] and the head's weight [V, D]")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]) or labels.is_floating_point():
        raise FusedLossError(f"labels {tuple(labels.shape)} {labels.dtype} must be integer ids of "
                             f"shape {tuple(hidden.shape[:-1])} (hidden without its last dim)")
    if shift and hidden.shape[-2] < 2:
        raise FusedLossError(f"hidden {tuple(hidden.shape)}: shift=True needs sequences of at "
                             "least 2 tokens (position t is scored against label t+1)")
    if impl == "auto":
        impl = choose_impl(hidden, weight, labels, shift=shift, fgrad=fgrad).impl
    elif fgrad and impl not in FGRAD_IMPLS:
        raise FusedLossError(f"fgrad=True: impl {impl!r} does not expose the per-token softmax; "
                             f"use one of {', '.join(FGRAD_IMPLS)} (or 'auto') for fgrad_norm")
    else:
        why = unavailable(impl, hidden)
        if why is not None:
            raise FusedLossError(f"impl {impl!r} cannot run here: {why}")
    return _dispatch(impl, hidden, weight, labels, shift, fgrad, chunk_tokens)


def _dispatch(impl, hidden, weight, labels, shift, fgrad, chunk_tokens) -> TokenLosses:
    targets = labels[..., 1:] if shift else labels
    if impl == "cce":
        cdtype = _compute_dtype(hidden)
        # CCE 25.1 has no autocast handling of its own: cast here, autograd casts the grads back.
        ce = _cce(hidden.to(cdtype), weight.to(cdtype), labels, shift)
        return TokenLosses(_own(ce), targets, None, impl)
    h = hidden[..., :-1, :] if shift else hidden
    out_shape = targets.shape
    h2 = h.reshape(-1, h.shape[-1])
    y = targets.reshape(-1)
    if impl == "torch":
        logits = F.linear(h2, weight)
        ce = F.cross_entropy(logits.float(), y, reduction="none", ignore_index=IGNORE_INDEX)
        g2 = token_grad_sq_norm(logits.detach(), y).view(out_shape) if fgrad else None
        return TokenLosses(_own(ce.view(out_shape)), targets, g2, impl)
    if impl == "liger":
        cdtype = _compute_dtype(hidden)
        ce = _liger(h2.to(cdtype), weight.to(cdtype), y)
        return TokenLosses(_own(ce.view(out_shape)), targets, None, impl)
    kernels = _compiled_kernels() if impl == "compiled" else _EAGER
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    ce, g2 = _ChunkedLinearCE.apply(h2, weight, y, chunk, fgrad, kernels)
    return TokenLosses(_own(ce.view(out_shape)), targets,
                       g2.view(out_shape) if fgrad else None, impl)


def _own(ce: torch.Tensor) -> torch.Tensor:
    # FSDP2 warns about (and in-place ops would break) a view returned from the root's forward;
    # the copy is B x T floats.
    return ce.clone() if ce._is_view() else ce


@torch.no_grad()
def scores_from_token_losses(out: TokenLosses, signal: str = "loss",
                             importance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The teacher's per-example scores [B] (float32) from a fused forward's per-token outputs.

    Equal to attent_scale.signals.example_scores on the materialised logits: ``loss`` is the mean
    of ``ce`` over unmasked tokens; ``fgrad_norm`` the square root of the mean of ``fgrad_sq``
    (ask for ``fgrad=True``); ``attention_fgrad`` the same with each token weighted by
    ``importance`` [B, T']. An example without unmasked tokens scores NaN, as there.
    """
    if signal not in ("loss", "fgrad_norm", "attention_fgrad"):
        raise FusedLossError(f"signal {signal!r}: unknown; allowed: loss, fgrad_norm, "
                             "attention_fgrad (grad_norm comes from its own probe)")
    if signal != "loss" and out.fgrad_sq is None:
        raise FusedLossError(f"signal {signal!r} needs fgrad_sq: call with fgrad=True and impl "
                             f"one of {', '.join(FGRAD_IMPLS)} or 'auto'")
    if signal == "attention_fgrad" and importance is None:
        raise FusedLossError("signal 'attention_fgrad' needs the attention importance [B, T']")
    return example_scores(signal, out.ce.detach(), out.labels, importance=importance,
                          g2=out.fgrad_sq)


# -- auto ---------------------------------------------------------------------------------------

@dataclass
class Choice:
    """What ``auto`` picked for one shape, and why (for the job's log)."""

    impl: str
    reason: str
    ms: dict = field(default_factory=dict)       # measured candidates: median ms of fwd(+bwd)
    skipped: dict = field(default_factory=dict)  # candidate -> why it was not timed or failed


_CHOICES: dict[tuple, Choice] = {}


def auto_choices() -> list[Choice]:
    """Every decision ``auto`` made in this process, oldest first."""
    return list(_CHOICES.values())


def choose_impl(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                shift: bool = True, fgrad: bool = False, reps: int = 3) -> Choice:
    """The implementation ``auto`` uses for these tensors (decided once per shape and mode)."""
    grad = torch.is_grad_enabled()
    key = (hidden.device, hidden.dtype, weight.dtype, _compute_dtype(hidden),
           tuple(hidden.shape), tuple(weight.shape), shift, fgrad, grad)
    if key in _CHOICES:
        return _CHOICES[key]
    if not hidden.is_cuda:
        choice = Choice("chunked", f"auto on {hidden.device.type}: 'chunked' (the fused kernels "
                                   "need CUDA; no timing)")
    else:
        skipped = {}
        for impl in AUTO_CANDIDATES:
            if fgrad and impl not in FGRAD_IMPLS:
                skipped[impl] = "gives no fgrad_sq"
            elif (why := unavailable(impl, hidden)) is not None:
                skipped[impl] = why
        ms = {}
        for impl in (i for i in AUTO_CANDIDATES if i not in skipped):
            try:
                ms[impl] = _time_impl(impl, hidden, weight, labels, shift, fgrad, grad, reps)
            except Exception as exc:  # noqa: BLE001 - a kernel that fails here is not a candidate
                skipped[impl] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if ms:
            best = min(ms, key=ms.get)
            timed = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(ms.items(), key=lambda kv: kv[1]))
            reason = f"auto: '{best}', fastest {'forward+backward' if grad else 'forward'} of {timed}"
        else:
            best, reason = "chunked", "auto: 'chunked', no fused kernel could be timed"
        if skipped:
            reason += "; not used: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
        shape = f"{tuple(hidden.shape)} x {tuple(weight.shape)} {hidden.dtype}"
        choice = Choice(best, f"{reason} [{shape}]", ms, skipped)
    _CHOICES[key] = choice
    return choice


def _time_impl(impl, hidden, weight, labels, shift, fgrad, grad, reps) -> float:
    # Detached copies: the timing must neither build on the caller's graph nor fire the training
    # framework's gradient hooks on the real parameters.
    h = hidden.detach().requires_grad_(grad)
    w = weight.detach().requires_grad_(grad)
    upstream = None

    def once():
        nonlocal upstream
        out = _dispatch(impl, h, w, labels, shift, fgrad, None)
        if grad:
            if upstream is None:
                upstream = torch.rand_like(out.ce)
            out.ce.backward(upstream)
            h.grad = w.grad = None

    with torch.enable_grad() if grad else torch.no_grad():
        once()  # first call: Triton JIT, torch.compile, CCE's argsort compile
        once()
        times = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
    return statistics.median(times)


# -- Hugging Face causal LMs ----------------------------------------------------------------------

# Config fields that change the logits after the head's matmul; a fused kernel would skip them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_multiplier_scale")


def check_head(model: torch.nn.Module) -> torch.nn.Module:
    """The model's decoder (the base model) after checking its head is a plain bias-free Linear."""
    name = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise FusedLossError(f"{name}: no output head found (get_output_embeddings()); the fused "
                             "loss needs a causal LM with a linear head; use impl='torch'")
    if getattr(head, "bias", None) is not None:
        raise FusedLossError(f"{name}: the output head has a bias, which the fused kernels do not "
                             "add; use impl='torch'")
    config = getattr(model, "config", None)
    for key in _LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            raise FusedLossError(f"{name}: config.{key}={value} transforms the logits after the "
                                 "head, which the fused kernels skip; use impl='torch'")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        prefix = getattr(model, "base_model_prefix", "model")
        decoder = getattr(model, prefix, None)
    if decoder is None:
        raise FusedLossError(f"{name}: no decoder found (get_decoder() or .{prefix}); "
                             "use impl='torch'")
    return decoder


def causal_lm_token_losses(model: torch.nn.Module, input_ids: torch.Tensor, impl: str = "auto",
                           *, labels: Optional[torch.Tensor] = None,
                           attention_mask: Optional[torch.Tensor] = None, fgrad: bool = False,
                           chunk_tokens: Optional[int] = None) -> TokenLosses:
    """:func:`fused_token_losses` of a Hugging Face causal LM: decoder, then the head's weight.

    ``labels`` default to ``input_ids`` (next-token prediction on every position); pass -100 where
    a token must not count (padding, prompt). ``impl="torch"`` calls the model's own head.
    """
    decoder = check_head(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    # Read the head's weight here, inside the model's forward: ZeRO-3 gathers it on this access.
    weight = model.get_output_embeddings().weight
    return fused_token_losses(hidden, weight, input_ids if labels is None else labels, impl,
                              fgrad=fgrad, chunk_tokens=chunk_tokens)


def _forward_with_token_losses(self, *args, token_losses: bool = False, impl: Optional[str] = None,
                               fgrad: bool = False, **kwargs):
    if not token_losses:
        return type(self).forward(self, *args, **kwargs)
    input_ids = kwargs.pop("input_ids", args[0] if args else None)
    if input_ids is None:
        raise FusedLossError("model(token_losses=True) needs input_ids")
    return causal_lm_token_losses(self, input_ids, impl or self.attent_token_loss_impl,
                                  labels=kwargs.pop("labels", None),
                                  attention_mask=kwargs.pop("attention_mask", None), fgrad=fgrad)


def enable_token_losses(model: torch.nn.Module, impl: str = "auto") -> torch.nn.Module:
    """Let ``model(input_ids=x, token_losses=True)`` return :class:`TokenLosses`; returns model.

    Every other call is the model's own forward (logits for evaluation and export stay as they
    were). The training step must go through the framework's wrapper (``engine(...)`` for
    DeepSpeed, the FSDP2 root module's call): DeepSpeed's forward resets its gradient accumulation
    state and hooks the outputs, and FSDP2's root unshards the head there, so calling the decoder
    directly would be wrong under both. The state dict is untouched (the forward is replaced on
    the instance, not the module tree).
    """
    check_head(model)
    if impl not in IMPLS:
        raise FusedLossError(f"impl {impl!r}: unknown; allowed: {', '.join(IMPLS)}")
    model.attent_token_loss_impl = impl
    model.forward = types.MethodType(_forward_with_token_losses, model)
    return model
