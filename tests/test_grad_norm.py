"""The grad_norm signal: per-example gradient norms from hooks equal torch.func's per-example
gradients (one rank, Llama's Linear and GPT-2's Conv1D layers; two ZeRO-3 ranks; two FSDP2 ranks),
and the real job runs with it."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from attent_scale.grad_norm import (GradNormProbe, choose_method, gram_sq_norms, outer_sq_norms,
                                    select_linears)
from conftest import ROOT, free_port, run_job, write_config
from gradnorm_worker import IGNORE, batch, reference_norms, tiny_llama, token_ce

def probe_norms_free(model, probe, tokens, labels, weights, loss_kind):
    """The probe during a training-style backward whose loss is NOT the per-example loss."""
    model.zero_grad(set_to_none=True)
    with probe.recording():
        logits = model(input_ids=tokens).logits
    ce = token_ce(logits, labels)
    mask = labels != IGNORE
    scores = probe.attach(ce, mask)
    if loss_kind == "weighted-mean":
        # pretrain.py's loss (per-example means, teacher weights, batch mean) over 3 accumulation
        # micro-steps, as DeepSpeed scales it.
        per_example = ce.sum(1) / mask.sum(1)
        loss = (per_example * weights).mean() / 3
    else:
        loss = ce.sum() / mask.sum()  # one token mean over the whole batch
    loss.backward()
    return scores


def test_probe_matches_torch_func_for_each_method_and_loss_normalisation():
    model = tiny_llama()
    tokens, labels = batch()
    probe = GradNormProbe(model, last_blocks=1, include_head=True)
    names = list(probe.layers)
    assert names[-1] == "lm_head" and all(n.startswith("model.layers.1.") for n in names[:-1])
    ref = reference_norms(model, names, tokens, labels)
    assert ref.min() > 0 and ref.std() > 0.01 * ref.mean()  # examples differ: the check can fail
    weights = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    for method in ("outer", "gram", "auto"):
        probe.method = method
        for kind in ("weighted-mean", "token-mean"):
            got = probe_norms_free(model, probe, tokens, labels, weights, kind)
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    # float32 scores of float64 math: 1e-5 is the float32 rounding, not slack in the method.
    assert set(probe.chosen.values()) <= {"outer", "gram"}
    probe.remove()


def test_two_exact_forms_agree_and_chunking_changes_nothing():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(5, 7, 9, generator=gen, dtype=torch.float64)
    direct = torch.einsum("bti,bto->bio", a, g).square().sum((1, 2))
    for chunk in (1, 5, 37, 10**9):
        torch.testing.assert_close(outer_sq_norms(a, g, chunk), direct, rtol=1e-12, atol=0)
        torch.testing.assert_close(gram_sq_norms(a, g, chunk), direct, rtol=1e-12, atol=0)
    # The cheaper form by multiply-adds per example: T^2 (din + dout) vs T din dout.
    assert choose_method(1024, 768, 8192) == "outer"
    assert choose_method(16, 768, 8192) == "gram"


def test_pool_scores_touch_no_parameter_gradient_and_chunking_is_identical():
    model = tiny_llama()
    tokens, labels = batch()
    ref = None
    for chunk in (1 << 24, 50):
        probe = GradNormProbe(model, last_blocks=2, include_head=False,
                              patterns=["lm_head"], chunk_elements=chunk)
        if ref is None:
            ref = reference_norms(model, list(probe.layers), tokens, labels)
        with torch.no_grad():  # as a pool pass runs
            with torch.enable_grad():
                with probe.recording(keep_outputs=True):
                    logits = model(input_ids=tokens).logits
                ce = token_ce(logits, labels)
            got = probe.score_now(ce, labels != IGNORE)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
        assert all(p.grad is None for p in model.parameters())
        probe.remove()


def test_pool_scoring_frees_each_batch_of_activations():
    """A kept layer output holds, through its gradient hook, the capture that holds it; unless
    score_now cuts that cycle, every pool batch's activations stay alive (an H100 ran out of
    memory after a few dozen batches of the 100M model before the fix)."""
    import gc
    import weakref
    model = tiny_llama()
    tokens, labels = batch()
    probe = GradNormProbe(model, last_blocks=2, include_head=True)
    seen = []
    spy = model.lm_head.register_forward_hook(lambda m, i, out: seen.append(weakref.ref(out)))
    for _ in range(3):
        with torch.no_grad():
            with torch.enable_grad():
                with probe.recording(keep_outputs=True):
                    logits = model(input_ids=tokens).logits
                ce = token_ce(logits, labels)
            probe.score_now(ce, labels != IGNORE)
        del logits, ce
    gc.collect()
    spy.remove()
    assert len(seen) == 3 and all(ref() is None for ref in seen), "pool outputs were kept alive"


def test_selection_errors_name_the_key():
    model = tiny_llama(torch.float32)
    assert len(select_linears(model, last_blocks=2, include_head=False)) == 14
    with pytest.raises(ValueError, match="attent.grad_norm.last_blocks: got 3"):
        select_linears(model, last_blocks=3)
    with pytest.raises(ValueError, match="attent.grad_norm.modules: pattern 'nope.*'"):
        select_linears(model, last_blocks=0, patterns=["nope.*"])


def tiny_gpt2(tie: bool, dtype=torch.float64, seed=0):
    """2 blocks of transformers' Conv1D projections (weight [in, out]); no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie,
                     attn_implementation="eager")
    torch.manual_seed(seed)  # model init only
    return GPT2LMHeadModel(cfg).to(dtype)


def test_gpt2_conv1d_layers_match_torch_func():
    """GPT-2's Conv1D layers (y = x W + b) are scored with the Linear formula, exactly."""
    model = tiny_gpt2(tie=False)
    tokens, labels = batch()
    probe = GradNormProbe(model, last_blocks=1, include_head=True)
    assert list(probe.layers) == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
                                  "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj",
                                  "lm_head"]
    assert type(probe.layers["transformer.h.1.mlp.c_fc"]).__name__ == "Conv1D"
    ref = reference_norms(model, list(probe.layers), tokens, labels)
    assert ref.min() > 0 and ref.std() > 0.01 * ref.mean()
    weights = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    for method in ("outer", "gram"):
        probe.method = method
        got = probe_norms_free(model, probe, tokens, labels, weights, "weighted-mean")
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    # The blocks alone (no head): the Conv1D part by itself is exact too, and not the whole.
    blocks = GradNormProbe(model, last_blocks=2, include_head=False)
    ref_blocks = reference_norms(model, list(blocks.layers), tokens, labels)
    got = probe_norms_free(model, blocks, tokens, labels, weights, "token-mean")
    torch.testing.assert_close(got.double(), ref_blocks, rtol=1e-5, atol=0)
    assert (ref_blocks - ref).abs().min() > 1e-3
    probe.remove()
    blocks.remove()


def test_tied_head_and_empty_selection_are_refused_at_start():
    """GPT-2 ties its head to the input embedding: the hooks would see only the head's part of
    that weight's gradient, so the default selection is refused when the probe is built (as a
    ConfigError naming attent.signal and the model), and include_head: false works."""
    from attent_scale.config import ConfigError, parse_attent
    from attent_scale.teaching import make_probe
    model = tiny_gpt2(tie=True, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"attent.grad_norm.include_head: the weight of lm_head "
                                         r"in GPT2LMHeadModel is shared with transformer.wte"):
        select_linears(model, last_blocks=1, include_head=True)
    with pytest.raises(ConfigError, match=r"attent.signal: got 'grad_norm', which "
                                          r"GPT2LMHeadModel cannot provide .*include_head"):
        make_probe(model, parse_attent({"signal": "grad_norm"}))
    probe = make_probe(model, parse_attent({"signal": "grad_norm",
                                            "grad_norm": {"include_head": False}}))
    assert len(probe.layers) == 8 and "lm_head" not in probe.layers
    probe.remove()
    with pytest.raises(ValueError, match="attent.grad_norm: no trainable layer selected"):
        select_linears(model, last_blocks=0, include_head=False)


def _torchrun(worker_args: list[str], tmp_path) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(ROOT / "tests" / "gradnorm_worker.py"),
           *worker_args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_two_sharded_ranks_match_a_full_copy(backend, tmp_path):
    """Each rank trains its own examples with sharded parameters; the norms its hooks give in a
    real backward (and in a pool pass) equal torch.func on a full, unsharded copy."""
    res = _torchrun(["--backend", backend], tmp_path)
    if res.get("skip"):
        pytest.skip(res["skip"])
    assert res["sharded"], "parameters were not sharded: the test would prove nothing"
    for rank in ("0", "1"):
        for source in ("free", "pool"):
            got, ref = res[rank][source], res[rank]["reference"]
            assert len(got) == 4 and all(math.isfinite(v) for v in got)
            for x, y in zip(got, ref):
                assert abs(x - y) <= 1e-4 * y, (rank, source, got, ref)
    assert res["0"]["reference"] != res["1"]["reference"]  # the ranks saw different data


# Free scores during a real engine.backward are checked against the reference under ZeRO-3 and
# FSDP2 above; the job runs the pool source, whose forward goes past the DeepSpeed engine.
@pytest.mark.parametrize("source", ["pool"])
def test_pretrain_job_with_grad_norm_signal_selects(source, tiny_corpus, tmp_path):
    """attent-pretrain, one process, ZeRO-1: scores from the training backward (free) or from a
    pool pass that differentiates past the engine (pool) drive a selection."""
    attent = {"preset": "attent-simple", "signal": "grad_norm", "source": source,
              "grad_norm": {"last_blocks": 1, "include_head": True}}
    if source == "pool":
        attent["pool_size"] = 96
    cfg = write_config(tmp_path / "ds.json", stage=1, attent=attent)
    out = tmp_path / "run"
    proc = run_job(cfg, tiny_corpus, out, nproc=1, launcher="python",
                   extra=["--epochs", "2", "--no-plot"])
    assert "[attent] pass 1 subset" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sel = [r for r in records if r["type"] == "selection" and r["pass"] == 1][0]
    # Every scored example got a finite, positive gradient norm, and they differ.
    assert sel["invalid"] == 0 and sel["q10"] > 0 and sel["q90"] > sel["q10"]
    meta = json.loads((tiny_corpus / "meta.json").read_text())
    assert sel["unscored"] == (0 if source == "free" else meta["num_train"] - 96)
    assert 0 < sel["selected"] < meta["num_train"]


def test_frozen_layers_are_left_out():
    """A LoRA base layer trains nothing: its gradient is not the step's, so it is not selected."""
    import torch
    from attent_scale.grad_norm import select_linears
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4),
                                                            torch.nn.Linear(4, 4))])
    model.layers[0][0].weight.requires_grad_(False)
    chosen = select_linears(model, last_blocks=1, include_head=False)
    assert list(chosen) == ["layers.0.1"]
    model.layers[0][1].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="every selected layer frozen"):
        select_linears(model, last_blocks=1, include_head=False)
