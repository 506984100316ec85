"""Retrieval evaluation during training: the --eval queries against their documents, scored like `prcl eval`."""
import contextlib
import json
import logging
import time

import torch

from prcl import ir
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
    """Retrieval over the evaluation set with `prcl eval`'s code (prcl.ir: trec_eval's measures through
    ir-measures): every query against every distinct document of the file, relevant = the query's
    positives (graded documents and negatives are part of the corpus only). Returns recall@k for ks,
    nDCG@10, MRR@10, MAP and the counts. Runs under fork_rng: evaluating or not never shifts the
    training's dropout stream.
    """
    queries, instructions, corpus, qrels = ir.examples_to_beir(examples)
    with torch.random.fork_rng(devices=[]), autocast():
        metrics, _ = ir.evaluate(lambda texts, ins: _encode(encoder, texts, ins, batch_size), queries, corpus,
                                 qrels, instructions=instructions, ks=ks)
    return metrics


def evaluate_and_record(encoder, examples, step, path, *, ks, batch_size, autocast):
    """evaluate() in eval mode, one line appended to path (OUT/eval.jsonl) and to the log."""
    model = encoder.model
    model.eval()
    logger.info("eval at step %d: embedding %d queries and their documents", step, len(examples))
    t0 = time.perf_counter()
    try:
        result = evaluate(encoder, examples, ks=ks, batch_size=batch_size, autocast=autocast)
    finally:
        model.train()
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **result}) + "\n")
    logger.info("eval at step %d (%.1f s): %s", step, time.perf_counter() - t0,
                ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith(("recall", "mrr", "ndcg"))))
    return result
