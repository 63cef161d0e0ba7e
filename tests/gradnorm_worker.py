"""One rank of the sharded grad_norm check (started by tests/test_grad_norm.py with torchrun).

Each rank keeps a full float64 copy of the tiny model, then shards the model with DeepSpeed ZeRO-3
or FSDP2 and scores its own batch twice with the probe: in a pool pass (no optimizer step) and
during a real training backward. Both must equal torch.func's per-example gradient norms on the
full copy. Rank 0 writes every rank's numbers to --out as JSON.

    torchrun --nproc_per_node 2 tests/gradnorm_worker.py --backend zero3 --out result.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IGNORE = -100


def tiny_llama(dtype=torch.float64, seed=0):
    """2 blocks, hidden 32, with biases on the attention projections (so bias terms are tested)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                      tie_word_embeddings=False, attention_bias=True,
                      attn_implementation="eager")
    torch.manual_seed(seed)  # model init only
    return LlamaForCausalLM(cfg).to(dtype)


def batch(bsz=4, t=16, seed=1):
    """Tokens [B, T] and next-token labels [B, T-1], some masked with the ignore index."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (bsz, t), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[1, :9] = IGNORE            # a prompt that does not count
    labels[3, 2:] = IGNORE            # only two counted tokens
    return tokens, labels


def token_ce(logits, labels):
    """Per-token cross-entropy [B, T-1], zero where the label is the ignore index."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).to(torch.float64 if logits.dtype ==
                                                         torch.float64 else torch.float32),
                         labels.clamp_min(0).flatten(), reduction="none").view(labels.shape)
    return ce * (labels != IGNORE)


def reference_norms(model, names, tokens, labels):
    """torch.func: vmap over examples of grad of each example's own mean masked token loss."""
    from torch.func import functional_call, grad, vmap
    params = {n: p.detach() for n, p in model.named_parameters()
              if any(n.startswith(layer + ".") for layer in names)}

    def own_loss(p, x, y):
        logits = functional_call(model, p, (x[None],), strict=False).logits
        return F.cross_entropy(logits[0, :-1], y, ignore_index=IGNORE)

    grads = vmap(grad(own_loss), in_dims=(None, 0, 0))(params, tokens, labels)
    return torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()


def shard_zero3(model):
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config={
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9, "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    sharded = all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters()
                  if p.ds_numel >= 2)
    return engine, engine.backward, engine.step, sharded


def shard_fsdp2(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, lambda loss: loss.backward(), opt.step, sharded


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=["zero3", "fsdp2"], required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")

    from attent_scale.grad_norm import GradNormProbe
    model = tiny_llama(torch.float32)
    full = copy.deepcopy(model).double()
    # Created before sharding, as attent-pretrain does: the hooks must coexist with the
    # framework's own module hooks whichever order they run in.
    probe = GradNormProbe(model, last_blocks=1, include_head=True, chunk_elements=4096)
    names = list(probe.layers)
    tokens, labels = batch(seed=1 + rank)
    mask = labels != IGNORE
    reference = reference_norms(full, names, tokens, labels).tolist()

    shard = shard_zero3 if args.backend == "zero3" else shard_fsdp2
    try:
        runner, backward, step, sharded = shard(model)
    except (RuntimeError, NotImplementedError) as exc:
        result = {"skip": f"{args.backend} could not shard on CPU/gloo: {exc}"}
        if rank == 0:
            Path(args.out).write_text(json.dumps(result))
        return 0

    # Pool pass: eval mode, no_grad outside, gradients only to the layer outputs, past the
    # DeepSpeed engine as attent-pretrain does.
    runner.eval()
    with torch.no_grad():
        with torch.enable_grad(), probe.recording(keep_outputs=True):
            logits = getattr(runner, "module", runner)(input_ids=tokens).logits
            ce = token_ce(logits, labels)
        pool = probe.score_now(ce, mask).tolist()
    runner.train()

    # Free source: the real training backward of a batch-mean loss, then an optimizer step.
    with probe.recording():
        logits = runner(input_ids=tokens).logits
    ce = token_ce(logits, labels)
    scores = probe.attach(ce, mask)
    backward((ce.sum(1) / mask.sum(1)).mean())
    step()
    free = scores.tolist()

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"free": free, "pool": pool, "reference": reference})
    if rank == 0:
        result = {"sharded": sharded, **{str(r): g for r, g in enumerate(gathered)}}
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    from attent_scale.comm import shutdown
    shutdown()  # once main's objects (model, groups) are gone: see attent_scale.comm.shutdown
    sys.exit(code)
