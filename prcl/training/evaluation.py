"""Retrieval evaluation during training: the --eval set read and scored by `prcl eval`'s code (prcl.retrieval)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable

import torch

from prcl.encoders import LLMEncoder
from prcl.files import append_text
from prcl.retrieval import evaluate, examples_to_beir, read_split
from prcl.training.data import is_beir, read_examples

logger = logging.getLogger(__name__)


def read_eval_set(path: str | os.PathLike, max_queries: int | None = None) -> tuple[dict, dict, dict, dict]:
    """(queries, instructions, corpus, qrels) of --eval, read as `prcl eval` reads it: BEIR/TREC qrels
    (.tsv) with their corpus and queries (graded), or a JSONL file of examples (examples_to_beir);
    the first max_queries queries only. ValueError if it holds none."""
    if is_beir(path):
        queries, corpus, qrels = read_split(path)
        instructions: dict = {}
        # a BEIR queries.jsonl often holds every split's queries: keep those this split judges relevant
        judged = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())][:max_queries]
        queries = {q: queries[q] for q in judged}
    else:
        queries, instructions, corpus, qrels = examples_to_beir(read_examples(path)[:max_queries])
    if not queries:
        raise ValueError(f"eval: {path} holds no examples (an empty file?)")
    return queries, instructions, corpus, qrels


@torch.no_grad()
def _encode(encoder: LLMEncoder, texts: list[str], instruction: str | None, batch_size: int) -> torch.Tensor:
    if hasattr(encoder, "encode"):
        return encoder.encode(texts, instruction=instruction, batch_size=batch_size).float()
    return torch.cat([encoder.embed(texts[k: k + batch_size], instruction=instruction).float()
                      for k in range(0, len(texts), batch_size)])


def eval_set_metrics(encoder: LLMEncoder, eval_set: tuple[dict, dict, dict, dict], *, ks: tuple[int, ...] = (1, 5, 10),
                     batch_size: int = 32,
                     autocast: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext) -> dict:
    """Retrieval over the evaluation set (read_eval_set) with `prcl eval`'s code (prcl.retrieval.evaluate:
    trec_eval's measures through ir-measures): every query against every document of the set. Returns
    recall@k for ks, nDCG@10, MRR@10, MAP and the counts. Runs under fork_rng: evaluating or not never
    shifts the training's dropout stream.
    """
    queries, instructions, corpus, qrels = eval_set
    with torch.random.fork_rng(devices=[]), autocast():
        metrics, _ = evaluate(lambda texts, ins: _encode(encoder, texts, ins, batch_size), queries, corpus,
                                 qrels, instructions=instructions, ks=ks)
    return metrics


def evaluate_and_record(encoder: LLMEncoder, eval_set: tuple[dict, dict, dict, dict], step: int,
                        path: str | os.PathLike, *, ks: tuple[int, ...], batch_size: int,
                        autocast: Callable[[], contextlib.AbstractContextManager[object]]) -> dict:
    """eval_set_metrics() in eval mode, one line appended to path (OUT/eval.jsonl) and to the log."""
    model = encoder.model
    model.eval()
    logger.info("eval at step %d: embedding %d queries and %d documents", step, len(eval_set[0]), len(eval_set[2]))
    t0 = time.perf_counter()
    try:
        result = eval_set_metrics(encoder, eval_set, ks=ks, batch_size=batch_size, autocast=autocast)
    finally:
        model.train()
    append_text(path, json.dumps({"step": step, **result}) + "\n")
    logger.info("eval at step %d (%.1f s): %s", step, time.perf_counter() - t0,
                ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith(("recall", "mrr", "ndcg"))))
    return result
