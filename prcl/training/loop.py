"""The training loop: AdamW + warmup/decay, gradient accumulation, cached embeddings, periodic
evaluation, metrics.jsonl, checkpoints and exact resume.

Exact resume means the resumed run's losses equal an uninterrupted run's. Everything that decides a
future step is checkpointed (prcl.training.checkpoint): trainable weights (LoRA adapter or all
weights, plus a learnable scale), AdamW moments, the scheduler, the data position and every RNG
(dropout). A step whose loss or gradient is not finite stops the run before the update (or is
skipped and counted under skip_nonfinite), so no checkpoint ever holds non-finite weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from prcl.encoders import LLMEncoder
from prcl.encoders.attention import check_backend
from prcl.encoders.llm import check_pooling
from prcl.files import append_text, fingerprint, load_errors, refuse_links, remove, resolve_device, run_lock, write_text
from prcl.nn import PairBCELoss
from prcl.training import checkpoint
from prcl.training.batching import Batch, build_batch
from prcl.training.config import WEIGHT_SETTINGS, TrainConfig
from prcl.training.data import Example, ExampleStream, check_file, data_files
from prcl.training.distributed import barrier, setup, sum_gradients, sum_scalar
from prcl.training.evaluation import evaluate_and_record, read_eval_set
from prcl.training.step import batch_loss, forward_backward
from prcl.training.teacher import load_teacher, teacher_batch

logger = logging.getLogger(__name__)

def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: linear warmup from 0, then linear/cosine decay to 0."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def _schedule(cfg):
    """The options that decide each step's lr, as stored in a checkpoint to detect a change on resume."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.max_steps // 10
    return {"lr": cfg.lr, "max_steps": cfg.max_steps, "warmup_steps": warmup, "schedule": cfg.schedule}


def load_encoder(cfg: TrainConfig) -> LLMEncoder:
    """An LLMEncoder for cfg.model (a directory or .gguf), with a fresh LoRA adapter unless lora_r = 0."""
    if not cfg.model:
        raise ValueError("model: required (a local model directory or .gguf file)")
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    with load_errors("model", cfg.model):
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
    (the interrupted run may have logged steps that the resumed run repeats), and so is a partial last
    line (a write the interruption cut short)."""

    def __init__(self, path: str | Path, resume_step: int, enabled: bool) -> None:
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        keep = []
        if resume_step and self.path.exists():
            lines = self.path.read_text().splitlines()
            for lineno, line in enumerate(lines, 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError as e:
                    if lineno < len(lines):
                        raise ValueError(f"{self.path}:{lineno}: invalid JSON ({e.msg}); remove or repair "
                                         "the line to resume") from None
                    logger.warning("%s:%d: dropped a partial last line", self.path, lineno)
                    continue
                if record is not None and not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                    raise ValueError(f"{self.path}:{lineno}: not a metrics record (an object with an int step); "
                                     "remove or repair the line to resume")
                if record is not None and record["step"] <= resume_step:
                    keep.append(line)
        write_text(self.path, "".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_text(self.path, json.dumps(record) + "\n")


def _check_out(cfg):
    """Refuse to mix runs in one --out (unless --overwrite: _overwrite deletes the old run)."""
    if cfg.overwrite:
        return
    out = Path(cfg.out)
    found = checkpoint.checkpoint_dirs(out)
    if found and not cfg.resume:
        raise ValueError(f"out: {out} already holds {found[-1][1].name}; pass --resume to continue it, "
                         "--overwrite to start over, or choose another --out")
    elif (out / "metrics.jsonl").exists() and not cfg.resume:
        raise ValueError(f"out: {out} holds another run (metrics.jsonl, no checkpoint); pass --overwrite "
                         "to replace it or choose another --out")


def _load_models(cfg, encoder, device):
    """(the teacher or None, the encoder)."""
    torch.manual_seed(cfg.seed)  # weights a teacher's checkpoint lacks are drawn the same in every run
    teacher = load_teacher(cfg.teacher, max_length=cfg.max_length, device=device) if cfg.teacher else None
    torch.manual_seed(cfg.seed)  # LoRA's initialisation: identical on every rank
    random.seed(cfg.seed)
    return teacher, encoder or load_encoder(cfg)


def _overwrite(out):
    """--overwrite: the old run's checkpoints and metrics go."""
    for _, path in checkpoint.checkpoint_dirs(out):
        remove(path)
    remove(out / "metrics.jsonl")


def _training_state(cfg, model, device, rank):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = PairBCELoss(cfg.scale, cfg.bias, learnable_scale=cfg.learn_scale).to(device)
    groups = [{"params": [p for _, p in named], "weight_decay": cfg.weight_decay}]
    if cfg.learn_scale:
        groups.append({"params": list(head.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    s = _schedule(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s["warmup_steps"], s["max_steps"],
                                                                       s["schedule"]))
    stream = ExampleStream(cfg.data, block_size=cfg.shuffle_block, seed=cfg.seed, shuffle=cfg.shuffle,
                           skip_bad_lines=cfg.skip_bad_lines,
                           log=logger.warning if rank == 0 else (lambda m: None))
    return checkpoint.TrainingState(named, head, optimizer, scheduler, stream)


def _resume(cfg, state, out, rank, world):
    """Load the newest intact checkpoint into state; its RNG states, or None when out holds none."""
    loaded = checkpoint.load_latest(out, rank=rank, world=world, convert=cfg.convert_checkpoint)
    if loaded is None:
        if rank == 0:
            logger.info("resume: no checkpoint in %s; starting at step 0", out)
        return None
    path, tensors, saved, rng = loaded
    changed = _check_data(cfg, saved.get("data_fingerprint"), state.data_fingerprint, path, rank)
    state.restore(path, tensors, saved, cfg.weight_settings(), data_changed=changed)
    schedule = _schedule(cfg)
    if saved["schedule"] not in (None, schedule):
        changes = ", ".join(f"{k} {saved['schedule'][k]} -> {v}" for k, v in schedule.items()
                            if saved["schedule"][k] != v)
        for group in state.optimizer.param_groups:
            group["initial_lr"] = cfg.lr
        # a scheduler created at last_epoch = step - 1 steps once: the new schedule's lr at this step
        state.scheduler = torch.optim.lr_scheduler.LambdaLR(
            state.optimizer, lr_lambda(schedule["warmup_steps"], cfg.max_steps, cfg.schedule),
            last_epoch=state.step - 1)
        if rank == 0:
            logger.info("resume: schedule changed (%s); rebuilt from step %d", changes, state.step)
    if rank == 0:
        logger.info("resumed from %s at step %d", path, state.step)
    return rng


# not listed as changed on resume: the command's own options (a resumed run always differs in some), OUT, and the
# options resume checks or logs already (the data's fingerprint, the weight settings, the schedule)
_UNLISTED = ("resume", "overwrite", "convert_checkpoint", "allow_data_change", "progress", "out", "data",
             *WEIGHT_SETTINGS, "lr", "max_steps", "warmup_steps", "schedule")


def _same(name, a, b):
    """Equal option values. The paths of --teacher and --eval: two absolute ones by the path, else by the last
    component (as the weight settings compare --model): a relative path of the last start was relative to a
    working directory not recorded."""
    if a == b or name not in ("teacher", "eval") or not (isinstance(a, str) and isinstance(b, str)):
        return a == b
    if os.path.isabs(a) and os.path.isabs(b):
        return os.path.normpath(a) == os.path.normpath(b)
    return os.path.basename(os.path.abspath(a)) == os.path.basename(os.path.abspath(b))


def _log_changed_options(path, options):
    """On resume, warn of the options that differ from the run's last start (its config.json), such as another
    --teacher, --loss or --scale: allowed, but said."""
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):  # deleted, or cut short by an interruption
        before = None
    if not isinstance(before, dict):
        logger.warning("resume: %s is missing or unreadable; options changed since the last start are not listed",
                       path)
        return
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in options.items()
               if k not in _UNLISTED and not _same(k, before.get(k), v)]
    if changed:
        logger.warning("resume: options changed since the run's last start: %s", ", ".join(changed))


def _check_data(cfg, saved, now, path, rank):
    """Refuse to resume on data that differ from those the checkpoint's run read (unless allow_data_change);
    whether they differ."""
    if saved is None:  # a converted checkpoint of an earlier prcl: it recorded none
        return False
    changed = [(a, b) for a, b in zip(saved, now) if (a["bytes"], a["sha256"]) != (b["bytes"], b["sha256"])]
    if len(saved) != len(now):
        changed.append((saved[-1], now[-1]))
    if not changed:
        return False
    was, is_ = changed[0]
    what = (f"{is_['path']} is {is_['bytes']} bytes (SHA-256 {is_['sha256'][:12]}…); the run started on "
            f"{was['path']} of {was['bytes']} bytes (SHA-256 {was['sha256'][:12]}…)")
    if not cfg.allow_data_change:
        raise ValueError(f"resume: the data changed since {path} was written: {what}; resume with the run's data, "
                         "or pass --allow-data-change to continue from the saved position in the new data")
    if rank == 0:
        logger.warning("resume: the data changed (--allow-data-change): %s", what)
    return True


def _nonfinite_message(step, loss, grad_norm):
    if step == 1:  # before any update: neither the learning rate nor the weights' updates caused it
        return (f"step 1: non-finite loss ({loss}) or gradient norm ({grad_norm}) before any update, so --lr is "
                "not the cause; check --scale and --bias, the model's weights and --dtype")
    return (f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); stopped before the update, "
            "so every checkpoint holds finite weights. Lower --lr, set --max-grad-norm, or pass "
            "--skip-nonfinite to skip such steps")


@dataclasses.dataclass
class _Run:
    """One process's run: what a step, an evaluation and a checkpoint need."""
    cfg: object
    encoder: object
    state: checkpoint.TrainingState
    out: Path
    device: torch.device
    autocast: object
    process_group: object
    rank: int
    world: int
    teacher: object = None  # load_teacher(cfg.teacher): grades every pair of a batch, or None

    @property
    def trainable(self) -> list[torch.Tensor]:
        return [p for _, p in self.state.named] + list(self.state.head.parameters())

    def accumulate(self, examples: Iterator[Example]) -> tuple[float, float, Batch, int | None]:
        """Forward and backward over grad_accum micro-batches: (loss, global pairs, the last local batch)."""
        cfg, world = self.cfg, self.world
        local = slice(self.rank * cfg.batch_size // world, (self.rank + 1) * cfg.batch_size // world)
        loss_sum, pairs, masked = 0.0, 0, []
        for _ in range(cfg.grad_accum):
            # every rank reads the same global batch and keeps its slice: equal batch counts per rank
            batch = build_batch([next(examples) for _ in range(cfg.batch_size)][local], dedup=cfg.dedup)
            if self.teacher is not None:
                batch = teacher_batch(batch, self.teacher, cfg.mini_batch_size or cfg.batch_size)
            # N only matters to a learned bias offset; the trainer's bias is fixed (None: −log(N−1) per call)
            scale, bias = self.state.head.scale_and_bias(len(batch.docs))

            def loss_fn(q, d, batch=batch, scale=scale, bias=bias):
                out = batch_loss(q, d, batch, loss=cfg.loss, scale=scale, bias=bias, backend=cfg.backend,
                                 process_group=self.process_group, false_negative_margin=cfg.false_negative_margin,
                                 return_masked=cfg.false_negative_margin is not None)
                if cfg.false_negative_margin is None:
                    return out
                masked.append(out[1])  # read with the loss below, one host read per micro-step
                return out[0]

            loss = forward_backward(self.encoder, batch, loss_fn, mini_batch_size=cfg.mini_batch_size,
                                    cached=cfg.mini_batch_size is not None, device=self.device,
                                    autocast=self.autocast, loss_weight=1.0 / cfg.grad_accum,
                                    packed=cfg.pack, max_tokens=cfg.pack_tokens)
            loss_sum += loss.item() / cfg.grad_accum
            # each query is scored against every rank's documents: count the global N
            n_docs = len(batch.docs) if world == 1 else sum_scalar(len(batch.docs), self.process_group)
            pairs += len(batch.queries) * n_docs
        masked = sum(int(m) for m in masked) if masked else None
        if world > 1:
            # the ranks' losses SUM to the global loss, so its gradient is the SUM of theirs (DDP would average)
            sum_gradients(self.trainable, self.process_group)
            loss_sum, pairs = sum_scalar(loss_sum, self.process_group), sum_scalar(pairs, self.process_group)
            masked = None if masked is None else int(sum_scalar(masked, self.process_group))
        return loss_sum, pairs, batch, masked

    def update(self, loss: float) -> float | None:
        """The optimizer and scheduler step: (the gradient norm, or None when the step was skipped as
        non-finite). A non-finite loss or gradient stops the run here unless skip_nonfinite."""
        state, trainable = self.state, self.trainable
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        finite = math.isfinite(loss) and torch.isfinite(grad_norm).item()
        if finite:
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(trainable, self.cfg.max_grad_norm, grad_norm)
            state.optimizer.step()
        elif self.cfg.skip_nonfinite:
            state.nonfinite += 1
            if self.rank == 0:
                logger.warning("step %d skipped: non-finite loss (%s) or gradient norm (%s); %d skipped so far",
                               state.step + 1, loss, grad_norm.item(), state.nonfinite)
        else:
            raise FloatingPointError(_nonfinite_message(state.step + 1, loss, grad_norm.item()))
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        return grad_norm.item() if finite else None

    def record_eval(self, eval_set: tuple[dict, dict, dict, dict], at: int) -> dict | None:
        result = None
        if self.rank == 0:
            result = evaluate_and_record(self.encoder, eval_set, at, self.out / "eval.jsonl",
                                         ks=tuple(int(k) for k in self.cfg.eval_k),
                                         batch_size=self.cfg.eval_batch_size, autocast=self.autocast)
        barrier(self.world)
        return result

    def save_checkpoint(self) -> None:
        if not all(torch.isfinite(p).all() for p in self.trainable):
            raise FloatingPointError(f"step {self.state.step}: the update made weights non-finite; no checkpoint "
                                     "written. Lower --lr or set --max-grad-norm")
        tensors, saved = self.state.pack(self.cfg.weight_settings(), _schedule(self.cfg))
        checkpoint.save(self.out, tensors, saved, step=self.state.step, rank=self.rank, world=self.world,
                        encoder=self.encoder, keep=self.cfg.keep_checkpoints)


def train(cfg: TrainConfig, encoder: LLMEncoder | None = None) -> dict:
    """Fine-tune `encoder` (loaded from cfg.model when None) on cfg.data. Returns a summary dict with
    the losses per step and the evaluations before and after. Progress is logged to this module's
    logger (rank 0 only under torchrun)."""
    cfg.validate()
    check_backend(cfg.attn_implementation)  # named as settings, not as a model that does not load
    check_pooling(cfg.pooling)
    process_group, rank, world = setup(timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    if cfg.batch_size % world:
        raise ValueError(f"batch_size: {cfg.batch_size} queries do not split over {world} ranks")
    if cfg.teacher and world > 1:
        raise ValueError("teacher: not supported under torchrun (a rank's teacher grades only its own documents)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if not cfg.skip_bad_lines:
        start = time.perf_counter()
        count = check_file(cfg.data)
        logger.info("data: %s: all %d examples valid (checked in %.1f s)", cfg.data, count, time.perf_counter() - start)
    eval_set = read_eval_set(cfg.eval, cfg.eval_max_queries) if cfg.eval else None
    data_print = fingerprint(data_files(cfg.data))
    out = Path(cfg.out)
    if out.is_dir():
        refuse_links(out)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out) if rank == 0 else contextlib.nullcontext():
        return _train(cfg, encoder, eval_set, data_print, out, device, process_group, rank, world)


def _train(cfg, encoder, eval_set, data_print, out, device, process_group, rank, world):
    """train() in OUT, locked against other runs."""
    _check_out(cfg)
    teacher, encoder = _load_models(cfg, encoder, device)
    model = encoder.model.to(device)
    model.train()
    state = _training_state(cfg, model, device, rank)
    state.data_fingerprint = data_print
    rng = _resume(cfg, state, out, rank, world) if cfg.resume else None
    if rng is None:
        if world > 1:  # same starting weights everywhere, whatever each rank's loader did
            for _, p in state.named:
                torch.distributed.broadcast(p.data, src=0)
        torch.manual_seed(cfg.seed + rank)  # dropout differs per rank
        rng = checkpoint.rng_state()
    if cfg.overwrite and rank == 0:  # only now: a step above that fails (a model too big for the GPU) keeps it
        _overwrite(out)
    barrier(world)
    if rank == 0:
        options = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as config.json holds them: tuples as lists
        if state.step > 0:
            _log_changed_options(out / "config.json", options)
        write_text(out / "config.json", json.dumps(options, indent=1) + "\n")
        if state.step == 0:
            remove(out / "eval.jsonl")
    metrics = _Metrics(out / "metrics.jsonl", state.step, enabled=rank == 0)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    run = _Run(cfg, encoder, state, out, device, autocast, process_group, rank, world, teacher)

    summary = {"losses": [], "eval_before": None, "eval_after": None}
    if eval_set and state.step == 0:
        summary["eval_before"] = run.record_eval(eval_set, 0)
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", dynamic_ncols=True)

    checkpoint.set_rng_state(rng)
    examples = iter(state.stream)
    while state.step < cfg.max_steps:
        t0 = time.perf_counter()
        loss, pairs, batch, masked = run.accumulate(examples)
        lr = state.scheduler.get_last_lr()[0]
        grad_norm = run.update(loss)
        step, dt = state.step, time.perf_counter() - t0
        record = {"step": step, "loss": loss if grad_norm is not None else None, "lr": lr,
                  "pairs_per_s": pairs / dt, "step_time_s": dt, "epoch": state.stream.state["epoch"],
                  "queries": cfg.batch_size, "docs_per_rank": len(batch.docs), "grad_norm": grad_norm}
        if masked is not None:
            record["masked_pairs"] = masked  # false negatives the mask excluded, summed over micro-batches and ranks
        if grad_norm is None:
            record["skipped"] = "non-finite"
        if cfg.learn_scale:
            record["scale"] = state.head.logit_scale.exp().item()
        summary["losses"].append(loss)
        if eval_set and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            result = run.record_eval(eval_set, step)
            if result:
                record.update({f"eval/{k}": v for k, v in result.items()})
                summary["eval_after"] = result
        metrics.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", pairs_s=f"{pairs / dt:,.0f}")
            bar.update(1)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
            run.save_checkpoint()
    if bar is not None:
        bar.close()

    if rank == 0:
        _save_final(out, encoder, cfg, state.head)
        if state.stream.skipped.count:
            logger.warning(state.stream.skipped.summary(cfg.data))
        if state.nonfinite:
            logger.warning("skipped %d step(s) with a non-finite loss or gradient", state.nonfinite)
    summary.update(skipped=state.stream.skipped.count, nonfinite=state.nonfinite, step=state.step)
    return summary


def _save_final(out, encoder, cfg, head):
    """OUT/adapter (LoRA) or OUT/model (full fine-tune): what `prcl encode` loads."""
    if getattr(encoder, "has_lora", False):
        saved = out / "adapter"
        remove(saved)  # the previous save, or a link: replaced, never written through
        encoder.save_adapter(saved)
    elif cfg.lora_r == 0 and hasattr(encoder, "tokenizer"):
        saved = out / "model"
        remove(saved)
        encoder.model.save_pretrained(saved)
        encoder.tokenizer.save_pretrained(saved)
    else:
        saved = None
    scale = head.logit_scale.exp().item() if head.learnable_scale else head.fixed_scale
    write_text(out / "head.json", json.dumps({"scale": scale, "bias": cfg.bias, "loss": cfg.loss}) + "\n")
    last = checkpoint.checkpoint_dirs(out)
    logger.info("done: %s, metrics in %s%s", f"weights in {saved}" if saved else "no weights saved",
                out / "metrics.jsonl", f", last checkpoint {last[-1][1]}" if last else "")
