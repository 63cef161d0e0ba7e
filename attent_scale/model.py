"""The model a pretraining job trains: a named Llama shape, any transformers config, or a checkpoint.

``--model`` picks one of three kinds, checked before anything slow happens:

- a name of :data:`MODEL_SHAPES` (``tiny``, ``demo``, ``small``, ``100m``, ``1b``): a Llama-shaped
  decoder sized for the corpus's vocabulary and sequence length;
- ``--model-config PATH``: a transformers config (a ``config.json`` or a directory holding one) of
  any causal LM (Llama, Mistral, Qwen2, GPT-2, ...), built with fresh weights through
  ``AutoModelForCausalLM.from_config``;
- ``--init-from DIR``: a local ``save_pretrained`` directory, weights included (continued
  pretraining). Nothing is downloaded.

The corpus's token ids must fit the model's embedding: a model with fewer rows than the corpus's
``vocab_size`` is refused (ids past the table crash on CPU and corrupt silently on GPU).
Its sequences must fit the model's positions (``max_position_embeddings``, GPT-2's
``n_positions``). Every refusal is one :class:`ModelError` line naming the option and the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

MODEL_SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate)
    "tiny": (64, 2, 4, 2, 128),
    "demo": (128, 2, 4, 2, 384),
    "small": (384, 6, 6, 2, 1024),
    "100m": (768, 12, 12, 4, 2304),
    "1b": (2048, 20, 16, 8, 5632),  # 0.98B parameters at a vocabulary of 8192
}


class ModelError(ValueError):
    """A model that cannot be built for this corpus (one line: what, where, how to fix)."""


def _config_path(path: Path) -> Path:
    path = path.expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelError(f"--model-config {path}: no such file; give a transformers config.json "
                         "or a directory holding one")
    return path


def _read_config(path: Path, flag: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{flag} {path}: transformers cannot read it "
                         f"({str(exc).strip().splitlines()[0]}); give a config.json with a "
                         "model_type it knows") from None


def load_config(model_config: Optional[str] = None, init_from: Optional[str] = None):
    """The transformers config named by ``--model-config`` or ``--init-from`` (None: a shape)."""
    if model_config and init_from:
        raise ModelError("--model-config and --init-from both given; --init-from brings its own "
                         "config: drop --model-config")
    if init_from:
        src = Path(init_from).expanduser()
        if not (src / "config.json").is_file():
            raise ModelError(f"--init-from {src}: not a save_pretrained directory (no "
                             "config.json); give the directory model.save_pretrained() wrote")
        return _read_config(src, "--init-from")
    if model_config:
        return _read_config(_config_path(Path(model_config)), "--model-config")
    return None


def shape_config(shape: str, vocab_size: int, seq_len: int):
    from transformers import LlamaConfig
    if shape not in MODEL_SHAPES:
        raise ModelError(f"--model {shape!r}: unknown shape; allowed: {', '.join(MODEL_SHAPES)}, "
                         "or --model-config PATH / --init-from DIR")
    hidden, layers, heads, kv, inter = MODEL_SHAPES[shape]
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                       max_position_embeddings=seq_len, tie_word_embeddings=False)


def check_fits(config, vocab_size: int, seq_len: int, where: str) -> None:
    """Refuse a model whose embedding or positions cannot hold the corpus's tokens."""
    rows = getattr(config, "vocab_size", None)
    if rows is not None and vocab_size is not None and rows < vocab_size:
        raise ModelError(f"{where}: the model's vocab_size {rows} is smaller than the corpus's "
                         f"{vocab_size} (its tokenizer's ids go up to {vocab_size - 1}); use a "
                         "config with vocab_size >= that, or prepare the corpus with the model's "
                         "own tokenizer (attent-prepare --tokenizer)")
    # GPT-2 calls it n_positions (its config maps max_position_embeddings onto that name).
    names = (getattr(config, "attribute_map", {}).get("max_position_embeddings",
                                                       "max_position_embeddings"), "n_positions")
    key = next((k for k in names if getattr(config, k, None) is not None), None)
    if key is not None and getattr(config, key) < seq_len:
        raise ModelError(f"{where}: the model takes at most {getattr(config, key)} positions "
                         f"({key}) but the corpus's sequences have {seq_len} tokens; prepare the "
                         f"corpus with --seq-len <= {getattr(config, key)} or raise {key} in the "
                         "config")


def build_model(shape: str, vocab_size: int, seq_len: int, seed: int,
                model_config: Optional[str] = None, init_from: Optional[str] = None,
                attn_implementation: Optional[str] = None) -> torch.nn.Module:
    """The causal LM to train (see the module doc); weights from ``seed`` unless loaded.

    ``attn_implementation`` None: transformers' own choice, SDPA where the model has it, else
    eager (so a model without SDPA still trains). Raises ModelError (one line) when the model
    cannot be built or cannot hold the corpus.
    """
    from transformers import AutoModelForCausalLM
    config = load_config(model_config, init_from)
    where = (f"--init-from {init_from}" if init_from else
             f"--model-config {model_config}" if model_config else f"--model {shape}")
    if config is None:
        if vocab_size is None:
            raise ModelError(f"{where}: the corpus does not say its vocabulary size (MDS shards "
                             "of your own); pass --vocab-size N (the model's embedding rows), "
                             "or --model-config / --init-from")
        config = shape_config(shape, vocab_size, seq_len)
    check_fits(config, vocab_size, seq_len, where)
    # Model init is user territory; the teacher itself never touches a global RNG.
    torch.manual_seed(seed)
    try:
        if init_from:
            model = AutoModelForCausalLM.from_pretrained(str(Path(init_from).expanduser()),
                                                         local_files_only=True,
                                                         attn_implementation=attn_implementation)
            # Float32 master weights whatever the checkpoint's dtype (DeepSpeed's bf16/fp16
            # sections decide the compute dtype); the dtype keyword changed name across
            # transformers versions, a cast does not.
            model = model.to(torch.float32)
        else:
            model = AutoModelForCausalLM.from_config(config,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:
        # Not a causal LM (AutoModelForCausalLM has no class for it), no weights in --init-from,
        # or an attention implementation the model lacks: one line, not a traceback.
        raise ModelError(f"{where}: transformers cannot build a {type(config).__name__} causal "
                         f"LM from it ({str(exc).strip().splitlines()[0]}); give the config "
                         "of a causal LM (Llama, Mistral, Qwen2, GPT-2, ...) or a complete "
                         "save_pretrained directory") from None
    # Training forwards would otherwise build a key/value cache that nothing reads.
    model.config.use_cache = False
    return model


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` each decoder block in place (the longest ModuleList); returns how many.

    Block by block rather than the whole model: compile time stays short and the parts the
    teacher hooks (attention probes, the loss kernel) keep running as they are.
    """
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)),
                 key=len, default=None)
    if not blocks:
        return 0
    import torch._dynamo
    # One graph per distinct micro batch shape (training, evaluation, pool passes).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def describe(model: torch.nn.Module) -> str:
    """'LlamaForCausalLM, 95.2M parameters' for the start line."""
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}, {n / 1e6:.2f}M parameters"
