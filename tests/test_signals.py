"""Tests of the per-token / per-example teaching signals (attent_scale/signals.py).

References are computed directly (explicit softmax, autograd of the cross-entropy, an explicitly
materialised attention matrix with a Python loop over heads), never through the chunked code.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attent_scale.signals import (IGNORE_INDEX, attention_importance, example_scores,
                                  token_grad_sq_norm)


def _random_batch(seed: int, b: int = 2, t: int = 7, v: int = 13, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * scale
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 0] = IGNORE_INDEX
    labels[1, 3] = IGNORE_INDEX
    labels[1, 4] = IGNORE_INDEX
    return logits, labels


def _direct_g2(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    p = torch.softmax(z, dim=-1)
    onehot = F.one_hot(labels.clamp_min(0), z.shape[-1]).double()
    g2 = ((p - onehot) ** 2).sum(-1)
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(g2), g2)


def _autograd_g2(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    z = logits.double().detach().requires_grad_(True)
    loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), reduction="sum",
                           ignore_index=IGNORE_INDEX)
    (grad,) = torch.autograd.grad(loss, z)
    return (grad ** 2).sum(-1)


# ---- token_grad_sq_norm ----------------------------------------------------------------------------

def test_token_grad_sq_norm_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4],
                            [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 1, IGNORE_INDEX]])
    # p = 1/4 each, y = 2: 3 * (1/4)^2 + (3/4)^2 = 3/4
    # p = (1/4, 3/4, 0, 0), y = 1: (1/4)^2 + (1/4)^2 = 1/8
    out = token_grad_sq_norm(logits, labels)
    assert out.dtype == torch.float32
    assert out.shape == (1, 3)
    assert torch.allclose(out, torch.tensor([[0.75, 0.125, 0.0]]), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_grad_sq_norm_matches_direct_and_autograd_float32(seed):
    logits, labels = _random_batch(seed)
    out = token_grad_sq_norm(logits, labels)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    direct = _direct_g2(logits, labels)
    auto = _autograd_g2(logits, labels)
    assert torch.allclose(direct, auto, atol=1e-12)  # the two references agree
    assert torch.allclose(out.double(), direct, atol=2e-6, rtol=1e-5)
    assert torch.all(out[labels == IGNORE_INDEX] == 0)
    assert torch.all(out[labels != IGNORE_INDEX] > 0)
    assert torch.all(out <= 2.0 + 1e-6)  # ||p - e_y||^2 <= 2


def test_token_grad_sq_norm_bfloat16_input():
    logits, labels = _random_batch(5, scale=4.0)
    lb = logits.to(torch.bfloat16)
    out = token_grad_sq_norm(lb, labels)
    assert out.dtype == torch.float32
    ref = _autograd_g2(lb.float(), labels)  # same (bf16-rounded) logits, exact arithmetic
    assert torch.allclose(out.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 5, 10_000])
def test_token_grad_sq_norm_independent_of_chunk(chunk):
    logits, labels = _random_batch(3, b=3, t=5)
    ref = token_grad_sq_norm(logits, labels, chunk_tokens=10_000)
    out = token_grad_sq_norm(logits, labels, chunk_tokens=chunk)
    assert torch.allclose(out, ref, atol=1e-7, rtol=0)
    assert torch.allclose(out.double(), _direct_g2(logits, labels), atol=2e-6, rtol=1e-5)


def test_token_grad_sq_norm_large_logits_stable():
    logits = torch.tensor([[[1000.0, 0.0, -1000.0], [-500.0, 500.0, 499.0]]])
    labels = torch.tensor([[2, 0]])
    out = token_grad_sq_norm(logits, labels)
    # p = (1, 0, 0), y = 2: 1 + 1 = 2;  p ~ (0, e/(1+e), 1/(1+e)), y = 0: 1 + p1^2 + p2^2
    e = math.e
    p1, p2 = e / (1 + e), 1 / (1 + e)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.tensor([[2.0, 1.0 + p1 ** 2 + p2 ** 2]]), atol=1e-5)


# ---- example_scores --------------------------------------------------------------------------------

def _tiny_example():
    # example 0: token 0 masked, token 1: z = (0, 0), y = 0; token 2: z = (0, log 3), y = 1
    # example 1: every token masked
    logits = torch.tensor([
        [[7.0, -2.0], [0.0, 0.0], [0.0, math.log(3.0)]],
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
    ])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1], [IGNORE_INDEX] * 3])
    token_ce = torch.tensor([[float("nan"), math.log(2.0), math.log(4.0 / 3.0)],
                             [0.0, 0.0, 0.0]])
    importance = torch.tensor([[5.0, 2.0, 0.5], [1.0, 1.0, 1.0]])
    return logits, labels, token_ce, importance


def test_example_scores_by_hand():
    logits, labels, ce, imp = _tiny_example()
    loss = example_scores("loss", ce, labels)
    fg = example_scores("fgrad_norm", ce, labels, logits=logits)
    af = example_scores("attention_fgrad", ce, labels, logits=logits, importance=imp)
    for s in (loss, fg, af):
        assert s.shape == (2,) and s.dtype == torch.float32
        assert math.isnan(s[1].item())  # no unmasked token: no signal
    # token g2: 1/2 and 1/8
    assert loss[0].item() == pytest.approx((math.log(2.0) + math.log(4.0 / 3.0)) / 2, rel=1e-6)
    assert fg[0].item() == pytest.approx(math.sqrt((0.5 + 0.125) / 2), rel=1e-6)
    assert af[0].item() == pytest.approx(math.sqrt((2.0 * 0.5 + 0.5 * 0.125) / 2), rel=1e-6)


def test_example_scores_ignore_masked_tokens():
    logits, labels, ce, imp = _tiny_example()
    before = [example_scores("loss", ce, labels),
              example_scores("fgrad_norm", ce, labels, logits=logits),
              example_scores("attention_fgrad", ce, labels, logits=logits, importance=imp)]
    logits2, ce2, imp2 = logits.clone(), ce.clone(), imp.clone()
    logits2[0, 0] = torch.tensor([-50.0, 80.0])  # the masked token's logits
    ce2[0, 0] = 1e6
    imp2[0, 0] = 123.0
    after = [example_scores("loss", ce2, labels),
             example_scores("fgrad_norm", ce2, labels, logits=logits2),
             example_scores("attention_fgrad", ce2, labels, logits=logits2, importance=imp2)]
    for a, b in zip(before, after):
        assert a[0].item() == b[0].item()
    # ... while changing an unmasked token's logits does change the score
    logits3 = logits.clone()
    logits3[0, 1] = torch.tensor([2.0, -1.0])
    assert example_scores("fgrad_norm", ce, labels, logits=logits3)[0] != before[1][0]


def test_example_scores_random_batch_matches_direct():
    logits, labels = _random_batch(8, b=3, t=6, v=9)
    ce = F.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1), reduction="none",
                         ignore_index=IGNORE_INDEX).reshape(3, 6)
    imp = torch.rand(3, 6, generator=torch.Generator().manual_seed(1)) * 2
    g2 = _direct_g2(logits, labels)
    mask = labels != IGNORE_INDEX
    for b in range(3):
        m = mask[b]
        n = int(m.sum())
        exp_loss = ce[b][m].double().sum().item() / n
        exp_fg = math.sqrt(g2[b][m].sum().item() / n)
        exp_af = math.sqrt((imp[b][m].double() * g2[b][m]).sum().item() / n)
        assert example_scores("loss", ce, labels)[b].item() == pytest.approx(exp_loss, rel=1e-5)
        assert example_scores("fgrad_norm", ce, labels, logits=logits,
                              chunk_tokens=4)[b].item() == pytest.approx(exp_fg, rel=1e-5)
        assert example_scores("attention_fgrad", ce, labels, logits=logits, importance=imp,
                              chunk_tokens=5)[b].item() == pytest.approx(exp_af, rel=1e-5)


def test_example_scores_missing_inputs():
    logits, labels, ce, imp = _tiny_example()
    with pytest.raises(ValueError, match="logits"):
        example_scores("fgrad_norm", ce, labels)
    with pytest.raises(ValueError, match="importance"):
        example_scores("attention_fgrad", ce, labels, logits=logits)
    with pytest.raises(ValueError, match="unknown signal"):
        example_scores("entropy", ce, labels, logits=logits)


# ---- attention_importance --------------------------------------------------------------------------

def _reference_importance(q, k, scaling, allowed=None):
    """Explicit softmax(QK^T * scale) per head (loop), causal or by a boolean ``allowed`` [B,T,T];
    fully masked query rows give no mass; column sums averaged over heads, scaled to mean 1."""
    q, k = q.double(), k.double()
    b, h, t, _ = q.shape
    rep = h // k.shape[1]
    if allowed is None:
        allowed = torch.tril(torch.ones(t, t, dtype=torch.bool)).expand(b, t, t)
    out = torch.zeros(b, t, dtype=torch.float64)
    for bi in range(b):
        col = torch.zeros(t, dtype=torch.float64)
        live_rows = 0
        for hi in range(h):
            s = q[bi, hi] @ k[bi, hi // rep].T * scaling
            for i in range(t):
                row = allowed[bi, i]
                if not row.any():
                    continue
                if hi == 0:
                    live_rows += 1
                p = torch.softmax(s[i][row], dim=0)
                col[row] += p / h
        out[bi] = col / (col.sum() / t)
        assert col.sum().item() == pytest.approx(live_rows)
    return out


def test_attention_importance_uniform_by_hand():
    # zero queries: every causal row is uniform, column j receives sum_{i >= j} 1 / (i + 1)
    q = torch.zeros(1, 2, 3, 4)
    k = torch.randn(1, 2, 3, 4)
    out = attention_importance(q, k, 0.5)
    assert out.dtype == torch.float32 and out.shape == (1, 3)
    assert torch.allclose(out, torch.tensor([[11 / 6, 5 / 6, 1 / 3]]), atol=1e-6)


@pytest.mark.parametrize("query_chunk", [1, 2, 3, 7, 128])
def test_attention_importance_causal(query_chunk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 8, generator=g)
    k = torch.randn(2, 3, 7, 8, generator=g)
    out = attention_importance(q, k, 8 ** -0.5, query_chunk=query_chunk)
    ref = _reference_importance(q, k, 8 ** -0.5)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.allclose(out.mean(-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("query_chunk", [1, 3, 8])
def test_attention_importance_grouped_query(query_chunk):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 8, 6, generator=g)
    k = torch.randn(2, 2, 8, 6, generator=g)  # H = 4, Hkv = 2: heads 0,1 -> kv 0; 2,3 -> kv 1
    out = attention_importance(q, k, 0.4, query_chunk=query_chunk)
    ref = _reference_importance(q, k, 0.4)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    # the head-to-kv mapping matters: the other grouping gives a different answer
    wrong = _reference_importance(q, k[:, [0, 1]].repeat(1, 2, 1, 1), 0.4)  # kv = h % 2
    assert not torch.allclose(out.double(), wrong, atol=1e-3)


def _padded_masks(lengths, t):
    """Left padding: allowed[b, i, j] = causal and key j is a real token."""
    b = len(lengths)
    real = torch.zeros(b, t, dtype=torch.bool)
    for bi, n in enumerate(lengths):
        real[bi, t - n:] = True
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    allowed = causal[None] & real[:, None, :]
    return real, allowed


@pytest.mark.parametrize("query_chunk", [1, 4, 16])
@pytest.mark.parametrize("form", ["bool", "neg_inf", "finfo_min_f32", "finfo_min_bf16"])
def test_attention_importance_with_padding_mask(query_chunk, form):
    g = torch.Generator().manual_seed(2)
    t = 6
    q = torch.randn(2, 4, t, 5, generator=g)
    k = torch.randn(2, 2, t, 5, generator=g)
    real, allowed = _padded_masks([6, 4], t)
    if form == "bool":
        mask = allowed[:, None]
    elif form == "neg_inf":
        mask = torch.zeros(2, 1, t, t).masked_fill(~allowed[:, None], float("-inf"))
    else:  # what transformers' eager attention receives: 0 / finfo(dtype).min
        dtype = torch.float32 if form == "finfo_min_f32" else torch.bfloat16
        mask = torch.zeros(2, 1, t, t, dtype=dtype).masked_fill(~allowed[:, None],
                                                                 torch.finfo(dtype).min)
    out = attention_importance(q, k, 0.5, attention_mask=mask, query_chunk=query_chunk)
    ref = _reference_importance(q, k, 0.5, allowed)
    assert torch.allclose(out.double(), ref, atol=1e-5), (out, ref)
    assert torch.all(out[~real] == 0)  # padding receives nothing
    assert torch.allclose(out.mean(-1), torch.ones(2), atol=1e-5)
    # the unpadded sequence is the plain causal case
    assert torch.allclose(out[0], attention_importance(q[:1], k[:1], 0.5)[0], atol=1e-6)


def test_attention_importance_per_head_mask():
    g = torch.Generator().manual_seed(4)
    t = 5
    q = torch.randn(1, 2, t, 3, generator=g)
    k = torch.randn(1, 2, t, 3, generator=g)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    mask = torch.zeros(1, 2, t, t).masked_fill(~causal, float("-inf"))
    out = attention_importance(q, k, 1.0, attention_mask=mask, query_chunk=2)
    assert torch.allclose(out.double(), _reference_importance(q, k, 1.0), atol=1e-5)


def test_attention_importance_bfloat16_inputs():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 5, 4, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 1, 5, 4, generator=g).to(torch.bfloat16)
    out = attention_importance(q, k, 0.5, query_chunk=2)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), _reference_importance(q.float(), k.float(), 0.5), atol=1e-5)


# ---- the attention probe on real transformers models -----------------------------------------

def _tiny_causal_lm(kind: str, attn: str, seed: int = 0):
    """A 2-layer model of ``kind`` with the given attention implementation, in eval mode."""
    from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig,
                              Qwen2Config)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    cfg = {
        "gpt2": lambda: GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4),
        # GPT-2's eager function scales by 1/sqrt(d) / (layer + 1) with this flag; SDPA would not.
        "gpt2-layer-scaled": lambda: GPT2Config(vocab_size=64, n_positions=32, n_embd=32,
                                                n_layer=2, n_head=4,
                                                scale_attn_by_inverse_layer_idx=True),
        "llama": lambda: LlamaConfig(**common),
        # A window shorter than the sequence, so the mask is not plain causal.
        "mistral": lambda: MistralConfig(**common, sliding_window=4),
        "mistral-no-window": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common),
    }[kind]()
    torch.manual_seed(seed)  # model init only
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def _importance_from_eager_weights(model, tokens, layers):
    """The reference: the model's own eager attention probabilities (output_attentions), column
    sums averaged over heads, normalised to mean 1 per sequence, averaged over ``layers``."""
    with torch.no_grad():
        attentions = model(input_ids=tokens, output_attentions=True).attentions
    per_layer = []
    for layer in layers:
        col = attentions[layer].double().sum(dim=2).mean(dim=1)  # [B, T]
        per_layer.append(col / col.mean(dim=-1, keepdim=True))
    return torch.stack(per_layer).mean(0)


@pytest.mark.parametrize("kind, base", [
    ("gpt2", "sdpa"), ("gpt2", "eager"), ("gpt2-layer-scaled", "eager"),
    ("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("mistral", "eager"),
    ("qwen2", "sdpa"), ("qwen2", "eager")])
def test_attention_probe_on_transformers_models(kind, base):
    """Through transformers' attention interface, on each architecture: the importance equals
    the one from the model's own eager attention probabilities (so the scaling, the grouped keys
    and the sliding-window mask are the model's), and the model's logits are unchanged."""
    from attent_scale.attention import AttentionImportance
    tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(5))
    model = _tiny_causal_lm(kind, base)
    with torch.no_grad():
        plain = model(input_ids=tokens).logits
    probe = AttentionImportance(model, layers=[0, -1], query_chunk=5)
    with torch.no_grad(), probe.recording():
        logits = model(input_ids=tokens).logits
    imp = probe.pop()
    assert torch.equal(logits, plain)  # the probe only looks
    assert imp.shape == (3, 12) and torch.isfinite(imp).all()
    torch.testing.assert_close(imp.mean(-1), torch.ones(3), rtol=0, atol=1e-5)
    ref = _importance_from_eager_weights(_tiny_causal_lm(kind, "eager"), tokens, [0, 1])
    torch.testing.assert_close(imp.double(), ref, rtol=0, atol=1e-5)
    # The check can fail: the layers' attention differs, and differs from uniform.
    assert (imp - 1).abs().max() > 0.1


def test_attention_probe_scaling_and_sliding_window_matter():
    """The reference above would catch a wrong scale or a missed window: both change it."""
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    layer_scaled = _importance_from_eager_weights(_tiny_causal_lm("gpt2-layer-scaled", "eager"),
                                                  tokens, [1])
    plain = _importance_from_eager_weights(_tiny_causal_lm("gpt2", "eager"), tokens, [1])
    assert (layer_scaled - plain).abs().max() > 1e-3
    windowed = _importance_from_eager_weights(_tiny_causal_lm("mistral", "eager"), tokens, [0])
    full = _importance_from_eager_weights(_tiny_causal_lm("mistral-no-window", "eager"),
                                          tokens, [0])
    # Token 0 is seen by 4 queries instead of 12: about 1 + 1/2 + 1/3 + 1/4 against ~3.1.
    assert (full[:, 0] - windowed[:, 0]).min() > 0.5


def test_dense_mask_spells_out_what_flash_attention_is_given():
    """Flash attention gets None or a [B, T] padding mask (and applies causality and the sliding
    window itself); the probe needs the [B, 1, T, T] form."""
    from attent_scale.attention import dense_mask
    t = 6
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    assert dense_mask(None, t) is None
    assert dense_mask(None, t, sliding_window=t) is None  # a window this long changes nothing
    assert torch.equal(dense_mask(None, t, sliding_window=3), ((j <= i) & (i - j < 3))[None, None])
    expected = (j <= i)[None, None] & real.bool()[:, None, None, :]
    assert torch.equal(dense_mask(real, t), expected)
    assert torch.equal(dense_mask(real, t, 3), expected & (i - j < 3))
    four_d = torch.zeros(2, 1, t, t)
    assert dense_mask(four_d, t, 3) is four_d  # SDPA and eager masks hold the window already
    # What the probe computes from the flash form equals what it computes from the dense one.
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 4, t, 8, generator=g), torch.randn(2, 2, t, 8, generator=g)
    torch.testing.assert_close(attention_importance(q, k, 0.3, dense_mask(real, t, 3)),
                               attention_importance(q, k, 0.3, expected & (i - j < 3)))


def test_attention_probe_refuses_a_model_it_cannot_see_into():
    """A model whose attention does not go through the attention interface (CTRL) is refused
    when the probe is built, as a ConfigError naming attent.signal and the model."""
    from transformers import CTRLConfig, CTRLLMHeadModel

    from attent_scale.attention import AttentionImportance
    from attent_scale.config import ConfigError, parse_attent
    from attent_scale.teaching import make_probe
    model = CTRLLMHeadModel(CTRLConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                       n_head=4, dff=64))
    with pytest.raises(ValueError, match=r"CTRLLMHeadModel's attention does not go through "
                                         r"transformers' attention interface"):
        AttentionImportance(model, [-1])
    assert model.config._attn_implementation == "eager"  # left as it was
    with pytest.raises(ConfigError, match=r"attent.signal: got 'attention_fgrad', which "
                                          r"CTRLLMHeadModel cannot provide"):
        make_probe(model, parse_attent({"signal": "attention_fgrad"}))
    with pytest.raises(ValueError, match=r"attent.attention.layers: \[2\] out of range"):
        AttentionImportance(_tiny_causal_lm("gpt2", "sdpa"), [2])
