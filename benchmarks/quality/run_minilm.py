"""Fine-tune all-MiniLM-L6-v2 on the man-pages train split and measure nDCG@10 on a held-out split.

    python benchmarks/quality/build_manpages.py                     # the data, once
    python benchmarks/quality/run_minilm.py --loss zero-shot
    python benchmarks/quality/run_minilm.py --loss infonce --seed 0  # and prcl-binary, prcl-graded, ...

Training rows, from qrels/train.tsv (grade 2 = the page itself, 1 = a page in its SEE ALSO):
  infonce       (query, grade-2 page) rows, sentence-transformers' MultipleNegativesRankingLoss
  prcl-binary   the same rows, prcl's PairRelevanceLoss
  prcl-graded   the same rows with label 1, plus (query, grade-1 page) rows with label grade / max = 0.5
  prcl-all      the rows of prcl-graded, every label 1 (separates the extra rows from their 0.5 labels)
  prcl-related  the prcl-binary rows with a third column: one of the query's grade-1 pages, labelled
                --related-label (−1 leaves it out for its own query; it stays a negative for the others).
                A query without a grade-1 page gets a random unjudged passage there, left out (−1).
Every loss trains for the same number of steps of the same batch size with the same learning rate,
other rows' documents as in-batch negatives, NoDuplicatesBatchSampler (a repeated query or page never
shares a batch). --noise replaces that fraction of the rows' positives by random unjudged passages.
--false-negative-margin M masks an in-batch negative whose cosine exceeds its query's positive's + M:
PRCL leaves the pair out (PairRelevanceLoss's false_negative_margin), InfoNCE drops it from the softmax
denominator (prcl.training.softmax.info_nce, in place of MultipleNegativesRankingLoss's equal formula).
--teacher grades every unlisted in-batch pair with a frozen sentence-transformers model (PairRelevanceLoss's
teacher=; 'minilm' is the untrained all-MiniLM-L6-v2 the student starts from).
Each run appends one JSON line to --results.
"""
import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "examples"))
from st_minilm_manpages import minilm_path  # noqa: E402

from prcl.retrieval import evaluate, read_corpus, read_qrels, read_queries  # noqa: E402

LOSSES = ("zero-shot", "infonce", "prcl-binary", "prcl-graded", "prcl-all", "prcl-related")


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def append_record(record, results):
    """One JSON line per run in the results file (report.py's input), and the record on stdout."""
    Path(results).parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))


def train_rows(queries, corpus, qrels, args):
    """(anchor, positive[, related], label) rows: the top-graded pages; with prcl-graded / prcl-all every
    judged page too, labelled grade / top grade / 1; with prcl-related a grade-1 page beside each row.
    Then --noise of the positives are replaced by unjudged passages (the same ones for every loss)."""
    loss, rng = args.loss, random.Random(args.seed)
    doc_ids = sorted(corpus)

    def unjudged(judged):
        while (did := rng.choice(doc_ids)) in judged:
            pass
        return did

    rows = {"anchor": [], "positive": [], "label": []}
    related = []
    for qid, judged in qrels.items():
        top = max(judged.values())
        lower = sorted(did for did, grade in judged.items() if 0 < grade < top)
        for did, grade in judged.items():
            if grade == top or (loss in ("prcl-graded", "prcl-all") and grade > 0):
                rows["anchor"].append((qid, judged))
                rows["positive"].append(did)
                rows["label"].append(1.0 if loss == "prcl-all" else grade / top)
                if grade == top:
                    related.append((rng.choice(lower), args.related_label) if lower else (unjudged(judged), -1.0))
    noisy = random.Random(1000 + args.seed).sample(range(len(rows["anchor"])), round(args.noise * len(rows["anchor"])))
    for i in noisy:
        rows["positive"][i] = unjudged(rows["anchor"][i][1])
    if loss == "prcl-related":
        rows["related"] = [corpus[did] for did, _ in related]
        rows["label"] = [[1.0, label] for _, label in related]
    rows["anchor"] = [queries[qid] for qid, _ in rows["anchor"]]
    rows["positive"] = [corpus[did] for did in rows["positive"]]
    if loss == "infonce":
        del rows["label"]
    return rows


def masked_info_nce(margin):
    """MultipleNegativesRankingLoss (query → every document of the batch, cosine × scale) with the
    false-negative mask of prcl's InfoNCE: a masked document leaves the softmax denominator."""
    import torch.nn.functional as F
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from prcl.training.softmax import info_nce

    class MaskedInfoNCE(MultipleNegativesRankingLoss):
        def compute_loss_from_embeddings(self, embeddings, labels):
            q, d = F.normalize(embeddings[0], dim=-1), F.normalize(torch.cat(embeddings[1:]), dim=-1)
            rows = torch.arange(q.shape[0], device=q.device)[:, None]
            return info_nce(q, d, torch.ones(rows.shape, device=q.device), rows, scale=self.scale,
                            false_negative_margin=margin)

        def get_config_dict(self):
            return {**super().get_config_dict(), "false_negative_margin": margin}

    return MaskedInfoNCE


def make_loss(model, args):
    """The sentence-transformers loss the arguments ask for."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from prcl.integrations.sentence_transformers import PairRelevanceLoss

    scale = {} if args.scale is None else {"scale": args.scale}
    margin = args.false_negative_margin
    if args.loss == "infonce":
        return (MultipleNegativesRankingLoss if margin is None else masked_info_nce(margin))(model, **scale)
    bias = {} if args.bias is None else {"bias": None if args.bias == "prior" else float(args.bias)}
    teacher = None
    if args.teacher:
        teacher = SentenceTransformer(minilm_path() if args.teacher == "minilm" else args.teacher, device="cpu")
        teacher.max_seq_length = args.max_seq_length
    return PairRelevanceLoss(model, **scale, **bias, learnable_scale=args.learn in ("scale", "both"),
                             learnable_bias=args.learn in ("bias", "both"), false_negative_margin=margin,
                             teacher=teacher)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", choices=LOSSES, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(HERE / "data" / "manpages"))
    ap.add_argument("--split", default="test", help="evaluation split (dev for tuning, test for reporting)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--scale", type=float, help="logit scale (default: the loss's own)")
    ap.add_argument("--bias", help="PRCL's logit bias: a float, or 'prior' for −log(N−1) (default: the loss's own)")
    ap.add_argument("--learn", choices=("scale", "bias", "both"), help="PRCL: learn the scale, bias or both")
    ap.add_argument("--head-lr", type=float, help="learning rate of PRCL's learnable scale/bias (default: --lr)")
    ap.add_argument("--related-label", type=float, default=0.5, help="prcl-related: the grade-1 column's label")
    ap.add_argument("--noise", type=float, default=0.0, help="fraction of positives replaced by random passages")
    ap.add_argument("--false-negative-margin", type=float, help="mask in-batch negatives above the positive + this")
    ap.add_argument("--teacher", help="PRCL: a sentence-transformers model grading every pair ('minilm': the "
                                      "starting all-MiniLM-L6-v2, frozen)")
    ap.add_argument("--max-seq-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=str(HERE / "results" / "minilm.jsonl"))
    args = ap.parse_args()
    if args.teacher and not args.loss.startswith("prcl"):
        ap.error("--teacher: grades PRCL's labels; InfoNCE has no place for them")

    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    torch.set_num_threads(args.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    data = Path(args.data)
    corpus, queries = read_corpus(data / "corpus.jsonl"), read_queries(data / "queries.jsonl")
    torch.manual_seed(args.seed)
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = args.max_seq_length

    record = {"loss": args.loss, "seed": args.seed, "split": args.split}
    if args.loss != "zero-shot":
        from datasets import Dataset

        rows = train_rows(queries, corpus, read_qrels(data / "qrels" / "train.tsv", queries, corpus), args)
        loss = make_loss(model, args)
        head_lr = {} if args.head_lr is None else {"learning_rate_mapping": {r"logit_(scale|bias)": args.head_lr}}
        training_args = SentenceTransformerTrainingArguments(
            output_dir=str(HERE / "runs" / f"{args.loss}-{args.seed}-{os.getpid()}"), max_steps=args.steps,
            per_device_train_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=0.1,
            lr_scheduler_type="linear", seed=args.seed, batch_sampler="no_duplicates", logging_steps=10,
            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, **head_lr)
        trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=Dataset.from_dict(rows),
                                             loss=loss)
        t0 = time.perf_counter()
        result = trainer.train()
        record.update(train_rows=len(rows["anchor"]), steps=result.global_step, batch_size=args.batch_size,
                      lr=args.lr, train_loss=result.training_loss, train_s=round(time.perf_counter() - t0, 1),
                      loss_config=loss.get_config_dict(), noise=args.noise)

    def encode(texts, instruction):
        return model.encode(texts, prompt=instruction, batch_size=64, convert_to_tensor=True,
                            normalize_embeddings=True, show_progress_bar=False)

    qrels = read_qrels(data / "qrels" / f"{args.split}.tsv", queries, corpus)
    metrics, _ = evaluate(encode, {q: queries[q] for q in qrels}, corpus, qrels)
    record.update(metrics)
    record.update(max_seq_length=args.max_seq_length, wall_s=round(time.perf_counter() - t_start, 1),
                  cpu_s=round(time.process_time() - cpu_start, 1), threads=args.threads, cpu=cpu_name(),
                  torch=torch.__version__, command="python " + " ".join(sys.argv))
    append_record(record, args.results)


if __name__ == "__main__":
    main()
