"""Fine-tune a causal LM on instruction data: Hugging Face Trainer, LoRA and the AtteNT teacher.

One process (CPU or GPU):
    attent-finetune --model runs/100m/hf --train data/gsm8k-train --eval data/gsm8k-val \
        --deepspeed configs/finetune_zero2.json --out runs/ft-attent
Several GPUs or CPU ranks on one machine:
    torchrun --nproc_per_node 2 -m attent_scale.finetune --model ... --deepspeed ...
The same job without the teacher: remove the "attent" section or pass --no-teacher.

The data comes from ``attent-instruct`` (prompt tokens masked with -100). LoRA (rank 128, alpha
128, every attention and MLP projection: the paper's recipe) is the default; ``--lora-rank 0``
trains every weight. ``--epochs`` counts passes; with the ``attent-simple`` preset the first is
full and the teacher keeps the 70% of examples with the highest answer-token loss for the others.

Build order: arguments, TrainingArguments (which starts the process group), data, model, LoRA,
trainer, train, save, report.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

LLAMA_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--train", required=True, help="attent-instruct output (hf or mds)")
    p.add_argument("--eval", default=None, help="attent-instruct output for validation loss")
    p.add_argument("--deepspeed", default=None,
                   help="DeepSpeed JSON (TrainingArguments(deepspeed=...)); its 'attent' section "
                        "switches the teacher on")
    p.add_argument("--no-teacher", action="store_true", help="ignore the 'attent' section")
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training data")
    p.add_argument("--max-steps", type=int, default=-1,
                   help="optimizer steps, overriding --epochs (a budget-matched full-data run); "
                        "-1: --epochs decides")
    p.add_argument("--batch-size", type=int, default=8, help="micro batch per rank")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="model init (LoRA), data order")
    p.add_argument("--lora-rank", type=int, default=128, help="0: full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=128)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default=LLAMA_PROJECTIONS,
                   help="comma-separated module names, or 'all-linear' (default: every attention "
                        "and MLP projection of Llama-style models)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--save-steps", type=int, default=0, help="optimizer steps between checkpoints")
    p.add_argument("--stop-after", type=int, default=0,
                   help="save a checkpoint and exit after this many optimizer steps (tests resume)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--log-ids", action="store_true",
                   help="write the ids each rank trains to out/ids.rank<R>.jsonl")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def stop_after(steps: int):
    """A callback that ends training after ``steps`` optimizer steps, saving a checkpoint first."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= steps:
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopAfter()


def main(argv=None) -> int:
    code = train(parse_args(argv))
    from .comm import shutdown
    shutdown()  # once train's frames (the Trainer, the model) are gone: see comm.shutdown
    return code


def train(args: argparse.Namespace) -> int:
    from .startup import quiet_known_warnings, skip_shm_allreduce
    quiet_known_warnings()  # before DeepSpeed is imported: it warns while it is imported
    import torch
    from transformers import DataCollatorForSeq2Seq, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from . import instruct
    from .comm import make_comm
    from .gsm8k import load_causal_lm
    from .hf_trainer import AttentTrainer
    from .runlock import lock_output_dir
    from .streaming_data import adopt_launcher_env, shared_memory_session

    if args.deepspeed:
        skip_shm_allreduce()  # before TrainingArguments starts DeepSpeed: training needs only gloo
    out = Path(args.out)
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio there).
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = ({"warmup_ratio": args.warmup_ratio} if "warmup_ratio" in names
              else {"warmup_steps": args.warmup_ratio})
    targs = TrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        lr_scheduler_type="cosine", **warmup,
        weight_decay=args.weight_decay, seed=args.seed, data_seed=args.seed, bf16=args.bf16,
        deepspeed=args.deepspeed, logging_steps=args.logging_steps, report_to=[],
        save_strategy="steps" if (args.save_steps or args.stop_after) else "no",
        save_steps=args.save_steps or max(args.stop_after, 1), save_only_model=False,
        dataloader_num_workers=args.workers, remove_unused_columns=False,
    )
    rank = int(os.environ.get("RANK", 0))
    comm = make_comm()  # TrainingArguments has started the process group
    out.mkdir(parents=True, exist_ok=True)
    lock_output_dir(out, comm, "attent-finetune")  # a second job on this --out stops, exit code 2

    # -- data ---------------------------------------------------------------------------------
    adopt_launcher_env()
    with shared_memory_session(comm) as track:  # MDS data: other jobs' shared memory stays
        train_ds = track(instruct.load(args.train, micro_batch=args.batch_size,
                                       shuffle_seed=args.seed))
        eval_ds = track(instruct.load(args.eval)) if args.eval else None
    tokenizer = instruct.load_tokenizer(args.model)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    # -- model ----------------------------------------------------------------------------------
    torch.manual_seed(args.seed)  # LoRA's random A matrices: user territory, not the teacher's
    model = load_causal_lm(args.model, torch.bfloat16 if args.bf16 else None)
    if args.lora_rank > 0:
        from peft import LoraConfig, get_peft_model
        targets = (args.lora_targets if args.lora_targets == "all-linear"
                   else [t for t in args.lora_targets.split(",") if t])
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                                 lora_dropout=args.lora_dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    # Under ZeRO-3 from_pretrained already partitioned the weights: ds_numel is the full size.
    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())

    # -- trainer --------------------------------------------------------------------------------
    trainer = AttentTrainer(
        model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=collator, attent=None if args.no_teacher else "deepspeed",
        log_ids=out if args.log_ids else None)
    if args.stop_after:
        trainer.add_callback(stop_after(args.stop_after))
    resume = None if args.no_resume or not out.exists() else get_last_checkpoint(str(out))
    if rank == 0:
        print(f"model {args.model}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M "
              f"trainable; {getattr(train_ds, 'full_size', None) or len(train_ds)} train examples; "
              f"teacher {'on' if trainer.attent_config else 'off'}"
              + (f"; resuming from {resume}" if resume else ""), flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    # state.max_steps: the plan's length (train() gives the caller's args.max_steps back).
    if args.stop_after and trainer.state.global_step < trainer.state.max_steps:
        if rank == 0:
            print(f"stopped after step {trainer.state.global_step} (--stop-after); resume with "
                  "the same command", flush=True)
        return 0

    # -- save and report ------------------------------------------------------------------------
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(str(out / "final"))  # collective under ZeRO-3 (gathers the weights)
    if rank == 0:
        tokenizer.save_pretrained(str(out / "final"))
        report = {"teacher": trainer.attent_config is not None, "steps": trainer.state.global_step,
                  "passes": trainer.pass_log, "trainable_params": trainable,
                  "lora_rank": args.lora_rank, "base_model": str(Path(args.model).resolve()),
                  **metrics}
        (out / "result.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({k: report[k] for k in ("teacher", "steps") if k in report} |
                         {k: v for k, v in metrics.items() if "loss" in k or "runtime" in k}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
