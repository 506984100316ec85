"""`prcl eval`: exact retrieval over a BEIR/TREC test set with a sentence-transformers or LLM encoder;
nDCG@10, recall@k, MRR@10, MAP, a TREC run file and metrics.json."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prcl.files import USER_ERRORS, check_model_path, fail, load_errors, resolve_device, write_text
from prcl.retrieval.readers import read_split, split_paths, write_run
from prcl.retrieval.search import evaluate

if TYPE_CHECKING:
    from torch import Tensor


def is_sentence_transformer(path: str | os.PathLike) -> bool:
    """True for a sentence-transformers model directory (it holds modules.json)."""
    return os.path.isfile(os.path.join(path, "modules.json"))


def load_encode(model: str, *, adapter: str | None = None, gguf_file: str | None = None, batch_size: int = 32,
                max_length: int = 512, pooling: str = "mean", device: str | None = None) -> Callable:
    """encode(texts, instruction) for a model path: a sentence-transformers directory (modules.json;
    the instruction is its prompt) or an LLM for prcl.encoders.LLMEncoder (directory or .gguf); each
    call shows a progress bar (`prcl eval` embeds the whole corpus)."""
    check_model_path(model, gguf_file, prog="prcl eval")
    torch_device = resolve_device(device)
    if is_sentence_transformer(model):
        if adapter or gguf_file or pooling != "mean":
            raise ValueError("adapter/gguf_file/pooling: apply to LLM encoders, not to a sentence-transformers model "
                             "(it has its own pooling)")
        from sentence_transformers import SentenceTransformer

        with load_errors("model", model):
            st = SentenceTransformer(model, device=str(torch_device))
        st.max_seq_length = max_length

        def encode(texts: list[str], instruction: str | None) -> Tensor:
            return st.encode(texts, prompt=instruction, batch_size=batch_size, convert_to_tensor=True,
                             normalize_embeddings=True, show_progress_bar=True).float()
        return encode
    from prcl.encoders.llm import LLMEncoder, check_pooling

    check_pooling(pooling)
    with load_errors("model", model):
        enc = LLMEncoder.from_pretrained(model, gguf_file=gguf_file, pooling=pooling, max_length=max_length)
    if adapter:
        enc.load_adapter(adapter)
    enc.model.to(torch_device)
    return lambda texts, instruction: enc.encode(texts, instruction=instruction, batch_size=batch_size,
                                                 progress=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prcl eval", description="Exact retrieval over a BEIR/TREC test set: "
                                 "nDCG@10, recall@k, MRR@10, MAP, a TREC run file and metrics.json.")
    ap.add_argument("--model", required=True, help="sentence-transformers directory, LLM directory or .gguf")
    ap.add_argument("--adapter", help="LoRA adapter directory written by `prcl train` (OUT/adapter), LLMs only")
    ap.add_argument("--gguf-file")
    ap.add_argument("--qrels", required=True, help="BEIR qrels TSV (header query-id corpus-id score) or TREC qrels")
    ap.add_argument("--corpus", help="corpus.jsonl: {_id, title?, text} per line (default: the BEIR layout's, "
                    "DIR/corpus.jsonl for DIR/qrels/SPLIT.tsv)")
    ap.add_argument("--queries", help="queries.jsonl: {_id, text} per line (default: DIR/queries.jsonl)")
    ap.add_argument("--out", required=True, help="output directory: run.trec, metrics.json")
    ap.add_argument("--instruction", help="instruction (LLM) or prompt (sentence-transformers) for queries")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 10, 100], help="recall cut-offs (default: 1 10 100)")
    ap.add_argument("--chunk-size", type=int, default=4096, help="documents embedded and scored at a time")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pooling", default="mean", help="LLM pooling: mean, last or weighted_mean (default: mean)")
    ap.add_argument("--device", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if any(k < 1 for k in args.k) or min(args.chunk_size, args.batch_size, args.max_length) < 1:
            raise ValueError(f"k, chunk_size, batch_size and max_length: expected positive ints, got {args.k}, "
                             f"{args.chunk_size}, {args.batch_size} and {args.max_length}")
        out = Path(args.out)
        # the output's faults are found before the evaluation, not after it
        for path in (out, out / "run.trec", out / "metrics.json"):
            if path.is_symlink():
                raise ValueError(f"out: {path} is a symbolic link; prcl eval writes only through paths that are "
                                 "not links: remove it, or choose another --out")
        if out.exists() and not out.is_dir():
            raise ValueError(f"out: {args.out!r} is a file; --out takes a directory")
        corpus_path, queries_path = split_paths(args.qrels, args.corpus, args.queries)
        print(f"prcl eval: corpus {corpus_path}, queries {queries_path}, qrels {args.qrels}", file=sys.stderr)
        queries, corpus, qrels = read_split(args.qrels, corpus_path, queries_path)
        encode = load_encode(args.model, adapter=args.adapter, gguf_file=args.gguf_file,
                             batch_size=args.batch_size, max_length=args.max_length, pooling=args.pooling,
                             device=args.device)
        t0 = time.perf_counter()
        metrics, run = evaluate(encode, queries, corpus, qrels, instructions=args.instruction,
                                ks=tuple(args.k), chunk_size=args.chunk_size)
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        out.mkdir(parents=True, exist_ok=True)
        write_run(out / "run.trec", run)
        record = {"metrics": metrics, "model": args.model, "adapter": args.adapter, "corpus": str(corpus_path),
                  "queries": str(queries_path), "qrels": args.qrels, "instruction": args.instruction}
        write_text(out / "metrics.json", json.dumps(record, indent=1) + "\n")
    except USER_ERRORS as e:
        return fail("prcl eval", e)
    for key, value in metrics.items():
        print(f"{key:12s} {value:.4f}" if isinstance(value, float) else f"{key:12s} {value}")
    return 0
