"""Export an ``attent-pretrain`` checkpoint as a Hugging Face model directory (``save_pretrained``).

    attent-export --run runs/100m --data .cache/corpus1024 --model 100m --out runs/100m/hf

The result loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained``, so standard tools (the Trainer, ``attent-finetune``,
``tools/eval_gsm8k.py``) can fine-tune or evaluate it.

- **Weights**: DeepSpeed's own ``zero_to_fp32`` consolidation reads the fp32 master weights of the
  checkpoint, whatever the ZeRO stage (1, 2 or 3) and however many ranks wrote it.
- **Tokenizer**: the corpus's SentencePiece model (``tokenizer.model``, see
  :mod:`attent_scale.data`) rebuilt as a fast tokenizer with the corpus's special ids (pad 0, unk 1,
  bos 2, eos 3), giving the ids the model was pretrained on.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from .data import BOS_ID, EOS_ID, PAD_ID, UNK_ID


def _bpe_merges(sp, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's encoder, which merges the best-scoring pair first.

    SentencePiece stores only pieces (a BPE model's score falls with the id); every way of
    splitting a piece into two known pieces is a merge ranked by that piece's id.
    """
    merges = []
    for piece, pid in vocab.items():
        if not sp.is_control(pid) and not sp.is_byte(pid) and not sp.is_unknown(pid):
            for i in range(1, len(piece)):
                left, right = piece[:i], piece[i:]
                if left in vocab and right in vocab:
                    merges.append((pid, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def hf_tokenizer(sp_model: str | Path, model_max_length: int):
    """A fast tokenizer giving the SentencePiece model's ids (checked on a probe text).

    Built directly with the ``tokenizers`` library, not with transformers' slow-to-fast converters
    (which add a prefix space and differ between releases): the corpus tokenizer uses no dummy
    prefix, identity normalisation and byte fallback. BOS is not added automatically:
    :mod:`attent_scale.instruct` adds it explicitly.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    unk = sp.id_to_piece(UNK_ID)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(sp, vocab), unk_token=unk,
                                   byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")  # SentencePiece's escaped space
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=sp.id_to_piece(BOS_ID),
                                  eos_token=sp.id_to_piece(EOS_ID), unk_token=unk,
                                  pad_token=sp.id_to_piece(PAD_ID),
                                  model_max_length=model_max_length)
    probe = "def f(x):\n    return x + 1  # 42, caf\u00e9 \u2603\n\tQuestion: 1,234?\n"
    if tok.encode(probe, add_special_tokens=False) != sp.encode(probe):
        raise RuntimeError(f"the tokenizer built from {sp_model} does not reproduce the "
                           "SentencePiece ids on a probe text")
    return tok


def find_checkpoint(run: Path) -> tuple[Path, str]:
    """(directory holding DeepSpeed tag folders, tag) for a pretraining --out or a tag folder."""
    for root in (run / "checkpoints", run):
        latest = root / "latest"
        if latest.is_file():
            return root, latest.read_text().strip()
    if (run / "attent_state.json").exists() or any(run.glob("*model_states.pt")):
        return run.parent, run.name
    raise FileNotFoundError(f"no DeepSpeed checkpoint under {run}: pass the --out directory of an "
                            "attent-pretrain run that saved (--save-every N), or a tag folder")


def export(run: str | Path, data: str | Path, shape: str, out: str | Path) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .model import MODEL_SHAPES, build_model
    config_file = None if shape in MODEL_SHAPES else shape
    if config_file is not None and not Path(config_file).exists():
        raise ValueError(f"--model {shape!r}; allowed: {sorted(MODEL_SHAPES)} or the "
                         "--model-config file the run used")
    meta_path = Path(data) / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} missing: --data must be the corpus the run was "
                                "pretrained on (its tokenizer and vocabulary size)")
    meta = json.loads(meta_path.read_text())
    root, tag = find_checkpoint(Path(run))
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    model = build_model(shape, meta["vocab_size"], meta["seq_len"], seed=0,
                        model_config=config_file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {root / tag} does not fit --model {shape}: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}; pass the run's --model")
    # Special ids from the corpus (a tokenizer brought in has its own).
    bos, eos, pad = (meta.get(k, d) for k, d in (("bos_id", BOS_ID), ("eos_id", EOS_ID),
                                                  ("pad_id", PAD_ID)))
    for target in (model.config, model.generation_config):
        target.bos_token_id, target.eos_token_id, target.pad_token_id = bos, eos, pad
    out = Path(out)
    model.save_pretrained(str(out))
    if (Path(data) / "tokenizer.model").exists():
        hf_tokenizer(Path(data) / "tokenizer.model", meta["seq_len"]).save_pretrained(str(out))
    else:  # a corpus prepared with a Hugging Face tokenizer: hand that one on as it is
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(Path(data) / meta["tokenizer"])).save_pretrained(str(out))
    (out / "attent_export.json").write_text(json.dumps(
        {"checkpoint": str(root / tag), "model": shape,
         "corpus_fingerprint": meta.get("fingerprint"), "vocab_size": meta["vocab_size"],
         "seq_len": meta["seq_len"]}, indent=1))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True,
                   help="attent-pretrain --out directory (its checkpoints/latest), or a tag folder")
    p.add_argument("--data", required=True, help="the corpus directory the run was trained on")
    p.add_argument("--model", required=True,
                   help="the --model shape the run used (e.g. 100m), or its --model-config file")
    p.add_argument("--out", required=True, help="directory for save_pretrained")
    a = p.parse_args(argv)
    out = export(a.run, a.data, a.model, a.out)
    print(f"exported {a.run} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
