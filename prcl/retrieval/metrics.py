"""Retrieval metrics: trec_eval's, computed by ir-measures (pytrec_eval): graded gains in nDCG, grade >= 1
relevant elsewhere."""
from __future__ import annotations


def measures_for(ks: tuple[int, ...] = (1, 10, 100)) -> dict:
    """{name in our metrics: ir-measures measure}: nDCG@10, recall@k, MRR@10, MAP over the run's depth."""
    from ir_measures import AP, RR, R, nDCG

    depth = max(max(ks), 10)
    out = {"ndcg@10": nDCG @ 10, "mrr@10": RR @ 10, f"map@{depth}": AP @ depth}
    out.update({f"recall@{k}": R @ k for k in ks})
    return out


def compute_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]],
                    ks: tuple[int, ...] = (1, 10, 100)) -> dict[str, float]:
    """Mean of each measure over the queries of `qrels` with a relevant (grade >= 1) document; one that
    `run` ({qid: {docid: score}}) leaves out scores 0. Queries judged only non-relevant are left out
    (ir-measures would average them in as zeros)."""
    import ir_measures

    measures = measures_for(ks)
    qrels = {q: judged for q, judged in qrels.items() if any(g > 0 for g in judged.values())}
    agg = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
    return {name: float(agg[m]) for name, m in measures.items()}


def ranked(docs: dict[str, float]) -> list[tuple[str, float]]:
    """(doc id, score) best first, ties broken as trec_eval (and so compute_metrics) breaks them: by doc id,
    descending."""
    return sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)
