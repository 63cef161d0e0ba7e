"""The fused per-token cross-entropy (attent_scale/fused_loss.py) against the materialised logits.

Exact tier: the chunked kernel's losses and gradients equal F.cross_entropy over the logits, the
teacher's scores from it equal attent_scale.signals on the logits. Model tier: a transformers Llama
trained through the fused path gets the same gradients, eager and compiled, under DeepSpeed ZeRO-1/2/3
and FSDP2 (one CPU rank). Tool tier: tools/bench_throughput.py's CPU run writes its table.
Liger runs under Triton's CPU interpreter where it is installed; CCE and the CUDA kernels only on a GPU.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attent_scale import fused_loss as fl  # noqa: E402
from attent_scale.signals import IGNORE_INDEX, example_scores, token_grad_sq_norm  # noqa: E402


def ragged(b=3, t=17, d=16, v=50, dtype=torch.float64, seed=1):
    """hidden [B, T, D], weight [V, D], labels [B, T] with a padded tail and a masked prompt."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=gen, dtype=dtype)
    weight = torch.randn(v, d, generator=gen, dtype=dtype) / d ** 0.5
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, 6:] = IGNORE_INDEX      # padding
    labels[2, :4] = IGNORE_INDEX      # a prompt
    return hidden, weight, labels


def losses_and_grads(impl, hidden, weight, labels, upstream, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fl.fused_token_losses(h, w, labels, impl, **kw)
    (out.ce * upstream).sum().backward()
    return out, h.grad, w.grad


def reference(hidden, weight, labels, shift=True):
    """F.cross_entropy over the materialised float32 logits, as pretrain.token_losses does."""
    h = hidden[:, :-1] if shift else hidden
    y = labels[:, 1:] if shift else labels
    logits = h @ weight.t()
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
    return ce.view(y.shape), y, logits


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("chunk", [None, 5, 16])
def test_chunked_losses_and_gradients_equal_the_logits_path(shift, chunk):
    hidden, weight, labels = ragged()
    n = labels.shape[1] - 1 if shift else labels.shape[1]
    # Per-token upstream weights: a per-example weighted mean must get each token's own gradient.
    upstream = torch.rand(labels.shape[0], n, generator=torch.Generator().manual_seed(2))
    ref, rh, rw = losses_and_grads("torch", hidden, weight, labels, upstream, shift=shift)
    out, gh, gw = losses_and_grads("chunked", hidden, weight, labels, upstream, shift=shift,
                                   chunk_tokens=chunk)
    expect, y, _ = reference(hidden, weight, labels, shift)
    assert out.ce.dtype == torch.float32 and out.ce.shape == y.shape and out.impl == "chunked"
    torch.testing.assert_close(ref.ce, expect)
    torch.testing.assert_close(out.ce, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.labels, y)
    assert (out.ce[y == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    # Masked positions pass no gradient back to their hidden state.
    if not shift:
        assert (gh[labels == IGNORE_INDEX] == 0).all()


def test_padded_tail_chunks_give_the_same_result(monkeypatch):
    # The compiled kernels see one chunk shape: the tail chunk is padded with ignored rows. The
    # padding logic is checked here with the eager kernels (no compiler needed).
    monkeypatch.setattr(fl, "_compiled_kernels",
                        lambda: fl._Kernels(fl._chunk_forward, fl._chunk_dlogits, pad=True))
    hidden, weight, labels = ragged()
    upstream = torch.rand(3, 16, generator=torch.Generator().manual_seed(3))
    ref, rh, rw = losses_and_grads("torch", hidden, weight, labels, upstream, fgrad=True)
    out, gh, gw = losses_and_grads("compiled", hidden, weight, labels, upstream, chunk_tokens=7,
                                   fgrad=True)
    torch.testing.assert_close(out.ce, ref.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.fgrad_sq, ref.fgrad_sq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_fgrad_term_equals_signals_token_grad_sq_norm():
    hidden, weight, labels = ragged(dtype=torch.float32)
    _, y, logits = reference(hidden, weight, labels)
    expect = token_grad_sq_norm(logits, y)
    out = fl.fused_token_losses(hidden, weight, labels, "chunked", fgrad=True, chunk_tokens=5)
    torch.testing.assert_close(out.fgrad_sq, expect, rtol=1e-5, atol=1e-6)
    assert not out.fgrad_sq.requires_grad and (out.fgrad_sq[y == IGNORE_INDEX] == 0).all()
    assert fl.fused_token_losses(hidden, weight, labels, "chunked").fgrad_sq is None


def test_teacher_scores_equal_example_scores_on_the_logits():
    hidden, weight, labels = ragged(dtype=torch.float32)
    labels[1, 1:] = IGNORE_INDEX  # an example with no target at all scores NaN
    ce, y, logits = reference(hidden, weight, labels)
    importance = torch.rand(y.shape, generator=torch.Generator().manual_seed(4)) * 2
    out = fl.fused_token_losses(hidden.requires_grad_(), weight, labels, "chunked", fgrad=True)
    for signal in ("loss", "fgrad_norm", "attention_fgrad"):
        imp = importance if signal == "attention_fgrad" else None
        got = fl.scores_from_token_losses(out, signal, imp)
        expect = example_scores(signal, ce.detach(), y, logits.detach(), imp)
        assert got.shape == (3,) and not got.requires_grad
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert torch.isnan(got[1])
    with pytest.raises(fl.FusedLossError, match="fgrad=True"):
        fl.scores_from_token_losses(fl.fused_token_losses(hidden, weight, labels, "chunked"),
                                    "fgrad_norm")


def test_autocast_runs_the_head_in_bf16_and_returns_gradients_in_the_inputs_dtype():
    hidden, weight, labels = ragged(dtype=torch.float32)
    upstream = torch.ones(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, rh, rw = losses_and_grads("torch", hidden, weight, labels, upstream)
        out, gh, gw = losses_and_grads("chunked", hidden, weight, labels, upstream)
    assert ref.ce.dtype == out.ce.dtype == torch.float32
    assert gh.dtype == gw.dtype == torch.float32
    # Same bf16-rounded logits on both paths: equal up to the float32 softmax arithmetic.
    torch.testing.assert_close(out.ce, ref.ce, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-3)


def test_auto_on_cpu_is_chunked_and_says_why():
    hidden, weight, labels = ragged(dtype=torch.float32)
    out = fl.fused_token_losses(hidden, weight, labels)
    assert out.impl == "chunked"
    reasons = [c.reason for c in fl.auto_choices()]
    assert any("auto on cpu: 'chunked'" in r for r in reasons), reasons


def test_errors_name_what_and_the_fix():
    hidden, weight, labels = ragged(dtype=torch.float32)
    with pytest.raises(fl.FusedLossError, match="unknown; allowed: auto, torch, chunked"):
        fl.fused_token_losses(hidden, weight, labels, "fast")
    with pytest.raises(fl.FusedLossError, match=r"do not match: pass hidden \[..., D\]"):
        fl.fused_token_losses(hidden, weight.t(), labels, "chunked")
    with pytest.raises(fl.FusedLossError, match="must be integer ids of shape"):
        fl.fused_token_losses(hidden, weight, labels[:, 1:], "chunked")
    with pytest.raises(fl.FusedLossError, match="use one of torch, chunked, compiled"):
        fl.fused_token_losses(hidden, weight, labels, "liger", fgrad=True)
    with pytest.raises(fl.FusedLossError, match="impl 'cce' cannot run here"):
        fl.fused_token_losses(hidden, weight, labels, "cce")


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                      tie_word_embeddings=False, **overrides)
    torch.manual_seed(0)  # model init only
    return LlamaForCausalLM(cfg)


def tokens_and_labels(b=4, t=16, v=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, v, (b, t), generator=gen)
    labels = x.clone()
    labels[1, 9:] = IGNORE_INDEX
    labels[3, :4] = IGNORE_INDEX
    return x, labels


def logits_path(model, x, labels):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           reduction="none").view(x.shape[0], -1)


def test_hf_llama_through_enable_token_losses_matches_the_logits_path():
    ref = tiny_llama().double()
    model = fl.enable_token_losses(copy.deepcopy(ref), "chunked")
    keys = list(ref.state_dict())
    x, labels = tokens_and_labels()
    ce_ref = logits_path(ref, x, labels)
    ce_ref.mean(dim=1).mean().backward()
    out = model(input_ids=x, labels=labels, token_losses=True)
    assert isinstance(out, fl.TokenLosses) and out.impl == "chunked" and out.ce.shape == (4, 15)
    torch.testing.assert_close(out.ce, ce_ref, rtol=1e-6, atol=1e-6)
    out.ce.mean(dim=1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    # Everything else is the model's own forward, and the checkpoint format is unchanged.
    torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits)
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin


def test_heads_the_fused_kernels_cannot_serve_are_refused():
    model = tiny_llama()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(64))
    with pytest.raises(fl.FusedLossError, match="head has a bias.*impl='torch'"):
        fl.enable_token_losses(model)
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(fl.FusedLossError, match="final_logit_softcapping=30.0.*impl='torch'"):
        fl.enable_token_losses(model)


@pytest.mark.slow
def test_compiled_llama_blocks_give_the_eager_losses():
    from conftest import load_tool
    bench = load_tool("bench_throughput")
    eager = fl.enable_token_losses(tiny_llama(), "chunked")
    compiled = copy.deepcopy(eager)
    bench.compile_blocks(compiled)
    x, labels = tokens_and_labels()
    want = eager(input_ids=x, labels=labels, token_losses=True).ce
    try:
        got = compiled(input_ids=x, labels=labels, token_losses=True).ce
    except Exception as exc:  # noqa: BLE001 - a box without a working inductor toolchain
        pytest.skip(f"torch.compile cannot run here: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200]}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.mean().backward()
    want.mean().backward()
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())


def sharded_worker(out_path: str) -> None:
    """One CPU rank: DeepSpeed ZeRO-1/2/3 and FSDP2 steps through the fused path (run by a test)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from torch.distributed.fsdp import fully_shard
    deepspeed.init_distributed(dist_backend="gloo")
    base = tiny_llama()
    x, labels = tokens_and_labels()
    ref = copy.deepcopy(base)
    ce_ref = logits_path(ref, x, labels)
    ce_ref.mean(dim=1).mean().backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    result = {}
    for stage in (1, 2, 3):
        model = fl.enable_token_losses(copy.deepcopy(base), "chunked")
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
            "train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": stage}})
        losses = []
        for step in range(2):  # the second step runs on parameters ZeRO-3 has partitioned
            out = engine(input_ids=x, labels=labels, token_losses=True)
            engine.backward(out.ce.mean(dim=1).mean())
            if step == 0:
                grad = max((safe_get_full_grad(p) - want[n]).abs().max().item()
                           for n, p in engine.module.named_parameters())
                ce = (out.ce.detach() - ce_ref.detach()).abs().max().item()
            engine.step()
            losses.append(out.ce.mean().item())
        result[f"zero{stage}"] = {"ce": ce, "grad": grad, "losses": losses}
    model = fl.enable_token_losses(copy.deepcopy(base), "chunked")
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)  # the root group holds embeddings, final norm and the head
    out = model(input_ids=x, labels=labels, token_losses=True)
    out.ce.mean(dim=1).mean().backward()
    result["fsdp2"] = {
        "ce": (out.ce.detach() - ce_ref.detach()).abs().max().item(),
        "grad": max((p.grad.full_tensor() - want[n]).abs().max().item()
                    for n, p in model.named_parameters())}
    Path(out_path).write_text(json.dumps(result))


@pytest.mark.slow
def test_zero_1_2_3_and_fsdp2_train_through_the_fused_path(tmp_path):
    # A process of its own: the process group and DeepSpeed's globals stay out of this session.
    out = tmp_path / "sharded.json"
    proc = subprocess.run([sys.executable, __file__, "--sharded-worker", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for backend in ("zero1", "zero2", "zero3", "fsdp2"):
        assert result[backend]["ce"] < 1e-5, (backend, result[backend])
        assert result[backend]["grad"] < 1e-6, (backend, result[backend])
    for stage in ("zero1", "zero2", "zero3"):
        first, second = result[stage]["losses"]
        assert second < first  # the optimizer step moved the head the fused loss sees


LIGER_CHECK = """
import torch
from attent_scale import fused_loss as fl
gen = torch.Generator().manual_seed(1)
h = torch.randn(3, 17, 16, generator=gen)
w = torch.randn(50, 16, generator=gen) / 4
y = torch.randint(0, 50, (3, 17), generator=gen)
y[0, 6:] = -100
y[2, :4] = -100
up = torch.rand(3, 16, generator=gen)
res = []
for impl in ("torch", "liger"):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fl._dispatch(impl, hh, ww, y, True, False, None)
    (out.ce * up).sum().backward()
    res.append((out.ce.detach(), hh.grad, ww.grad))
for a, b in zip(*res):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
print("liger ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None
                    or importlib.util.find_spec("triton") is None,
                    reason="liger-kernel (and triton) not installed; the GPU benchmark checks it")
def test_liger_per_token_losses_and_gradients_under_the_triton_interpreter():
    # TRITON_INTERPRET must be set before triton decorates Liger's kernels: a fresh process.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", LIGER_CHECK], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "liger ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU")
@pytest.mark.parametrize("impl", ["chunked", "compiled", "liger", "cce"])
def test_cuda_kernels_match_a_float32_reference(impl):
    hidden, weight, labels = ragged(b=4, t=129, d=64, v=1000, dtype=torch.float32)
    hidden, weight, labels = hidden.cuda().bfloat16(), weight.cuda().bfloat16(), labels.cuda()
    why = fl.unavailable(impl, hidden)
    if why:
        pytest.skip(why)
    upstream = torch.rand(4, 128, device="cuda")
    ref, rh, rw = losses_and_grads("torch", hidden.float(), weight.float(), labels, upstream)
    out, gh, gw = losses_and_grads(impl, hidden, weight, labels, upstream)
    assert out.ce.dtype == torch.float32 and (out.ce[labels[:, 1:] == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(out.ce, ref.ce, rtol=2e-2, atol=2e-2)
    for got, want in ((gh, rh), (gw, rw)):
        assert ((got.float() - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.slow
def test_bench_throughput_cpu_run_writes_its_table(tmp_path):
    out = tmp_path / "tp"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_throughput.py"), "--device", "cpu",
         "--model", "tiny", "--seq-len", "64", "--steps", "3", "--vocab-size", "512",
         "--skip-groups", "C", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((out / "throughput.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    for key in ("a", "c:chunked", "d:foreach", "d:torch-fused", "f:off", "f:loss", "f:fgrad",
                "g:ref", "z:zero2"):
        assert rows[key]["status"] == "ok" and rows[key]["ms"] > 0, rows[key]
    # What cannot run on a CPU says why instead of stopping the run.
    assert "needs CUDA" in rows["d:ds-fused"]["reason"]
    assert "not installed" in rows["c:cce"]["reason"] or "CUDA" in rows["c:cce"]["reason"]
    assert rows["e"]["reason"] == "--skip-groups C"
    table = (out / "throughput.md").read_text()
    assert "6 N + 12 L T d_attn" in table and "| tiny | D teacher+ref | f:loss" in table
    assert any("teacher overhead, loss scores" in n for n in data["notes"])



def test_bench_ds_step_cpu_run_compares_the_configs(tmp_path):
    """The consecutive-step benchmark builds the configs it names: the shipped zero1.json has the
    two fast keys, 'today' has DeepSpeed's defaults for them, and every variant is timed."""
    out = tmp_path / "ds"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_ds_step.py"), "--device", "cpu",
         "--model", "tiny", "--seq-len", "32", "--micro", "2", "--micro-big", "4",
         "--vocab-size", "512", "--block", "2", "--rounds", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((out / "ds_step.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert len(rows) == 8 and all(r["ms"] > 0 for r in rows.values())
    assert rows["plain PyTorch"]["vs_plain"] == 1.0
    assert rows["shipped, ZeRO-1, micro big, teacher off"]["teacher"] == "off"
    from conftest import load_tool
    bench = load_tool("bench_ds_step")
    assert bench.SHIPPED["timers"] == {"throughput": {"enabled": False}}
    assert bench.SHIPPED["bf16"]["check_grad_overflow"] is False
    assert "timers" not in bench.TODAY and "check_grad_overflow" not in bench.TODAY["bf16"]
    assert "| shipped, ZeRO-2, micro big | 4 | loss |" in (out / "ds_step.md").read_text()

if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--sharded-worker":
    sharded_worker(sys.argv[2])
