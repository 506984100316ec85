"""The training loop: AdamW + warmup/decay, gradient accumulation, cached embeddings, periodic
evaluation, metrics.jsonl, atomic checkpoints and exact resume.

Exact resume means the resumed run's losses equal an uninterrupted run's. Everything that decides a
future step is checkpointed: trainable weights (LoRA adapter or all weights, plus a learnable scale),
AdamW moments, the scheduler, the data position (ExampleStream.state_dict) and every RNG (dropout).
Evaluation runs under fork_rng so that evaluating or not never shifts the dropout stream.
"""
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from prcl.training.batching import build_batch
from prcl.training.data import ExampleStream, read_examples
from prcl.training.step import LOSSES, batch_loss, forward_backward

SCHEDULES = ("linear", "cosine", "constant")


@dataclasses.dataclass
class TrainConfig:
    """Every option of `prcl train`; the CLI flags and --config keys have these names (dashes allowed)."""
    model: str = None
    data: str = None
    out: str = None
    eval: str = None
    gguf_file: str = None
    batch_size: int = 32  # queries per optimizer micro-step, over all ranks
    mini_batch_size: int = None  # texts per encoder call; None = no embedding cache (all graphs kept)
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = None  # None = 10% of max_steps
    schedule: str = "linear"
    max_grad_norm: float = None
    loss: str = "prcl"
    scale: float = 10.0
    learn_scale: bool = False
    bias: float = None  # None = −log(N − 1) from each batch's N
    dedup: bool = True
    backend: str = None
    lora_r: int = 16  # 0 = train every weight
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_layers: int = 0  # LoRA on the last K transformer layers only (0 = all): backward stops below them
    pooling: str = "mean"
    max_length: int = 512
    dtype: str = None  # weights' dtype when loading: float32, bfloat16, float16 (None = the checkpoint's)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    bf16: bool = True  # bf16 autocast on CUDA; ignored on CPU
    device: str = None  # None = cuda if available
    eval_every: int = 0  # 0 = evaluate before training and at the end only
    eval_k: tuple = (1, 5, 10)
    eval_batch_size: int = 32
    eval_max_queries: int = None  # evaluate on the first M queries of --eval (and their documents) only
    checkpoint_every: int = 50
    keep_checkpoints: int = 1
    resume: bool = False
    seed: int = 0
    shuffle: bool = True
    shuffle_block: int = 4096
    skip_bad_lines: bool = False
    progress: bool = True

    def validate(self):
        for name in ("data", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        for name in ("data", "eval"):
            if getattr(self, name) and not os.path.isfile(getattr(self, name)):
                raise ValueError(f"{name}: no such file {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_batch_size", "keep_checkpoints",
                     "shuffle_block", "max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.mini_batch_size is not None and (not isinstance(self.mini_batch_size, int) or self.mini_batch_size < 1):
            raise ValueError(f"mini_batch_size: expected a positive int or None, got {self.mini_batch_size!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if not self.scale > 0:
            raise ValueError(f"scale: must be > 0, got {self.scale}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r: must be >= 0 (0 trains every weight), got {self.lora_r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.lora_layers < 0:
            raise ValueError(f"lora_layers: must be >= 0 (0 = every layer), got {self.lora_layers}")
        if self.eval_max_queries is not None and self.eval_max_queries < 1:
            raise ValueError(f"eval_max_queries: must be >= 1, got {self.eval_max_queries}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every and checkpoint_every: must be >= 0 (0 = off)")
        if not self.eval_k or any(int(k) < 1 for k in self.eval_k):
            raise ValueError(f"eval_k: expected positive ints, got {self.eval_k!r}")


def lr_lambda(warmup, total, schedule):
    """Multiplier of the peak lr at a step: linear warmup from 0, then linear/cosine decay to 0."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


# ---- evaluation ------------------------------------------------------------------------------------------

@torch.no_grad()
def _encode(encoder, texts, instruction, batch_size):
    if hasattr(encoder, "encode"):
        return encoder.encode(texts, instruction=instruction, batch_size=batch_size).float()
    return torch.cat([encoder.embed(texts[k: k + batch_size], instruction=instruction).float()
                      for k in range(0, len(texts), batch_size)])


def evaluate(encoder, examples, *, ks=(1, 5, 10), batch_size=32, autocast=contextlib.nullcontext):
    """Retrieval over the evaluation set: every query against every distinct document of the file.

    Relevant = the query's positives (graded documents and negatives are part of the corpus only).
    recall@k = share of a query's positives in its top k, averaged over queries; MRR = mean 1/rank of
    the first positive (full ranking, no cut-off).
    """
    docs, col = [], {}
    for ex in examples:
        for text, _ in ex.documents():
            if text not in col:
                col[text] = len(docs)
                docs.append(text)
    with torch.random.fork_rng(devices=[]), autocast():
        d = _encode(encoder, docs, None, batch_size)
        by_ins = {}
        for i, ex in enumerate(examples):
            by_ins.setdefault(ex.instruction, []).append(i)
        q = torch.empty(len(examples), d.shape[1], device=d.device)
        for ins, idx in by_ins.items():
            q[idx] = _encode(encoder, [examples[i].query for i in idx], ins, batch_size)
    s = (q @ d.T).cpu()
    order = s.argsort(dim=1, descending=True)
    rank_of = torch.empty_like(order)
    rank_of.scatter_(1, order, torch.arange(1, len(docs) + 1).expand_as(order).contiguous())
    recall = {k: 0.0 for k in ks}
    rr = 0.0
    for i, ex in enumerate(examples):
        ranks = rank_of[i, [col[t] for t in set(ex.positives)]]
        rr += 1.0 / ranks.min().item()
        for k in ks:
            recall[k] += (ranks <= k).float().mean().item()
    n = len(examples)
    out = {f"recall@{k}": recall[k] / n for k in ks}
    out.update(mrr=rr / n, queries=n, documents=len(docs))
    return out


# ---- checkpoints -----------------------------------------------------------------------------------------

def _rng_states():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def checkpoints(out):
    """[(step, path)] of the complete checkpoints in out, oldest first (temp dirs are not complete)."""
    found = []
    for p in Path(out).glob("checkpoint-*"):
        if p.is_dir() and p.name.split("-", 1)[1].isdigit() and (p / "state.pt").exists():
            found.append((int(p.name.split("-", 1)[1]), p))
    return sorted(found)


def _save_checkpoint(out, step, state, rank, world, encoder, keep):
    """Write to .checkpoint-STEP.tmp, then rename: a crash leaves either the old or the new checkpoint."""
    out = Path(out)
    tmp, final = out / f".checkpoint-{step}.tmp", out / f"checkpoint-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world)
    # each rank's RNG differs (per-rank dropout seeds); weights, optimizer and data position do not
    torch.save(_rng_states(), tmp / f"rng-{rank}.pt")
    if rank == 0:
        torch.save(state, tmp / "state.pt")
        if getattr(encoder, "_is_peft", lambda: False)():
            encoder.save_adapter(tmp / "adapter")  # usable by `prcl encode --adapter` as is
        (tmp / "state.json").write_text(json.dumps({"step": step, "data": state["data"]}) + "\n")
    _barrier(world)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world)


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


# ---- the loop --------------------------------------------------------------------------------------------

def load_encoder(cfg):
    """An LLMEncoder for cfg.model (a directory or .gguf), with a fresh LoRA adapter unless lora_r = 0."""
    from prcl.encoders import LLMEncoder

    if not cfg.model:
        raise ValueError("model: required (a local model directory or .gguf file)")
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    enc = LLMEncoder.from_pretrained(cfg.model, attn_implementation=cfg.attn_implementation, dtype=dtype,
                                     gguf_file=cfg.gguf_file, pooling=cfg.pooling, max_length=cfg.max_length,
                                     gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.lora_r > 0:
        extra = {}
        if cfg.lora_layers:
            n = enc.model.config.num_hidden_layers
            layers = "|".join(str(i) for i in range(max(0, n - cfg.lora_layers), n))
            # a regex over module names: peft's layers_to_transform refuses target_modules="all-linear"
            # and misses a base model's top-level "layers.N." prefix
            linears = sorted({name.rsplit(".", 1)[-1] for name, m in enc.model.named_modules()
                              if isinstance(m, torch.nn.Linear) and "layers." in name})
            extra["target_modules"] = rf"(.*\.)?layers\.({layers})\..*\.({'|'.join(linears)})"
        enc.add_lora(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, **extra)
    else:
        enc.model.requires_grad_(True)
    return enc


class _Metrics:
    """OUT/metrics.jsonl, one object per optimizer step; on resume, lines past the checkpoint are dropped
    (the interrupted run may have logged steps that the resumed run repeats)."""

    def __init__(self, path, resume_step, enabled):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        keep = []
        if resume_step and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= resume_step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train(cfg, encoder=None, log=print):
    """Fine-tune `encoder` (loaded from cfg.model when None) on cfg.data. Returns a summary dict with
    the losses per step and the evaluations before and after."""
    from prcl.training.distributed import setup, sum_gradients, sum_scalar

    cfg.validate()
    process_group, rank, world = setup()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size: {cfg.batch_size} queries do not split over {world} ranks")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(cfg.out)
    found = checkpoints(out) if out.exists() else []
    if found and not cfg.resume:
        raise ValueError(f"out: {out} already holds {found[-1][1].name}; pass --resume to continue it "
                         "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # LoRA's initialisation: identical on every rank
    random.seed(cfg.seed)
    encoder = encoder or load_encoder(cfg)
    model = encoder.model.to(device)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    log_scale = torch.nn.Parameter(torch.tensor(math.log(cfg.scale), device=device)) if cfg.learn_scale else None
    groups = [{"params": [p for _, p in named], "weight_decay": cfg.weight_decay}]
    if log_scale is not None:
        groups.append({"params": [log_scale], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.max_steps // 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, cfg.max_steps, cfg.schedule))
    stream = ExampleStream(cfg.data, block_size=cfg.shuffle_block, seed=cfg.seed, shuffle=cfg.shuffle,
                           skip_bad_lines=cfg.skip_bad_lines, log=log if rank == 0 else (lambda m: None))

    step = 0
    if cfg.resume and found:
        path = found[-1][1]
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        params = dict(named)
        if set(state["trainable"]) != set(params):
            raise ValueError(f"resume: {path} holds weights for other parameters than this model trains "
                             f"({len(state['trainable'])} vs {len(params)}); same --model and --lora-r?")
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
            if log_scale is not None:
                log_scale.copy_(state["log_scale"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        stream.skipped.count = state.get("skipped", 0)
        step = state["step"]
        rng = torch.load(path / f"rng-{rank}.pt", weights_only=False)
        if rank == 0:
            log(f"resumed from {path} at step {step}")
    else:
        if world > 1:  # same starting weights everywhere, whatever each rank's loader did
            for _, p in named:
                torch.distributed.broadcast(p.data, src=0)
        torch.manual_seed(cfg.seed + rank)  # dropout differs per rank
        rng = _rng_states()
    if rank == 0:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
        if step == 0:
            (out / "eval.jsonl").unlink(missing_ok=True)
    metrics = _Metrics(out / "metrics.jsonl", step, enabled=rank == 0)

    use_bf16 = cfg.bf16 and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    eval_examples = read_examples(cfg.eval)[: cfg.eval_max_queries] if cfg.eval else None

    def run_eval(at):
        result = None
        if rank == 0:
            model.eval()
            result = evaluate(encoder, eval_examples, ks=tuple(int(k) for k in cfg.eval_k),
                              batch_size=cfg.eval_batch_size, autocast=autocast)
            model.train()
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": at, **result}) + "\n")
            log(f"eval at step {at}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                                                      if k.startswith(("recall", "mrr"))))
        _barrier(world)
        return result

    summary = {"losses": [], "eval_before": None, "eval_after": None}
    if eval_examples and step == 0:
        summary["eval_before"] = run_eval(0)

    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)

    _set_rng_states(rng)
    examples = iter(stream)
    local = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        loss_sum, pairs = 0.0, 0
        for _ in range(cfg.grad_accum):
            # every rank reads the same global batch and keeps its slice: equal batch counts per rank
            batch = build_batch([next(examples) for _ in range(cfg.batch_size)][local], dedup=cfg.dedup)
            scale = log_scale.exp() if log_scale is not None else cfg.scale

            def loss_fn(q, d, batch=batch, scale=scale):
                return batch_loss(q, d, batch, loss=cfg.loss, scale=scale, bias=cfg.bias, backend=cfg.backend,
                                  process_group=process_group)

            loss = forward_backward(encoder, batch, loss_fn, mini_batch_size=cfg.mini_batch_size,
                                    cached=cfg.mini_batch_size is not None, device=device, autocast=autocast,
                                    loss_weight=1.0 / cfg.grad_accum)
            loss_sum += loss.item() / cfg.grad_accum
            # each query is scored against every rank's documents: count the global N
            n_docs = len(batch.docs) if world == 1 else sum_scalar(len(batch.docs), process_group)
            pairs += len(batch.queries) * n_docs
        trainable = [p for _, p in named] + ([log_scale] if log_scale is not None else [])
        if world > 1:
            # the ranks' losses SUM to the global loss, so its gradient is the SUM of theirs (DDP would average)
            sum_gradients(trainable, process_group)
            loss_sum, pairs = sum_scalar(loss_sum, process_group), sum_scalar(pairs, process_group)
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        record = {"step": step, "loss": loss_sum, "lr": lr, "pairs_per_s": pairs / dt, "step_time_s": dt,
                  "epoch": stream.state["epoch"], "queries": cfg.batch_size, "docs_per_rank": len(batch.docs)}
        if log_scale is not None:
            record["scale"] = log_scale.exp().item()
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        summary["losses"].append(loss_sum)
        if eval_examples and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            result = run_eval(step)
            if result:
                record.update({f"eval/{k}": v for k, v in result.items()})
                summary["eval_after"] = result
        metrics.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", pairs_s=f"{pairs / dt:,.0f}")
            bar.update(1)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
            state = {"step": step, "trainable": {n: p.detach().cpu() for n, p in named},
                     "log_scale": log_scale.detach().cpu() if log_scale is not None else None,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "data": stream.state_dict(), "skipped": stream.skipped.count}
            _save_checkpoint(out, step, state, rank, world, encoder, cfg.keep_checkpoints)
    if bar is not None:
        bar.close()

    if rank == 0:
        _save_final(out, encoder, cfg, log_scale)
        if stream.skipped.count:
            log(stream.skipped.summary(cfg.data))
    summary["skipped"] = stream.skipped.count
    summary["step"] = step
    return summary


def _save_final(out, encoder, cfg, log_scale):
    """OUT/adapter (LoRA) or OUT/model (full fine-tune): what `prcl encode` loads."""
    if getattr(encoder, "_is_peft", lambda: False)():
        encoder.save_adapter(out / "adapter")
    elif cfg.lora_r == 0 and hasattr(encoder, "tokenizer"):
        encoder.model.save_pretrained(out / "model")
        encoder.tokenizer.save_pretrained(out / "model")
    scale = log_scale.exp().item() if log_scale is not None else cfg.scale
    (out / "head.json").write_text(json.dumps({"scale": scale, "bias": cfg.bias, "loss": cfg.loss}) + "\n")
