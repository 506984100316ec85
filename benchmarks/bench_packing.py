"""`prcl train`'s step (embed, loss, backward), padded vs packed: real tokens per second.

    OMP_NUM_THREADS=1 python benchmarks/bench_packing.py [--repeats 7] [--out benchmarks/results/packing.json]

A small random Llama (tests/tiny_llm.py widened to hidden 256, 4 layers, LoRA r 8 on every linear) on a
retrieval-shaped batch: 32 queries of 4–16 words, each with a positive of long-tailed length (Pareto,
4–500 words, truncated to 256 tokens), the lengths where padding wastes work. One uncached step per
timing (forward_backward as the loop calls it); the first step of each setting is a warm-up. Packed runs
at several token budgets (--pack-tokens): the block mask costs tokens² per row on CPU, so the budget
decides whether packing wins there. On CPU a step is timed in the process's CPU seconds (one
thread: wall time on a shared machine would measure the other processes too), on CUDA in wall time. Prints a table (median and min–max over the repeats) and writes JSON.
"""
import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_llm import CORPUS, tiny_model_and_tokenizer  # noqa: E402

from prcl.encoders import LLMEncoder  # noqa: E402
from prcl.training import build_batch, forward_backward, parse_example  # noqa: E402
from prcl.training.step import batch_loss  # noqa: E402

MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)


def retrieval_batch(B=32, seed=0):
    rng, words = random.Random(seed), CORPUS.split()
    exs = []
    for _ in range(B):
        query = " ".join(rng.choices(words, k=rng.randint(4, 16)))
        positive = " ".join(rng.choices(words, k=min(500, int(rng.paretovariate(1.0) * 4))))
        exs.append(parse_example(json.dumps({"query": query, "positive": positive})))
    return build_batch(exs)


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # on CPU the process's CPU time: on a shared machine wall time measures the other processes' load too
    clock = time.perf_counter if device == "cuda" else time.process_time
    model, tok = tiny_model_and_tokenizer("llama", **MODEL)
    torch.manual_seed(0)
    enc = LLMEncoder(model.to(device, torch.bfloat16 if device == "cuda" else torch.float32), tok,
                     max_length=256).add_lora(r=8, alpha=16, dropout=0.0)
    enc.model.train()
    batch = retrieval_batch()
    seqs = enc.tokenize(batch.queries) + enc.tokenize(batch.docs)
    lengths = [len(ids) for ids, _ in seqs]
    tokens = sum(lengths)
    padded_tokens = len(batch.queries) * max(lengths[:len(batch.queries)]) + len(batch.docs) * max(
        lengths[len(batch.queries):])

    def step(**kw):
        enc.model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        forward_backward(enc, batch, lambda q, d: batch_loss(q, d, batch), cached=False, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return clock() - t0

    settings = [("padded", {})] + [(f"packed, {b} tokens per row", {"packed": True, "max_tokens": b})
                                   for b in args.budgets]
    rows = []
    for name, kw in settings:
        step(**kw)  # warm-up
        times = [step(**kw) for _ in range(args.repeats)]
        rate = sorted(tokens / t for t in times)
        rows.append({"setting": name, "median_tokens_per_s": round(statistics.median(rate)),
                     "min": round(rate[0]), "max": round(rate[-1]), "median_step_s": round(statistics.median(times), 4),
                     "mode": enc.packed_attention if kw else "padded"})
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else f"{cpu_model()} (CPU)",
            "threads": torch.get_num_threads(), "clock": clock.__name__, "torch": torch.__version__, "repeats": args.repeats,
            "texts": len(seqs), "real_tokens": tokens, "padded_tokens": padded_tokens,
            "model": "random Llama, hidden 256, 4 layers, LoRA r 8", "command": "python " + " ".join(sys.argv),
            "rows": rows}
    print(f"{info['device']}, {info['threads']} thread(s), torch {info['torch']}; {len(seqs)} texts, {tokens} real "
          f"tokens ({padded_tokens} padded); real tokens per {'CPU' if device == 'cpu' else 'wall'} second "
          f"over {args.repeats} steps")
    print("| setting | attention | median tokens/s | min–max | median step (s, CPU on CPU) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['mode']} | {r['median_tokens_per_s']} | {r['min']}–{r['max']} | "
              f"{r['median_step_s']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
