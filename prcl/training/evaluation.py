"""Retrieval evaluation during training: recall@k and MRR of the --eval queries against their documents."""
import contextlib
import json
import logging

import torch

from prcl.training.data import read_examples

logger = logging.getLogger(__name__)


def read_eval_set(path, max_queries=None):
    """The first max_queries examples of the --eval file; ValueError if it holds none."""
    examples = read_examples(path)[:max_queries]
    if not examples:
        raise ValueError(f"eval: {path} holds no examples (an empty file?)")
    return examples


@torch.no_grad()
def _encode(encoder, texts, instruction, batch_size):
    if hasattr(encoder, "encode"):
        return encoder.encode(texts, instruction=instruction, batch_size=batch_size).float()
    return torch.cat([encoder.embed(texts[k: k + batch_size], instruction=instruction).float()
                      for k in range(0, len(texts), batch_size)])


def evaluate(encoder, examples, *, ks=(1, 5, 10), batch_size=32, autocast=contextlib.nullcontext):
    """Retrieval over the evaluation set: every query against every distinct document of the file.

    Relevant = the query's positives (graded documents and negatives are part of the corpus only).
    recall@k = share of a query's positives in its top k, averaged over queries; MRR = mean 1/rank of
    the first positive (full ranking, no cut-off). Runs under fork_rng: evaluating or not never shifts
    the training's dropout stream.
    """
    docs, col = [], {}
    for ex in examples:
        for text, _ in ex.documents():
            if text not in col:
                col[text] = len(docs)
                docs.append(text)
    with torch.random.fork_rng(devices=[]), autocast():
        d = _encode(encoder, docs, None, batch_size)
        by_ins = {}
        for i, ex in enumerate(examples):
            by_ins.setdefault(ex.instruction, []).append(i)
        q = torch.empty(len(examples), d.shape[1], device=d.device)
        for ins, idx in by_ins.items():
            q[idx] = _encode(encoder, [examples[i].query for i in idx], ins, batch_size)
    s = (q @ d.T).cpu()
    order = s.argsort(dim=1, descending=True)
    rank_of = torch.empty_like(order)
    rank_of.scatter_(1, order, torch.arange(1, len(docs) + 1).expand_as(order).contiguous())
    recall = {k: 0.0 for k in ks}
    rr = 0.0
    for i, ex in enumerate(examples):
        ranks = rank_of[i, [col[t] for t in set(ex.positives)]]
        rr += 1.0 / ranks.min().item()
        for k in ks:
            recall[k] += (ranks <= k).float().mean().item()
    n = len(examples)
    out = {f"recall@{k}": recall[k] / n for k in ks}
    out.update(mrr=rr / n, queries=n, documents=len(docs))
    return out


def evaluate_and_record(encoder, examples, step, path, *, ks, batch_size, autocast):
    """evaluate() in eval mode, one line appended to path (OUT/eval.jsonl) and to the log."""
    model = encoder.model
    model.eval()
    try:
        result = evaluate(encoder, examples, ks=ks, batch_size=batch_size, autocast=autocast)
    finally:
        model.train()
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **result}) + "\n")
    logger.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                                                         if k.startswith(("recall", "mrr"))))
    return result
