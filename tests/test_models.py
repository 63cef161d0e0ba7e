"""Models of your own in the real pretraining job (issue 12, item 4), and the refusals of model.py.

Every job here reads one MDS dataset written directly with streaming's ``MDSWriter`` (not by
attent-prepare), as a team that already has its shards would: ``DIR/train`` and ``DIR/val`` with
an ``input_ids`` column (int32 arrays of one length) and a ``source`` column. Its sequences are
arithmetic progressions modulo the vocabulary, so a tiny model learns them within a few dozen
steps and a trained checkpoint is far better than a fresh one.

- GPT-2 (transformers' Conv1D projections, tied head) and Llama models built from config files,
  trained with the teacher on: a selection is made, the loss falls and stays finite;
- continued pretraining with ``--init-from``: the continued run's first evaluation equals the
  saved model's loss on the same validation sequences, far below a fresh model's;
- two ranks over gloo on the same shards: the ranks agree on every selection and train each
  selected id exactly once;
- a signal the model cannot provide, and a model that cannot hold the corpus, are refused at start
  with one line.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attent_scale.model import ModelError, build_model
from conftest import assert_agree_and_exactly_once, read_ids, run_job, write_config

VOCAB, SEQ = 96, 32
N_TRAIN, N_VAL = 160, 48
EVAL = 32  # validation sequences per evaluation (--eval-samples)
SIMPLE = {"preset": "attent-simple"}  # a full pass with free scores, then the top 70% by score


def progressions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n sequences (a + d i) mod VOCAB with step d in 1..3 (the source id is d - 1)."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, VOCAB, n)
    step = rng.integers(1, 4, n)
    tokens = (start[:, None] + step[:, None] * np.arange(SEQ)) % VOCAB
    return tokens.astype(np.int32), (step - 1).astype(np.int32)


@pytest.fixture(scope="module")
def mds_corpus(tmp_path_factory):
    """(directory, validation tokens): shards written with MDSWriter, several per split."""
    from streaming import MDSWriter
    root = tmp_path_factory.mktemp("mds") / "own"
    val = None
    for split, n, seed in (("train", N_TRAIN, 0), ("val", N_VAL, 1)):
        tokens, sources = progressions(n, seed)
        with MDSWriter(out=str(root / split), size_limit=1 << 12,
                       columns={"input_ids": "ndarray:int32", "source": "int32"}) as w:
            for row, src in zip(tokens, sources):
                w.write({"input_ids": row, "source": int(src)})
        val = tokens if split == "val" else val
    assert len(list((root / "train").glob("shard.*.mds"))) > 1
    return root, val


def gpt2_config(**overrides):
    from transformers import GPT2Config
    return GPT2Config(**{"vocab_size": VOCAB, "n_positions": SEQ, "n_embd": 32, "n_layer": 2,
                         "n_head": 4, **overrides})


def llama_config(**overrides):
    from transformers import LlamaConfig
    return LlamaConfig(**{"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2,
                          "intermediate_size": 64, "max_position_embeddings": SEQ,
                          **overrides})


def own_data() -> list[str]:
    """Options of a job on the MDS shards of the fixture."""
    return ["--token-column", "input_ids", "--vocab-size", str(VOCAB), "--eval-samples",
            str(EVAL), "--no-plot"]


def records(out, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["type"] == kind]


def param_line(config) -> str:
    """What the job's start line says of a model built from ``config``: its class and size."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}, {n / 1e6:.2f}M parameters"


# ---- the real job --------------------------------------------------------------------------

@pytest.mark.parametrize("arch, signal", [
    # GPT-2: Conv1D projections for grad_norm (its tied head left out), as a directory.
    ("gpt2", {"signal": "grad_norm", "grad_norm": {"last_blocks": 2, "include_head": False}}),
    # Llama: attention importance through transformers' attention interface, as a JSON file.
    ("llama", {"signal": "attention_fgrad", "attention": {"layers": [0, -1]}}),
])
def test_pretrain_from_a_config_file_with_the_teacher(arch, signal, mds_corpus, tmp_path):
    corpus, _ = mds_corpus
    if arch == "gpt2":
        config = gpt2_config()
        path = tmp_path / "gpt2"
        config.save_pretrained(path)  # a directory holding config.json
    else:
        config = llama_config(tie_word_embeddings=False)
        path = tmp_path / "llama.json"
        config.to_json_file(path)
    out = tmp_path / "run"
    proc = run_job(write_config(tmp_path / "ds.json", attent={**SIMPLE, **signal}), corpus, out,
                   nproc=1, launcher="python",
                   extra=["--model-config", str(path), "--epochs", "2", *own_data()])
    log = proc.stdout + proc.stderr
    assert f"model {path}: {param_line(config)}" in log, log[-2000:]
    assert "[attent] pass 1 subset" in log
    sel = next(r for r in records(out, "selection") if r["pass"] == 1)
    # Every example got a finite signal from its training forward, and the signals differ.
    assert sel["invalid"] == 0 and sel["unscored"] == 0 and sel["q90"] > sel["q10"] > 0
    assert 0 < sel["selected"] < N_TRAIN
    evals = records(out, "eval")
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    assert math.isfinite(last) and last < first - 0.3, (first, last)


def test_refuses_a_signal_the_model_cannot_provide(mds_corpus, tmp_path):
    """grad_norm's default selection includes the head, which GPT-2 ties to its embedding: the job
    stops before training, in one line naming the signal and the model class."""
    corpus, _ = mds_corpus
    gpt2_config().save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "run"
    with pytest.raises(AssertionError) as failed:
        run_job(write_config(tmp_path / "ds.json", attent={**SIMPLE, "signal": "grad_norm"}),
                corpus, out, nproc=1, launcher="python",
                extra=["--model-config", str(tmp_path / "gpt2"), *own_data()])
    lines = [ln for ln in str(failed.value).splitlines() if ln.startswith("attent-pretrain:")]
    assert len(lines) == 1, str(failed.value)[-3000:]
    assert "attent.signal: got 'grad_norm', which GPT2LMHeadModel cannot provide" in lines[0]
    assert "include_head" in lines[0]
    assert not (out / "metrics.jsonl").exists() or not records(out, "train")


def test_continue_from_save_pretrained(mds_corpus, tmp_path):
    """--init-from: the run starts from the saved weights. Its first evaluation (before any step)
    equals the saved model's loss on the same validation sequences, to float precision, and that
    loss is far below a fresh model's, so a run that ignored the weights would fail here."""
    from transformers import AutoModelForCausalLM
    corpus, val = mds_corpus
    config = llama_config(tie_word_embeddings=False)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    train, _ = progressions(N_TRAIN, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        x = torch.from_numpy(train[torch.randint(0, N_TRAIN, (16,), generator=gen).numpy()]).long()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "saved")

    def val_loss(m) -> float:
        m.eval()
        x = torch.from_numpy(val[:EVAL]).long()
        with torch.no_grad():
            logits = m(input_ids=x).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1)).item()

    saved = val_loss(model)
    fresh = val_loss(build_model("tiny", VOCAB, SEQ, 0, model_config=str(tmp_path / "saved")))
    assert saved < fresh - 1.0, (saved, fresh)

    out = tmp_path / "run"
    proc = run_job(write_config(tmp_path / "ds.json", attent=SIMPLE), corpus, out, nproc=1,
                   launcher="python",
                   extra=["--init-from", str(tmp_path / "saved"), "--epochs", "2",
                          *own_data()])
    assert "[attent] pass 1 subset" in proc.stdout + proc.stderr
    evals = records(out, "eval")
    assert evals[0]["step"] == 0
    assert evals[0]["val_loss"] == pytest.approx(saved, rel=1e-5, abs=0)
    assert math.isfinite(evals[-1]["val_loss"])


def test_two_ranks_on_mds_shards_written_with_mdswriter(mds_corpus, tmp_path):
    """A named shape sized by --vocab-size, the token column named, two ranks over gloo: every
    pass, both ranks logged one selection and together trained each selected id once."""
    corpus, _ = mds_corpus
    out = tmp_path / "run"
    proc = run_job(write_config(tmp_path / "ds.json", stage=2, attent=SIMPLE), corpus, out,
                   nproc=2, extra=["--epochs", "2", *own_data()])
    assert "[attent] pass 1 subset" in proc.stdout + proc.stderr
    logs = read_ids(out, 2)
    assert assert_agree_and_exactly_once(logs, 2) == [0, 1]
    full, subset = logs[0]["passes"][0][1], logs[0]["passes"][1][1]
    assert full == N_TRAIN and 0 < subset < full
    assert all(logs[r]["trained"][p] for r in (0, 1) for p in (0, 1))
    assert math.isfinite(records(out, "eval")[-1]["val_loss"])


# ---- model.py's refusals -------------------------------------------------------------------

def test_a_model_too_small_for_the_corpus_is_refused(tmp_path):
    llama_config(vocab_size=64).to_json_file(tmp_path / "small_vocab.json")
    with pytest.raises(ModelError, match=r"^--model-config .*small_vocab.json: the model's "
                                         r"vocab_size 64 is smaller than the corpus's 96"):
        build_model("tiny", VOCAB, SEQ, 0, model_config=str(tmp_path / "small_vocab.json"))
    # GPT-2 names its positions n_positions; the message names the key to raise.
    gpt2_config(n_positions=16).save_pretrained(tmp_path / "short")
    with pytest.raises(ModelError, match=r"at most 16 positions \(n_positions\) but the corpus's "
                                         r"sequences have 32 tokens.* raise n_positions"):
        build_model("tiny", VOCAB, SEQ, 0, model_config=str(tmp_path / "short"))
    llama_config(max_position_embeddings=16).to_json_file(tmp_path / "short.json")
    with pytest.raises(ModelError, match=r"at most 16 positions \(max_position_embeddings\)"):
        build_model("tiny", VOCAB, SEQ, 0, model_config=str(tmp_path / "short.json"))
    # A checkpoint is checked the same way, before its weights are read.
    torch.manual_seed(0)
    build_model("tiny", VOCAB, 16, 0, model_config=str(tmp_path / "short")).save_pretrained(
        tmp_path / "short_ckpt")
    with pytest.raises(ModelError, match=r"^--init-from .*short_ckpt: the model takes at most 16"):
        build_model("tiny", VOCAB, SEQ, 0, init_from=str(tmp_path / "short_ckpt"))
    # Larger than needed is fine, and GPT-2 is built as GPT-2, with no key/value cache.
    model = build_model("tiny", VOCAB, 16, 0, model_config=str(tmp_path / "short"))
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.use_cache is False


@pytest.mark.parametrize("case, message", [
    ("both", r"^--model-config and --init-from both given"),
    ("no_config_file", r"^--model-config .*nothing.json: no such file"),
    ("not_a_checkpoint", r"^--init-from .*empty: not a save_pretrained directory"),
    ("no_weights", (r"^--init-from .*gpt2: transformers cannot build a GPT2Config causal LM "
                    r".*no file named")),
    ("unknown_type", r"^--model-config .*unknown.json: transformers cannot read it"),
    ("not_json", r"^--model-config .*broken.json: transformers cannot read it"),
    ("not_causal", r"^--model-config .*vit: transformers cannot build a ViTConfig causal LM"),
    ("no_vocab", r"^--model tiny: the corpus does not say its vocabulary size"),
    ("unknown_shape", r"^--model 'huge': unknown shape"),
])
def test_model_refusals_are_one_line(case, message, tmp_path):
    from transformers import ViTConfig
    gpt2_config().save_pretrained(tmp_path / "gpt2")  # a config, no weights
    (tmp_path / "empty").mkdir()
    (tmp_path / "unknown.json").write_text('{"model_type": "no-such-model"}')
    (tmp_path / "broken.json").write_text('{"model_type": ')
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32).save_pretrained(tmp_path / "vit")
    kwargs, shape, vocab = {
        "both": ({"model_config": tmp_path / "gpt2", "init_from": tmp_path / "gpt2"}, "tiny",
                 VOCAB),
        "no_config_file": ({"model_config": tmp_path / "nothing.json"}, "tiny", VOCAB),
        "not_a_checkpoint": ({"init_from": tmp_path / "empty"}, "tiny", VOCAB),
        "no_weights": ({"init_from": tmp_path / "gpt2"}, "tiny", VOCAB),
        "unknown_type": ({"model_config": tmp_path / "unknown.json"}, "tiny", VOCAB),
        "not_json": ({"model_config": tmp_path / "broken.json"}, "tiny", VOCAB),
        "not_causal": ({"model_config": tmp_path / "vit"}, "tiny", VOCAB),
        "no_vocab": ({}, "tiny", None),
        "unknown_shape": ({}, "huge", VOCAB),
    }[case]
    with pytest.raises(ModelError, match=message) as err:
        build_model(shape, vocab, SEQ, 0, **{k: str(v) for k, v in kwargs.items()})
    assert "\n" not in str(err.value)
