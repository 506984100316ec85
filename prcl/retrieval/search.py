"""Exact search: every query against every document, the corpus streamed in chunks.

Each chunk is embedded, scored against all queries and merged into a running top-k, so neither the corpus
embeddings nor a queries × corpus score matrix exist beyond one chunk.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prcl.retrieval.metrics import compute_metrics

if TYPE_CHECKING:
    import torch


def search(query_emb: torch.Tensor, doc_texts: list[str], encode_documents: Callable, *, k: int = 100,
           chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by dot product: query_emb (Q, D) against the documents, embedded chunk by chunk.

    encode_documents(list of texts) -> (n, D) tensor. Returns (scores (Q, k'), doc indices (Q, k')),
    k' = min(k, number of documents), best first. Peak memory: Q × (k + chunk_size) scores.
    """
    import torch

    if chunk_size < 1 or k < 1:
        raise ValueError(f"k and chunk_size: expected positive ints, got {k} and {chunk_size}")
    best_s = torch.empty(query_emb.shape[0], 0)
    best_i = torch.empty(query_emb.shape[0], 0, dtype=torch.int64)
    q = query_emb.float()
    for start in range(0, len(doc_texts), chunk_size):
        d = encode_documents(doc_texts[start: start + chunk_size]).float().to(q.device)
        s = torch.cat([best_s, (q @ d.T).cpu()], dim=1)
        i = torch.cat([best_i, torch.arange(start, start + d.shape[0]).expand(q.shape[0], -1)], dim=1)
        best_s, top = s.topk(min(k, s.shape[1]), dim=1)
        best_i = i.gather(1, top)
    return best_s, best_i


def evaluate(encode: Callable, queries: dict[str, str], corpus: dict[str, str], qrels: dict[str, dict[str, int]], *,
             instructions: str | dict[str, str] | None = None, ks: tuple[int, ...] = (1, 10, 100),
             chunk_size: int = 4096) -> tuple[dict, dict[str, dict[str, float]]]:
    """Retrieve the top max(ks, 10) documents of `corpus` for every query with a relevant (grade >= 1)
    document in `qrels`, and score the run. Returns (metrics, run).

    encode(texts, instruction) -> (n, D) L2-normalised embeddings (documents get instruction None);
    instructions: None, one string for every query, or {query id: string}.
    """
    import torch

    qids = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    if not qids:
        raise ValueError("qrels: no query has a relevant (grade >= 1) document")
    if not isinstance(instructions, dict):
        instructions = dict.fromkeys(qids, instructions)
    by_ins = {}
    for n, q in enumerate(qids):
        by_ins.setdefault(instructions.get(q), []).append(n)
    q_emb = None
    for ins, idx in by_ins.items():
        e = encode([queries[qids[n]] for n in idx], ins)
        if q_emb is None:
            q_emb = torch.empty(len(qids), e.shape[1], device=e.device)
        q_emb[idx] = e.to(q_emb.dtype)
    doc_ids = list(corpus)
    scores, idx = search(q_emb, [corpus[d] for d in doc_ids], lambda texts: encode(texts, None),
                         k=max(max(ks), 10), chunk_size=chunk_size)
    run = {q: {doc_ids[j]: s for j, s in zip(idx[n].tolist(), scores[n].tolist())} for n, q in enumerate(qids)}
    metrics = compute_metrics({q: qrels[q] for q in qids}, run, ks)
    metrics.update(queries=len(qids), documents=len(doc_ids))
    return metrics, run
