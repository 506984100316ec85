"""Retrieval evaluation in the BEIR / TREC formats, and `prcl eval`.

    readers.py  BEIR corpus/queries/qrels and TREC qrels read with every line checked; TREC run files written
    search.py   exact top-k search streamed over the corpus, and `evaluate` (search, then score)
    metrics.py  trec_eval's measures through ir-measures
    cli.py      `prcl eval`, and the encode function of a model path

Imports nothing heavy: torch and ir-measures load on first use, so `prcl eval --help` answers without them.
"""
from prcl.retrieval.cli import is_sentence_transformer, load_encode, main, parser
from prcl.retrieval.metrics import compute_metrics, measures_for, ranked
from prcl.retrieval.readers import (
                                    BEIR_HEADER,
                                    beir_paths,
                                    check_id,
                                    examples_to_beir,
                                    iter_qrels,
                                    json_object,
                                    lines,
                                    read_corpus,
                                    read_qrels,
                                    read_queries,
                                    read_split,
                                    split_paths,
                                    write_run,
)
from prcl.retrieval.search import evaluate, search

__all__ = ["BEIR_HEADER", "beir_paths", "check_id", "compute_metrics", "evaluate", "examples_to_beir",
           "is_sentence_transformer", "iter_qrels", "json_object", "lines", "load_encode", "main", "measures_for",
           "parser", "ranked", "read_corpus", "read_qrels", "read_queries", "read_split", "search", "split_paths",
           "write_run"]
