"""Throughput and MFU of the DeepSpeed training step, change by change, in one process on one GPU.

Each shape is built up from today's step in groups; every group keeps its variants alive together
and times them in interleaved rounds (each round one step of each, the start rotating), so drift
on the host hits all of them alike, and each group repeats the previous group's winner as its
anchor (ratios are only taken within a group):

  A  loss path   a  today: DeepSpeed ZeRO-1 bf16, eager, logits materialised, float32 CE, torch_adam
                 b  + torch.compile of each decoder block (regional, in place)
                 c  + fused linear cross-entropy: chunked, compiled, liger, cce
  B  optimizer   d  the winner with torch AdamW foreach / torch AdamW fused / DeepSpeed FusedAdam
  C  batch       e  the winner at other micro batches, and with activation checkpointing
  D  teacher     f  the winner plus per-example `loss` scores kept on the device (and `fgrad_norm`)
                 g  the plain PyTorch loop: fp32 master weights, bf16 autocast, torch fused AdamW,
                    SDPA, the same compiled blocks and loss kernel, gradient clipping 1.0
                 z  the winner under ZeRO-2

    python tools/bench_throughput.py --out runs/throughput          # 100m at 1024, 1b at 2048
    python tools/bench_throughput.py --device cpu --model tiny --seq-len 64 --steps 3 --out runs/tp

MFU = tokens/s x FLOP per token / peak, with FLOP per token = 6 N + 12 L T d_attn (PaLM's count:
N = every parameter except the input embedding table, so the output head counts; L layers, T the
sequence length, d_attn = heads x head dim; the attention term counts the full T x T product
although causal masking halves it; recomputation under activation checkpointing is not counted).
Peak: 989.4 TFLOP/s dense bf16 for H100/H200 SXM (--peak-tflops for other parts).

Writes throughput.json and throughput.md into --out after every group, so a run stopped at the
time limit still leaves what it finished; variants that cannot run (no CUDA, a package missing, out
of time) get a row saying why. --budget-s bounds the whole run (compilation included).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Variants of different sizes come and go in one process: without expandable segments the cached
# blocks of one fragment the memory the next needs (read when CUDA first allocates).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from attent_scale import fused_loss  # noqa: E402
from attent_scale.model import MODEL_SHAPES, build_model  # noqa: E402

# (seq len, micro batch, other micro batches tried in C, timed rounds, warm-up steps) per shape.
SHAPE_PLAN = {
    "tiny": (64, 4, [8], 3, 1),
    "demo": (64, 8, [16], 5, 2),
    "small": (512, 16, [32], 8, 2),
    "100m": (1024, 16, [32], 12, 3),
    "1b": (2048, 8, [16], 5, 2),
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0}
# Today's configs/zero1.json without its "attent" section, used where the file is absent.
DEFAULT_DS = {
    "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "steps_per_print": 10**9,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "betas": [0.9, 0.95],
                                              "weight_decay": 0.1, "torch_adam": True}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                             "warmup_type": "linear", "cos_min_ratio": 0.1}},
    "bf16": {"enabled": "auto", "check_grad_overflow": False},
    "timers": {"throughput": {"enabled": False}},
    "zero_optimization": {"stage": 1},
}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# -- set-up ---------------------------------------------------------------------------------------

def single_process_env() -> None:
    """A world of one, so deepspeed.init_distributed needs neither a launcher nor MPI."""
    if "RANK" in os.environ:
        return
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def jit_build_env() -> None:
    """What DeepSpeed's JIT-built ops (FusedAdam) need from the environment."""
    # ninja may live beside this interpreter (pip's ninja) without being on PATH.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                          os.environ.get("PATH", "")])
    # DeepSpeed's op builder cannot parse arch suffixes such as "9.0a" (int("0a")).
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if torch.cuda.is_available() and (not arch or any(c.isalpha() for c in arch.replace("PTX", ""))):
        major, minor = torch.cuda.get_device_capability(0)
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        log(f"TORCH_CUDA_ARCH_LIST={major}.{minor} for DeepSpeed's JIT ops (was {arch!r})")


def raise_recompile_limit() -> None:
    # Every (shape, micro batch, dtype, autocast) of the same decoder-block code is one cache
    # entry; past the default limit of 8 torch.compile silently runs the rest eagerly.
    import torch._dynamo.config as dc
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 64))
    if hasattr(dc, "accumulated_cache_size_limit"):
        dc.accumulated_cache_size_limit = max(dc.accumulated_cache_size_limit, 512)
    if hasattr(dc, "accumulated_recompile_limit"):
        dc.accumulated_recompile_limit = max(dc.accumulated_recompile_limit, 512)


def start_fused_adam_build(out: Path) -> Optional[subprocess.Popen]:
    """DeepSpeed's FusedAdam is compiled with nvcc on first use (~1 min): start it now, aside."""
    code = "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()"
    logf = open(out / "fused_adam_build.log", "w")
    return subprocess.Popen([sys.executable, "-c", code], stdout=logf, stderr=subprocess.STDOUT,
                            env=dict(os.environ), cwd=str(ROOT))


def ds_base_config(path: Optional[str]) -> dict:
    cfg = copy.deepcopy(DEFAULT_DS)
    if path and Path(path).is_file():
        cfg = json.loads(Path(path).read_text())
    cfg.pop("attent", None)
    params = cfg.get("scheduler", {}).get("params", {})
    for key, value in (("total_num_steps", 10**6), ("warmup_num_steps", 10)):
        if params.get(key) == "auto":
            params[key] = value
    cfg["steps_per_print"] = 10**9
    return cfg


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    """6 N + 12 L T d_attn, N without the input embedding (see the module doc)."""
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    n -= emb.numel() - (head.numel() if head is emb else 0)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 6.0 * n + 12.0 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * head_dim


def peak_tflops(args, device) -> Optional[float]:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# -- what is timed ----------------------------------------------------------------------------------

TEACH_SAMPLES = 1 << 16  # ids the teacher-on step books its batches under


@dataclass
class Trainer:
    """One model with its optimizer: a DeepSpeed engine, or the plain PyTorch reference loop."""

    name: str
    model: torch.nn.Module
    engine: object = None           # DeepSpeed engine, or None for the reference loop
    optimizer: object = None        # reference loop only
    static_bytes: int = 0           # parameters, gradients and optimizer state after warm-up
    warmed: bool = False
    teachings: dict = field(default_factory=dict)
    calls: int = 0

    def teaching_for(self, signal: str, micro: int):
        """A teacher (attent-soft, free scores of ``signal``) as the job runs it, one rank."""
        key = (signal, micro)
        if key not in self.teachings:
            from attent_scale import Teaching
            from attent_scale.comm import LocalComm
            self.teachings[key] = Teaching({"preset": "attent-soft", "signal": signal},
                                           TEACH_SAMPLES, 2, micro, comm=LocalComm(),
                                           announce=False)
        return self.teachings[key]

    def step(self, tokens, loss_path: str, impl: Optional[str] = None,
             signal: Optional[str] = None, cache: bool = True) -> None:
        net = self.engine if self.engine is not None else self.model
        autocast = (torch.autocast(tokens.device.type, dtype=torch.bfloat16)
                    if self.engine is None else torch.autocast(tokens.device.type, enabled=False))
        with autocast:
            if loss_path == "logits":
                # Today's job: the model's own head, then float32 CE over the materialised logits.
                kwargs = {} if cache else {"use_cache": False}
                logits = net(input_ids=tokens, **kwargs).logits
                labels = tokens[:, 1:]
                ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                     reduction="none").view(labels.shape)
                out = fused_loss.TokenLosses(ce, labels, None, "logits")
            else:
                logits = None
                out = net(input_ids=tokens, token_losses=True, impl=impl,
                          fgrad=signal == "fgrad_norm")
            if signal:
                # The teacher-on job's step: the public Teaching books the batch (free scores
                # kept on the device, flushed in bulk as the job does every 10 steps) and
                # returns the loss to backpropagate.
                teaching = self.teaching_for(signal, tokens.shape[0])
                ids = (np.arange(tokens.shape[0]) + self.calls * tokens.shape[0]) % TEACH_SAMPLES
                self.calls += 1
                if logits is not None:
                    loss = teaching.update(ids, logits=logits, labels=tokens)
                else:
                    loss = teaching.update(ids, token_losses=out.ce, labels=out.labels,
                                           fgrad_sq=out.fgrad_sq)
                if self.calls % 10 == 0:
                    teaching.flush()
            else:
                loss = out.ce.mean(dim=1).mean()
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


@dataclass
class Variant:
    key: str
    label: str
    micro: int
    run: Optional[Callable[[], None]] = None
    trainer: Optional[Trainer] = None
    skip: Optional[str] = None
    ms: list = field(default_factory=list)
    transient: int = 0
    warmup_s: float = 0.0
    graphs: int = 0
    status: str = "ok"
    note: str = ""


class Recorder:
    """Rows of finished variants, written to JSON and markdown after every group."""

    def __init__(self, args, out: Path, device):
        self.args, self.out, self.device = args, out, device
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.meta = {
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "peak_tflops": peak_tflops(args, device),
            "flop_formula": "6 N + 12 L T d_attn per token; N = parameters minus the input "
                            "embedding (the head counts)",
        }
        import importlib.metadata as md
        for dist in ("deepspeed", "transformers", "triton", "liger-kernel", "cut-cross-entropy"):
            try:
                self.meta[dist.replace("-", "_")] = md.version(dist)
            except md.PackageNotFoundError:
                pass

    def add(self, shape: str, group: str, v: Variant, tokens_per_step: int, fpt: float,
            anchor_ms: Optional[float]) -> dict:
        row = {"shape": shape, "group": group, "variant": v.key, "label": v.label,
               "micro": v.micro, "status": v.status if not v.skip else "skipped",
               "reason": v.skip or v.note, "rounds": len(v.ms)}
        if v.ms and not v.skip:
            ms = statistics.median(v.ms)
            tok_s = tokens_per_step / ms * 1e3
            peak = self.meta["peak_tflops"]
            row.update(ms=ms, ms_min=min(v.ms), ms_max=max(v.ms), tokens_s=tok_s,
                       mfu=tok_s * fpt / (peak * 1e12) if peak else None,
                       vs_anchor=(ms / anchor_ms) if anchor_ms else None,
                       warmup_s=v.warmup_s, graphs=v.graphs)
            if self.device.type == "cuda" and v.trainer is not None:
                row["peak_gib"] = (v.trainer.static_bytes + v.transient) / 2**30
        self.rows.append(row)
        return row

    def write(self) -> None:
        data = {"meta": self.meta, "notes": self.notes, "rows": self.rows}
        (self.out / "throughput.json").write_text(json.dumps(data, indent=1, default=str))
        (self.out / "throughput.md").write_text(self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# Training-step throughput: {m['device']}", "",
                 f"`{m['command']}`, started {m['started']}; torch {m['torch']}, deepspeed "
                 f"{m.get('deepspeed', '-')}, transformers {m.get('transformers', '-')}, triton "
                 f"{m.get('triton', '-')}, liger-kernel {m.get('liger_kernel', '-')}, "
                 f"cut-cross-entropy {m.get('cut_cross_entropy', '-')}.", "",
                 f"MFU = tokens/s x ({m['flop_formula']}) / {m['peak_tflops'] or 'n/a'} TFLOP/s. "
                 "ms/step: median over interleaved rounds (min-max); 'x anchor': time per token "
                 "relative to the group's first row. Peak GiB: this variant's parameters, "
                 "gradients and optimizer state plus its step's transient peak. Warm-up: seconds "
                 "of the warm-up steps, compilation included, and the graphs torch.compile made "
                 "in them.", "",
                 "| shape | group | variant | micro | ms/step (min-max) | tokens/s | MFU | "
                 "x anchor | peak GiB | warm-up s (graphs) | notes |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            if "ms" not in r:
                lines.append(f"| {r['shape']} | {r['group']} | {r['variant']} {r['label']} | "
                             f"{r['micro']} | {r['status']} | | | | | | {r['reason']} |")
                continue
            mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "n/a"
            rel = f"{r['vs_anchor']:.3f}" if r.get("vs_anchor") is not None else ""
            peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else ""
            lines.append(
                f"| {r['shape']} | {r['group']} | {r['variant']} {r['label']} | {r['micro']} | "
                f"{r['ms']:.2f} ({r['ms_min']:.2f}-{r['ms_max']:.2f}) | {r['tokens_s']:,.0f} | "
                f"{mfu} | {rel} | {peak} | {r['warmup_s']:.1f} ({r['graphs']}) | {r['reason']} |")
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


# -- building -------------------------------------------------------------------------------------

def decoder_blocks(model) -> list:
    return list(fused_loss.check_head(model).layers)


def compile_blocks(model) -> None:
    """Regional compilation, as torchtitan does: each decoder block compiled in place.

    Blocks share their code, so one compilation serves all of them; ``Module.compile`` keeps the
    state dict's keys (torch.compile(module) would prefix them with ``_orig_mod.``).
    """
    for block in decoder_blocks(model):
        block.compile(dynamic=False)


def new_model(shape: str, vocab: int, seq: int, device) -> torch.nn.Module:
    # Built on the device: initialising a 1B model on the host takes longer than its benchmark.
    with torch.device(device):
        model = build_model(shape, vocab, seq, seed=0)
    # Activation checkpointing in transformers acts in training mode only.
    return fused_loss.enable_token_losses(model.train())


def ds_trainer(name, args, shape, seq, micro, device, *, compiled: bool, adam: str,
               zero: int) -> Trainer:
    """A DeepSpeed engine of today's config with the given optimizer, ZeRO stage and compilation."""
    import deepspeed
    before = allocated(device)
    model = new_model(shape, args.vocab_size, seq, device)
    if compiled:
        compile_blocks(model)
    cfg = ds_base_config(args.ds_config)
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": zero}
    # The config's other bf16 keys (check_grad_overflow) stay; "auto" resolves by device.
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": device.type == "cuda"}
    params = cfg["optimizer"]["params"]
    params.pop("fused", None)
    # torch_adam: torch.optim.AdamW, every other key of "params" passed through to it.
    params["torch_adam"] = adam != "ds-fused"
    if adam == "torch-fused":
        params["fused"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=cfg)
    return Trainer(name, model, engine=engine, static_bytes=allocated(device) - before)


def ref_trainer(args, shape, seq, device, compiled: bool) -> Trainer:
    """The plain loop: float32 weights, bf16 autocast in the step, torch's fused AdamW."""
    before = allocated(device)
    model = new_model(shape, args.vocab_size, seq, device)
    if compiled:
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.003, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)
    return Trainer("ref", model, optimizer=opt, static_bytes=allocated(device) - before)


def release(*trainers: Optional[Trainer]) -> None:
    for t in trainers:
        if t is None:
            continue
        if t.engine is not None and hasattr(t.engine, "destroy"):
            try:
                t.engine.destroy()
            except Exception:  # noqa: BLE001 - best effort: the memory goes with gc below
                pass
        t.engine = t.optimizer = t.model = None
        t.teachings.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- timing ---------------------------------------------------------------------------------------

def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a diagnostic only
        return 0


def timed_step(v: Variant, device) -> None:
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        v.run()
        stop.record()
        stop.synchronize()
        v.ms.append(start.elapsed_time(stop))
        v.transient = max(v.transient, torch.cuda.max_memory_allocated(device) - base)
    else:
        t = time.perf_counter()
        v.run()
        v.ms.append((time.perf_counter() - t) * 1e3)


def failure(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:240]
    return f"failed: {type(exc).__name__}: {first}"


class Bench:
    def __init__(self, args, device, rec: Recorder):
        self.args, self.device, self.rec = args, device, rec
        self.deadline = T0 + args.budget_s

    def left(self) -> float:
        return self.deadline - time.time()

    def group(self, shape: str, name: str, variants: list[Variant], rounds: int, warmup: int,
              seq: int, fpt: float, stop_at: float) -> list[Variant]:
        """Warm every variant up, then time them in interleaved rounds; rows go to the recorder."""
        live = []
        for v in variants:
            if v.skip:
                continue
            if time.time() > stop_at:
                v.skip = "out of time (--budget-s) before its warm-up"
                continue
            log(f"{shape} {name}: warm-up {v.key} {v.label} (micro {v.micro})")
            graphs, t = dynamo_graphs(), time.time()
            before = allocated(self.device)
            try:
                for _ in range(warmup):
                    v.run()
                sync(self.device)
                if v.trainer is not None and not v.trainer.warmed:
                    # Optimizer state and gradient buffers appear at the first step.
                    v.trainer.static_bytes += allocated(self.device) - before
                    v.trainer.warmed = True
                live.append(v)
            except Exception as exc:  # noqa: BLE001 - one variant failing must not end the run
                v.skip = failure(exc)
                log(f"  {v.key}: {v.skip}")
                traceback.print_exc(limit=4)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            v.warmup_s, v.graphs = time.time() - t, dynamo_graphs() - graphs
        for r in range(rounds):
            spent = max((sum(v.ms[-1:]) for v in live), default=0) * len(live) / 1e3
            if r >= 3 and time.time() + 2 * spent > stop_at:
                for v in live:
                    v.note = f"stopped after {r} rounds (--budget-s)"
                break
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for v in order:
                try:
                    timed_step(v, self.device)
                except Exception as exc:  # noqa: BLE001
                    v.skip = failure(exc)
                    live.remove(v)
                    log(f"  {v.key}: {v.skip}")
        anchor = next((v for v in variants if v.ms and not v.skip), None)
        for v in variants:
            tokens = v.micro * seq
            anchor_ms = (statistics.median(anchor.ms) * v.micro / anchor.micro
                         if anchor is not None else None)
            row = self.rec.add(shape, name, v, tokens, fpt, anchor_ms)
            if "ms" in row:
                mfu = f"{row['mfu'] * 100:.1f}% MFU" if row.get("mfu") is not None else ""
                log(f"  {v.key:<16} {row['ms']:9.2f} ms  {row['tokens_s']:>12,.0f} tok/s  {mfu}")
            else:
                log(f"  {v.key:<16} {row['status']}: {row['reason']}")
        self.rec.write()
        return [v for v in variants if v.ms and not v.skip]


def fastest(variants: list) -> Optional[Variant]:
    """The variant with the most tokens per second (micro batches may differ)."""
    done = [v for v in variants if v.ms and not v.skip]
    return min(done, key=lambda v: statistics.median(v.ms) / v.micro) if done else None


def check_kernels(trainer: Trainer, tokens, impls, device) -> dict:
    """Each loss kernel against a float32 reference on this shape's real hidden states."""
    decoder = fused_loss.check_head(trainer.model)
    hidden = decoder(input_ids=tokens, use_cache=False).last_hidden_state.detach()
    weight = trainer.model.get_output_embeddings().weight.detach()
    gen = torch.Generator(device=device).manual_seed(0)
    upstream = torch.rand(tokens.shape[0], tokens.shape[1] - 1, device=device, generator=gen)

    def run(impl, h, w):
        h = h.clone().requires_grad_()
        w = w.clone().requires_grad_()
        out = fused_loss.fused_token_losses(h, w, tokens, impl)
        out.ce.backward(upstream)
        return out.ce.detach(), h.grad.float(), w.grad.float()

    ce0, gh0, gw0 = run("torch", hidden.float(), weight.float())
    result = {}
    for impl in ["torch"] + list(impls):
        try:
            ce, gh, gw = run(impl, hidden, weight)
            result[impl] = (f"vs fp32: ce max|d| {(ce - ce0).abs().max().item():.1e}, "
                            f"dh rel {((gh - gh0).norm() / gh0.norm()).item():.1e}, "
                            f"dW rel {((gw - gw0).norm() / gw0.norm()).item():.1e}")
        except Exception as exc:  # noqa: BLE001 - reported in the row
            result[impl] = failure(exc)
    if device.type == "cuda":
        try:
            result["auto"] = fused_loss.choose_impl(hidden, weight, tokens).reason
        except Exception as exc:  # noqa: BLE001
            result["auto"] = failure(exc)
    return result


# -- one shape ------------------------------------------------------------------------------------

@dataclass
class Winner:
    """The best step so far, carried from group to group."""

    trainer: Trainer
    path: str            # "logits" (the model's head) or "fused"
    impl: Optional[str]  # the fused kernel
    cache: bool          # today's step leaves the model's KV cache on
    adam: str = "foreach"
    micro: int = 0


def skipped_row(rec: Recorder, shape: str, group: str, key: str, micro: int, why: str) -> None:
    rec.rows.append({"shape": shape, "group": group, "variant": key, "label": "", "micro": micro,
                     "status": "skipped", "reason": why, "rounds": 0})


def run_shape(bench: Bench, shape: str, stop_at: float, adam_build) -> None:
    args, device, rec = bench.args, bench.device, bench.rec
    seq, micro, micro_alt, rounds, warmup = SHAPE_PLAN.get(shape, SHAPE_PLAN["100m"])
    seq = args.seq_len or seq
    micro = args.micro or micro
    micro_alt = [m for m in (args.micro_alt if args.micro_alt is not None else micro_alt)
                 if m != micro]
    rounds = args.steps or rounds
    warmup = args.warmup or warmup
    cuda = device.type == "cuda"
    compile_on = args.compile == "regional" or (args.compile == "auto" and cuda)
    gen = torch.Generator().manual_seed(0)
    batch = {m: torch.randint(0, args.vocab_size, (m, seq), generator=gen).to(device)
             for m in sorted({micro, *micro_alt})}
    tokens = batch[micro]
    zero = args.zero
    log(f"== {shape}: seq {seq}, micro {micro} (also {micro_alt}), {rounds} rounds, {warmup} "
        f"warm-up steps, ZeRO-{zero}, compile {'regional' if compile_on else 'off'}; "
        f"{stop_at - time.time():.0f} s for this shape")

    def step_fn(w: Winner, trainer: Trainer, m: int, signal=None, ac=False, impl=None):
        def run():
            if ac:
                trainer.model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            try:
                trainer.step(batch[m], w.path, impl=impl or w.impl, signal=signal, cache=w.cache)
            finally:
                if ac:
                    trainer.model.gradient_checkpointing_disable()
        return run

    # -- A: loss path ------------------------------------------------------------------------
    eager = ds_trainer("eager", args, shape, seq, micro, device, compiled=False,
                       adam="foreach", zero=zero)
    fpt = flops_per_token(eager.model, seq)
    n_params = sum(p.numel() for p in eager.model.parameters())
    rec.notes.append(f"{shape}: {n_params / 1e6:.1f}M parameters, {fpt / 1e9:.3f} GFLOP per "
                     f"token at T={seq} (x{micro * seq} tokens per micro batch {micro})")
    comp = (ds_trainer("compiled", args, shape, seq, micro, device, compiled=True,
                       adam="foreach", zero=zero) if compile_on else eager)
    probe = torch.empty(0, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    why_not = {impl: fused_loss.unavailable(impl, probe) for impl in args.impls}
    if "compiled" in why_not and not compile_on:
        why_not["compiled"] = "torch.compile is off on this device (--compile regional to try)"
    runnable = [impl for impl, why in why_not.items() if why is None]
    t = time.time()
    try:
        # The first compiled forward happens here: its time stands for one block compilation.
        for impl, text in check_kernels(comp, tokens, runnable, device).items():
            rec.notes.append(f"{shape} loss kernel {impl}: {text}")
    except Exception as exc:  # noqa: BLE001 - group A then shows which variants fail
        rec.notes.append(f"{shape} loss kernel check: {failure(exc)}")
        traceback.print_exc(limit=4)
    check_s = time.time() - t
    rec.notes.append(f"{shape}: the kernel check took {check_s:.1f} s, the blocks' first "
                     "compilation included (so b's warm-up shows little)")
    rec.write()
    group_a = [Variant("a", "today: eager, logits + fp32 CE", micro,
                       step_fn(Winner(eager, "logits", None, True), eager, micro), eager)]
    if compile_on:
        group_a.append(Variant("b", "+ compiled blocks, logits + fp32 CE", micro,
                               step_fn(Winner(comp, "logits", None, False), comp, micro), comp))
    else:
        group_a.append(Variant("b", "+ compiled blocks", micro, skip=f"--compile {args.compile} "
                               f"(off on {device.type} unless --compile regional)"))
    base = "compiled blocks" if compile_on else "eager"
    for impl in args.impls:
        group_a.append(Variant(f"c:{impl}", f"+ fused CE ({impl}), {base}", micro,
                               step_fn(Winner(comp, "fused", impl, False), comp, micro), comp,
                               skip=why_not[impl]))
    done = bench.group(shape, "A loss path", group_a, rounds, warmup, seq, fpt, stop_at)
    best = fastest(done)
    if best is None:
        rec.notes.append(f"{shape}: nothing in group A ran; later groups skipped")
        release(eager, comp)
        return
    win = Winner(best.trainer, *(("fused", best.key[2:]) if best.key.startswith("c:")
                                 else ("logits", None)), cache=best.key == "a", micro=micro)
    release(*{id(t): t for t in (eager, comp) if t is not win.trainer}.values())
    rec.notes.append(f"{shape}: group A winner {best.key} ({best.label})")

    # What the later groups cost, so that D (the teacher's overhead) keeps its time.
    per_step = statistics.median(best.ms) / 1e3
    compile_s = max([v.warmup_s for v in done if v.key != "a"] + [check_s, 5.0])
    cost = {"B": 3 * (rounds + warmup) * per_step * 1.5 + 10,
            "C": (1 + len(micro_alt) + 1) * (rounds + warmup) * per_step * 3 + 2 * compile_s,
            "D": 5 * (2 * rounds + warmup) * per_step * 2 + compile_s + 10}

    # -- B: optimizer ---------------------------------------------------------------------------
    if "B" in args.skip_groups:
        skipped_row(rec, shape, "B optimizer", "d", micro, "--skip-groups B")
    elif time.time() + cost["B"] + cost["D"] > stop_at:
        skipped_row(rec, shape, "B optimizer", "d", micro, "out of time (--budget-s): its time "
                    "went to group D")
    else:
        group_b = [Variant("d:foreach", "torch AdamW foreach (anchor)", micro,
                           step_fn(win, win.trainer, micro), win.trainer)]
        built = {}
        for adam, label in (("torch-fused", "torch AdamW fused=True"),
                            ("ds-fused", "DeepSpeed FusedAdam")):
            why = fused_adam_ready(adam_build, cuda, stop_at) if adam == "ds-fused" else None
            if why is None:
                try:
                    built[adam] = ds_trainer(adam, args, shape, seq, micro, device,
                                             compiled=compile_on, adam=adam, zero=zero)
                except Exception as exc:  # noqa: BLE001
                    why = failure(exc)
            t = built.get(adam)
            group_b.append(Variant(f"d:{adam}", label, micro,
                                   step_fn(win, t, micro) if t else None, t, skip=why))
        done_b = bench.group(shape, "B optimizer", group_b, rounds, warmup, seq, fpt,
                             stop_at - cost["D"])
        best_b = fastest(done_b)
        if best_b is not None and best_b.trainer is not win.trainer:
            release(win.trainer)
            win.trainer, win.adam = best_b.trainer, best_b.key[2:]
        release(*(t for t in built.values() if t is not win.trainer))
        rec.notes.append(f"{shape}: group B winner d:{win.adam}")

    # -- C: micro batch, activation checkpointing ----------------------------------------------
    if "C" in args.skip_groups:
        skipped_row(rec, shape, "C batch", "e", micro, "--skip-groups C")
    elif time.time() + cost["C"] + cost["D"] > stop_at:
        skipped_row(rec, shape, "C batch", "e", micro, "out of time (--budget-s): its time went "
                    "to group D")
    else:
        group_c = [Variant(f"e:micro{micro}", "winner (anchor)", micro,
                           step_fn(win, win.trainer, micro), win.trainer)]
        for m in micro_alt:
            group_c.append(Variant(f"e:micro{m}", "winner", m, step_fn(win, win.trainer, m),
                                   win.trainer))
        top = max([micro, *micro_alt])
        group_c.append(Variant(f"e:micro{top}+ac", "winner + activation checkpointing", top,
                               step_fn(win, win.trainer, top, ac=True), win.trainer,
                               skip="--skip-groups ac" if "ac" in args.skip_groups else None))
        best_c = fastest([v for v in bench.group(shape, "C batch", group_c, rounds, warmup, seq,
                                                 fpt, stop_at - cost["D"]) if "+ac" not in v.key])
        if best_c is not None:
            win.micro = best_c.micro

    # -- D: teacher, reference loop, ZeRO-2 ---------------------------------------------------
    m = win.micro
    fgrad_impl = win.impl if win.impl in fused_loss.FGRAD_IMPLS else (
        "compiled" if compile_on else "chunked")
    group_d = [Variant("f:off", "winner, no scores (anchor)", m,
                       step_fn(win, win.trainer, m), win.trainer),
               Variant("f:loss", "+ teacher `loss` scores kept on device", m,
                       step_fn(win, win.trainer, m, signal="loss"), win.trainer),
               Variant("f:fgrad", "+ teacher `fgrad_norm` scores " + (
                   f"({fgrad_impl} kernel)" if win.path == "fused" else "(from the logits)"), m,
                       step_fn(win, win.trainer, m, signal="fgrad_norm", impl=fgrad_impl),
                       win.trainer)]
    extra = []
    try:
        extra.append(ref_trainer(args, shape, seq, device, compile_on))
        group_d.append(Variant("g:ref", "plain PyTorch: fp32 master, bf16 autocast, fused AdamW",
                               m, step_fn(win, extra[-1], m), extra[-1]))
    except Exception as exc:  # noqa: BLE001
        group_d.append(Variant("g:ref", "plain PyTorch loop", m, skip=failure(exc)))
    if "zero2" in args.skip_groups or zero == 2:
        group_d.append(Variant("z:zero2", "winner under ZeRO-2", m,
                               skip="--skip-groups zero2" if zero != 2 else "--zero 2 already"))
    else:
        try:
            extra.append(ds_trainer("zero2", args, shape, seq, m, device, compiled=compile_on,
                                    adam=win.adam, zero=2))
            group_d.append(Variant("z:zero2", f"winner under ZeRO-2 ({win.adam})", m,
                                   step_fn(win, extra[-1], m), extra[-1]))
        except Exception as exc:  # noqa: BLE001
            group_d.append(Variant("z:zero2", "winner under ZeRO-2", m, skip=failure(exc)))
    # The teacher's cost is a few percent at most: small models get more rounds for the median.
    d_rounds = 2 * rounds if per_step < 0.1 else rounds
    bench.group(shape, "D teacher+ref", group_d, d_rounds, warmup, seq, fpt,
                min(stop_at + 30, bench.deadline))
    off = group_d[0]
    for v in group_d[1:3]:
        if off.ms and v.ms and not v.skip and not off.skip:
            ratio = statistics.median(v.ms) / statistics.median(off.ms) - 1
            rec.notes.append(f"{shape}: teacher overhead, {v.key[2:]} scores: {ratio:+.2%} of "
                             f"the step ({len(v.ms)} interleaved rounds)")
    rec.write()
    release(win.trainer, *extra)


def fused_adam_ready(proc, cuda: bool, stop_at: float) -> Optional[str]:
    """None when DeepSpeed's FusedAdam is built, else why not."""
    if not cuda:
        return "DeepSpeed FusedAdam needs CUDA"
    if proc is None:
        return "FusedAdam build not started (--no-fused-adam)"
    wait = max(0.0, min(90.0, stop_at - time.time() - 60))
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        return f"FusedAdam's JIT build still running after waiting {wait:.0f} s"
    if proc.returncode != 0:
        return f"FusedAdam's JIT build failed (rc {proc.returncode}; see fused_adam_build.log)"
    return None


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/throughput")
    p.add_argument("--model", default="100m,1b",
                   help=f"comma-separated shapes of {', '.join(MODEL_SHAPES)}")
    p.add_argument("--seq-len", type=int, default=None, help="override the shapes' plan")
    p.add_argument("--micro", type=int, default=None, help="micro batch of groups A, B")
    p.add_argument("--micro-alt", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=None, help="other micro batches for group C (comma-separated)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds per group")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--zero", type=int, choices=(1, 2), default=1)
    p.add_argument("--ds-config", default=str(ROOT / "configs" / "zero1.json"),
                   help="DeepSpeed JSON of today's job (its 'attent' section is ignored)")
    p.add_argument("--impls", type=lambda s: [x for x in s.split(",") if x],
                   default=["chunked", "compiled", "liger", "cce"],
                   help="fused loss kernels for group A")
    p.add_argument("--compile", choices=("auto", "regional", "off"), default="auto",
                   help="auto: regional on CUDA, off on CPU")
    p.add_argument("--skip-groups", default="", help="any of B, C, zero2 (comma-separated)")
    p.add_argument("--no-fused-adam", action="store_true", help="do not build DeepSpeed FusedAdam")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="stop starting new work after this many seconds")
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args(argv)
    args.skip_groups = {x.strip() for x in args.skip_groups.split(",") if x.strip()}
    unknown = [m for m in args.model.split(",") if m not in MODEL_SHAPES]
    if unknown:
        p.error(f"--model {','.join(unknown)}: unknown; allowed: {', '.join(MODEL_SHAPES)}")
    bad = [i for i in args.impls if i not in fused_loss.IMPLS or i in ("auto", "torch")]
    if bad:
        p.error(f"--impls {','.join(bad)}: allowed: chunked, compiled, liger, cce")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_throughput: --device cuda but torch sees no GPU; use --device cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    single_process_env()
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        jit_build_env()
    raise_recompile_limit()
    adam_build = (start_fused_adam_build(out)
                  if device.type == "cuda" and not args.no_fused_adam else None)
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rec = Recorder(args, out, device)
    if device.type != "cuda":
        rec.notes.append("CPU run: float32 throughout (no bf16), DeepSpeed FusedAdam, Liger and "
                         "CCE skipped; timings show the plumbing works, not speed")
    bench = Bench(args, device, rec)
    shapes = args.model.split(",")
    for i, shape in enumerate(shapes):
        share = bench.left() / (len(shapes) - i)
        stop_at = time.time() + share
        try:
            run_shape(bench, shape, stop_at, adam_build)
        except Exception as exc:  # noqa: BLE001 - the next shape still runs
            rec.notes.append(f"{shape}: stopped by {failure(exc)}")
            log(f"{shape}: {failure(exc)}")
            traceback.print_exc()
        rec.write()
        release()
    if adam_build is not None and adam_build.poll() is None:
        adam_build.kill()
    log(f"done; {out / 'throughput.md'}")
    print(rec.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
