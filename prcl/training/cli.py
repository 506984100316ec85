"""`prcl train` and `prcl encode` argument parsing.

Every TrainConfig field is a flag (`--mini-batch-size 8`, `--learn-scale/--no-learn-scale`) and a key
of the optional --config file (JSON, or TOML by extension; dashes or underscores). Precedence:
TrainConfig defaults < --config < flags given on the command line.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from prcl.training.loop import SCHEDULES, TrainConfig, train
from prcl.training.step import LOSSES

HELP = {
    "model": "local model directory, or a .gguf file (or a directory with --gguf-file)",
    "data": "training JSONL: {query, positive, negatives, instruction?, graded?} per line",
    "out": "output directory: metrics.jsonl, eval.jsonl, checkpoint-STEP/, adapter/",
    "eval": "held-out JSONL for recall@k / MRR",
    "batch_size": "queries per micro-step over all ranks (B)",
    "mini_batch_size": "texts per encoder call with cached embeddings (GradCache); omit for no cache",
    "resume": "continue from the last checkpoint in --out",
    "loss": "prcl (sigmoid pair BCE) or softmax (InfoNCE)",
    "bias": "fixed logit bias (default −log(N−1) from each batch)",
    "lora_r": "LoRA rank; 0 trains every weight",
    "skip_bad_lines": "skip (and count) bad data lines instead of stopping",
    "config": "JSON or TOML file with the same keys as the flags; flags override it",
}


def _train_parser():
    ap = argparse.ArgumentParser(prog="prcl train", description="Fine-tune a text encoder with PRCL.",
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", help=HELP["config"])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = HELP.get(f.name, "") + f" (default: {f.default})"
        if f.type is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        elif f.type is tuple:
            ap.add_argument(flag, type=int, nargs="+", help=help_)
        else:
            choices = {"loss": LOSSES, "schedule": SCHEDULES}.get(f.name)
            ap.add_argument(flag, type=f.type, choices=choices, help=help_)
    return ap


def _read_config(path):
    text = Path(path).read_text()
    if str(path).endswith(".toml"):
        import tomllib

        data = tomllib.loads(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold an object of options, got {type(data).__name__}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in types:
            raise ValueError(f"config: unknown key {key!r} in {path}")
        t = types[name]
        if value is not None and t in (int, float, str) and not (t is float and isinstance(value, int)):
            if not isinstance(value, t) or isinstance(value, bool):
                raise ValueError(f"config: {key} in {path} must be {t.__name__}, got {value!r}")
        if t is bool and not isinstance(value, bool):
            raise ValueError(f"config: {key} in {path} must be true or false, got {value!r}")
        out[name] = tuple(value) if t is tuple else value
    return out


def parse_train_args(argv):
    args = vars(_train_parser().parse_args(argv))
    options = _read_config(args.pop("config")) if "config" in args else {}
    options.update(args)
    if "eval_k" in options:
        options["eval_k"] = tuple(options["eval_k"])
    return TrainConfig(**options)


def _fail(prog, err):
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 1


def train_main(argv=None):
    cfg = parse_train_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = train(cfg)
    except ValueError as e:  # bad data or options: one line, not a traceback
        return _fail("prcl train", e)
    before, after = summary["eval_before"], summary["eval_after"]
    if before and after:
        for key in after:
            if key.startswith(("recall", "mrr")):
                print(f"{key:10s} {before[key]:.4f} -> {after[key]:.4f}")
    return 0


def read_texts(path, field="text"):
    """Texts of a .jsonl/.json file (a JSON string per line, or an object's `field`) or of a plain text
    file (one text per non-empty line)."""
    texts = []
    is_json = str(path).endswith((".jsonl", ".json"))
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not is_json:
                texts.append(line.rstrip("\n"))
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


def encode_main(argv=None):
    ap = argparse.ArgumentParser(prog="prcl encode", description="Embed texts with a (LoRA-adapted) encoder.")
    ap.add_argument("--model", required=True, help=HELP["model"])
    ap.add_argument("--adapter", help="LoRA adapter directory written by `prcl train` (OUT/adapter)")
    ap.add_argument("--data", required=True, help="texts: .jsonl (strings or objects with --field) or text lines")
    ap.add_argument("--out", required=True, help="embeddings file: .pt (torch) or .npy (numpy), float32 (n, hidden)")
    ap.add_argument("--field", default="text", help="key of the text in JSONL objects (default: text)")
    ap.add_argument("--instruction", help="instruction prepended to every text (not pooled)")
    ap.add_argument("--gguf-file")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not args.out.endswith((".pt", ".npy")):
            raise ValueError(f"out: expected a .pt or .npy file name, got {args.out!r}")
        from prcl.encoders import LLMEncoder

        texts = read_texts(args.data, args.field)
        enc = LLMEncoder.from_pretrained(args.model, gguf_file=args.gguf_file, pooling=args.pooling,
                                         max_length=args.max_length)
        if args.adapter:
            enc.load_adapter(args.adapter)
        enc.model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        emb = enc.encode(texts, instruction=args.instruction, batch_size=args.batch_size).float().cpu()
    except ValueError as e:
        return _fail("prcl encode", e)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.out.endswith(".npy"):
        import numpy as np

        np.save(args.out, emb.numpy())
    else:
        torch.save(emb, args.out)
    print(f"{args.out}: {tuple(emb.shape)} embeddings")
    return 0
