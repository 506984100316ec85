"""`prcl train` and `prcl encode` argument parsing.

Every TrainConfig field is a flag (`--mini-batch-size 8`, `--learn-scale/--no-learn-scale`) and a key
of the optional --config file (JSON, or TOML by extension; dashes or underscores). Precedence:
TrainConfig defaults < --config < flags given on the command line.

On CPU `prcl train` runs one intra-op thread unless --threads says otherwise: on a loaded 2-core
machine two threads made steps about three times slower (the README's training section has the figures).
"""
import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from prcl.files import USER_ERRORS, check_model_path, fail, load_errors, regular_file, remove, resolve_device
from prcl.training.config import SCHEDULES, TrainConfig

REQUIRED = ("model", "data", "out")
HELP = {
    "model": "local model directory, or a .gguf file (or a directory with --gguf-file)",
    "data": "training JSONL: {query, positive, negatives, instruction?, graded?} per line",
    "out": "output directory: metrics.jsonl, eval.jsonl, checkpoint-STEP/, adapter/",
    "eval": "held-out JSONL, or BEIR/TREC qrels DIR/qrels/SPLIT.tsv (graded, against DIR/corpus.jsonl): recall@k, "
            "nDCG@10, MRR@10 and MAP, read and computed by prcl eval's code",
    "gguf_file": "GGUF file name inside the --model directory",
    "batch_size": "queries per micro-step over all ranks (B)",
    "mini_batch_size": "texts per encoder call with cached embeddings (GradCache); omit for no cache",
    "grad_accum": "micro-steps per optimizer step",
    "max_steps": "optimizer steps",
    "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay (not on the learnable scale)",
    "warmup_steps": "linear warmup steps (default: 10%% of --max-steps)",
    "schedule": "lr decay after warmup",
    "max_grad_norm": "clip the gradient norm to this (default: no clipping)",
    "skip_nonfinite": "skip (and count) a step whose loss or gradient is not finite instead of stopping",
    "loss": "prcl (sigmoid pair BCE) or softmax (InfoNCE)",
    "scale": "logit scale t (initial value with --learn-scale)",
    "learn_scale": "learn the scale (as log t)",
    "bias": "fixed logit bias (default −log(N−1) from each batch)",
    "false_negative_margin": "exclude (PRCL) or drop from the softmax (InfoNCE) an in-batch negative whose "
                             "similarity exceeds its query's positive's + this margin; metrics.jsonl logs "
                             "masked_pairs per step",
    "teacher": "model directory or .gguf whose cosines label every in-batch pair the data leaves unlabelled, "
               "calibrated per row between the batch's median and the query's positive (0..1)",
    "dedup": "merge identical document texts into one column",
    "backend": "prcl.fused_pair_bce backend (default: chosen by device)",
    "lora_r": "LoRA rank; 0 trains every weight",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "lora_layers": "LoRA on the last K transformer layers only (0 = all)",
    "pooling": "mean, weighted_mean or last",
    "pack": "embed each encoder call as packed rows (varlen kernel on CUDA, block mask elsewhere); "
            "--no-pack pads",
    "pack_tokens": "tokens per packed row at most (bounds the block mask's tokens × tokens)",
    "max_length": "tokens per text (longer texts are truncated)",
    "dtype": "weights' dtype when loading: float32, bfloat16, float16 (default: the checkpoint's)",
    "attn_implementation": "sdpa, flash_attention_2 or eager",
    "gradient_checkpointing": "recompute activations in backward (less memory, slower)",
    "bf16": "bf16 autocast on CUDA (ignored on CPU)",
    "device": "cpu, cuda, cuda:1, ... (default: cuda if available)",
    "threads": "torch intra-op threads (default: 1 on CPU, torch's default on CUDA)",
    "dist_timeout": "seconds a collective waits for the other ranks under torchrun before failing",
    "eval_every": "evaluate every N steps (0: before training and at the end only)",
    "eval_k": "k of recall@k",
    "eval_batch_size": "texts per encoder call in evaluation",
    "eval_max_queries": "evaluate the first M queries of --eval only",
    "checkpoint_every": "write OUT/checkpoint-STEP every N steps and at the end (0: at the end only)",
    "keep_checkpoints": "checkpoints kept; resume falls back to an older one if the newest is damaged",
    "resume": "continue from the newest intact checkpoint in --out",
    "allow_data_change": "with --resume: continue although the data files differ from those the run started "
                         "with (by default a changed data set is refused)",
    "overwrite": "start afresh in an --out holding another run (deletes its checkpoints)",
    "convert_checkpoint": "with --resume: rewrite an earlier prcl's pickle checkpoint (state.pt) as "
                          "safetensors + JSON, reading it with torch.load(weights_only=True)",
    "seed": "seed of LoRA's initialisation, the data order and dropout",
    "shuffle": "shuffle the training data in blocks",
    "shuffle_block": "examples per shuffled block",
    "skip_bad_lines": "skip (and count) bad data lines instead of stopping",
    "progress": "tqdm progress bar",
    "config": "JSON or TOML file with the same keys as the flags; flags override it",
}


def _train_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prcl train", description="Fine-tune a text encoder with PRCL.",
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", help=HELP["config"])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        # required flags may come from --config, so argparse cannot enforce them; validate() does
        help_ = HELP[f.name] + (" (required)" if f.name in REQUIRED else f" (default: {f.default})")
        if f.type is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        elif f.type is tuple:
            ap.add_argument(flag, type=int, nargs="+", help=help_)
        else:
            # --loss is checked by TrainConfig.validate: its choices live with the losses, behind torch
            ap.add_argument(flag, type=f.type, choices=SCHEDULES if f.name == "schedule" else None, help=help_)
    return ap


def _read_config(path: str) -> dict[str, Any]:
    regular_file(path, "config")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
        if str(path).endswith(".toml"):
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:  # tomllib's and json's decode errors are ValueErrors
        kind = "TOML" if str(path).endswith(".toml") else "JSON"
        raise ValueError(f"config: {path}: not valid {kind} ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold an object of options, got {type(data).__name__}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in types:
            raise ValueError(f"config: unknown key {key!r} in {path}")
        t = types[name]
        if value is not None and t in (int, float, str) and not (
                t is float and isinstance(value, int) and not isinstance(value, bool)):  # true is an int too
            if not isinstance(value, t) or isinstance(value, bool):
                raise ValueError(f"config: {key} in {path} must be {t.__name__}, got {value!r}")
        if t is bool and not isinstance(value, bool):
            raise ValueError(f"config: {key} in {path} must be true or false, got {value!r}")
        if t is tuple:
            # a string is a sequence too: "15" would become k = ("1", "5")
            if isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"config: {key} in {path} must be a list of ints, got {value!r}")
            value = tuple(value)
        out[name] = value
    return out


def parse_train_args(argv: list[str]) -> TrainConfig:
    args = vars(_train_parser().parse_args(argv))
    options = _read_config(args.pop("config")) if "config" in args else {}
    options.update(args)
    if "eval_k" in options:
        options["eval_k"] = tuple(options["eval_k"])
    return TrainConfig(**options)


def train_main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_train_args(sys.argv[1:] if argv is None else argv)
        from prcl.training.loop import train

        device = resolve_device(cfg.device)
    except USER_ERRORS as e:
        return fail("prcl train", e)
    from tqdm.contrib.logging import logging_redirect_tqdm

    if cfg.threads is None and device.type == "cpu":
        cfg.threads = 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            summary = train(cfg)
    except USER_ERRORS as e:  # bad data, options or checkpoints; a diverged run; a full disk
        return fail("prcl train", e)
    before, after = summary["eval_before"], summary["eval_after"]
    if before and after:
        for key in after:
            if key.startswith(("recall", "mrr", "ndcg")):
                print(f"{key:10s} {before[key]:.4f} -> {after[key]:.4f}")
    return 0


def read_texts(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Texts of a .jsonl/.json file (a JSON string per line, or an object's `field`) or of a plain text
    file (one text per non-empty line)."""
    from prcl.retrieval import lines

    texts = []
    is_json = str(path).endswith((".jsonl", ".json"))
    for lineno, line in lines(path, "data"):
        if not is_json:
            texts.append(line.rstrip("\r\n"))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        text = obj.get(field) if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: expected a JSON string or an object with a string {field!r}")
        texts.append(text)
    if not texts:
        raise ValueError(f"data: no texts in {path}")
    return texts


def encode_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prcl encode", description="Embed texts with a (LoRA-adapted) encoder.")
    ap.add_argument("--model", required=True, help=HELP["model"] + " (required)")
    ap.add_argument("--adapter", help="LoRA adapter directory written by `prcl train` (OUT/adapter)")
    ap.add_argument("--data", required=True,
                    help="texts: .jsonl (strings or objects with --field) or text lines (required)")
    ap.add_argument("--out", required=True, help="embeddings file: .pt (torch) or .npy (numpy), float32 (n, hidden) "
                    "(required)")
    ap.add_argument("--field", default="text", help="key of the text in JSONL objects (default: text)")
    ap.add_argument("--instruction", help="instruction prepended to every text (not pooled)")
    ap.add_argument("--gguf-file", help=HELP["gguf_file"])
    ap.add_argument("--batch-size", type=int, default=32, help="texts per encoder call (default: 32)")
    ap.add_argument("--max-length", type=int, default=512, help=HELP["max_length"] + " (default: 512)")
    ap.add_argument("--pooling", default="mean", help=HELP["pooling"] + " (default: mean)")
    ap.add_argument("--device", default=None, help=HELP["device"])
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.out.endswith((".pt", ".npy")):
            raise ValueError(f"out: expected a .pt or .npy file name, got {args.out!r}")
        if os.path.isdir(args.out) or os.path.islink(args.out):
            raise ValueError(f"out: {args.out!r} is a {'link' if os.path.islink(args.out) else 'directory'}; "
                             "--out takes a new or regular file, never written through a link")
        if args.batch_size < 1 or args.max_length < 1:
            raise ValueError(f"batch_size and max_length: expected positive ints, got {args.batch_size} and "
                             f"{args.max_length}")
        from prcl.encoders.llm import LLMEncoder, check_pooling

        check_pooling(args.pooling)
        check_model_path(args.model, args.gguf_file, prog="prcl encode")
        device = resolve_device(args.device)
        texts = read_texts(args.data, args.field)
        with load_errors("model", args.model):
            enc = LLMEncoder.from_pretrained(args.model, gguf_file=args.gguf_file, pooling=args.pooling,
                                             max_length=args.max_length)
        if args.adapter:
            enc.load_adapter(args.adapter)
        enc.model.to(device)
        emb = enc.encode(texts, instruction=args.instruction, batch_size=args.batch_size, progress=True).float().cpu()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out + ".tmp" + os.path.splitext(args.out)[1]  # np.save appends .npy to other names
        remove(tmp)
        if args.out.endswith(".npy"):
            import numpy as np

            np.save(tmp, emb.numpy())
        else:
            torch.save(emb, tmp)
        os.replace(tmp, args.out)  # replaces a link made since the check, never writes through it
    except USER_ERRORS as e:
        return fail("prcl encode", e)
    print(f"{args.out}: {tuple(emb.shape)} embeddings")
    return 0
