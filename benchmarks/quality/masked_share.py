"""How many in-batch negatives the false-negative mask would leave out, and what labels the same model
as a teacher (run_minilm.py --teacher minilm) would give them, before training: zero-shot
all-MiniLM-L6-v2 on run_minilm.py's prcl-binary train rows, shuffled (seed 0) into batches of 32.

    python benchmarks/quality/masked_share.py [--margins -0.1 0 0.1]
"""
import argparse
import random
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_minilm  # noqa: E402

import prcl  # noqa: E402
from prcl.training.teacher import calibrated_labels  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--margins", type=float, nargs="+", default=[-0.1, 0.0, 0.1])
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    data = HERE / "data" / "manpages"
    corpus, queries = run_minilm.read_corpus(data / "corpus.jsonl"), run_minilm.read_queries(data / "queries.jsonl")
    settings = argparse.Namespace(loss="prcl-binary", seed=0, noise=0.0, related_label=0.5)
    rows = run_minilm.train_rows(queries, corpus, run_minilm.read_qrels(data / "qrels" / "train.tsv", queries, corpus),
                                 settings)
    model = SentenceTransformer(run_minilm.minilm_path(), device="cpu")
    model.max_seq_length = 64
    q, d = (model.encode(rows[c], convert_to_tensor=True, normalize_embeddings=True, batch_size=64)
            for c in ("anchor", "positive"))
    order = list(range(len(q)))
    random.Random(0).shuffle(order)
    B = args.batch_size
    batches = [torch.tensor(order[k:k + B]) for k in range(0, len(order) - B + 1, B)]
    for margin in args.margins:
        masked = sum(int(prcl.fused_pair_bce(q[i], d[i], false_negative_margin=margin, return_masked=True)[1])
                     for i in batches)
        negatives = len(batches) * B * (B - 1)
        print(f"margin {margin:+.2f}: {masked} of {negatives} in-batch negatives masked ({100 * masked / negatives:.2f} %)")
    y = torch.stack([calibrated_labels(q[i] @ d[i].T, None, None) for i in batches])
    off = y[:, ~torch.eye(B, dtype=torch.bool)]  # the in-batch negatives' teacher labels
    shares = ", ".join(f"> {t}: {100 * (off > t).float().mean():.1f} %" for t in (0, 0.25, 0.5, 0.75))
    print(f"teacher labels of the in-batch negatives: {shares}; mean {off.mean():.3f}, "
          f"sum per row {off.sum() / (len(batches) * B):.2f} (the positive: 1)")


if __name__ == "__main__":
    main()
