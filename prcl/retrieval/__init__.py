"""Retrieval evaluation in the BEIR / TREC formats, and `prcl eval`.

    corpus.jsonl    {"_id": str, "title": str (optional), "text": str} per line
    queries.jsonl   {"_id": str, "text": str} per line
    qrels           BEIR TSV with the header `query-id  corpus-id  score`, or TREC `qid 0 docid grade`

Search is exact (every query against every document) and streams the corpus in chunks: each chunk is
embedded, scored against all queries and merged into a running top-k, so neither the corpus
embeddings nor a queries × corpus score matrix exist beyond one chunk. The metrics are trec_eval's,
computed by ir-measures (pytrec_eval): graded gains in nDCG, grade >= 1 relevant elsewhere.
A bad line in any file raises ValueError as `FILE:LINE: reason`. Ids hold no whitespace (a TREC run or
qrels line could not be split back into its fields); a UTF-8 byte-order mark opening a file is dropped.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from prcl.files import USER_ERRORS, check_model_path, fail, regular_file, resolve_device, write_text

BEIR_HEADER = ("query-id", "corpus-id", "score")


def lines(path, what):
    """Yields (line number, text) of a UTF-8 file's non-blank lines; `what` names the file in errors."""
    with open(regular_file(path, what), "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                yield lineno, line


def _jsonl(path, kind):
    """Yields (line number, object) for the non-blank lines of a JSON Lines file."""
    for lineno, line in lines(path, "queries" if kind == "query" else "corpus"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object ({kind}), got {type(obj).__name__}")
        yield lineno, obj


def _read_texts(path, kind, with_title, keep=None):
    out, first = {}, {}
    for lineno, obj in _jsonl(path, kind):
        _id = obj.get("_id")
        if not isinstance(_id, str) or not _id.strip():
            raise ValueError(f'{path}:{lineno}: "_id" must be a non-empty string, got {json.dumps(_id)}')
        check_id(_id, f"{path}:{lineno}: _id")
        if _id in first:
            raise ValueError(f"{path}:{lineno}: duplicate _id {_id!r} (first on line {first[_id]})")
        fields = ("title", "text") if with_title else ("text",)
        parts = []
        for key in fields:
            value = obj.get(key, "" if key == "title" else None)
            if not isinstance(value, str):
                raise ValueError(f'{path}:{lineno}: "{key}" must be a string, got {json.dumps(value)[:80]}')
            parts.append(value.strip())
        text = " ".join(p for p in parts if p)  # title and text joined as BEIR's dense models do
        if not text:
            raise ValueError(f"{path}:{lineno}: empty {kind} {_id!r}")
        first[_id] = lineno
        if keep is None or _id in keep:
            out[_id] = text
    if not first:
        raise ValueError(f"{path}: no {kind}s in the file")
    return out


def read_corpus(path, keep=None):
    """{doc id: "title text"} from a BEIR corpus.jsonl; with `keep`, only those ids (every line is checked)."""
    return _read_texts(path, "document", with_title=True, keep=keep)


def read_queries(path):
    """{query id: text} from a BEIR queries.jsonl."""
    return _read_texts(path, "query", with_title=False)


def iter_qrels(path):
    """Yields (line number, query id, doc id, integer grade) from BEIR TSV or TREC qrels.

    The format is decided by the first non-blank line: the BEIR header, or four whitespace-separated
    TREC fields (the second, the iteration, is ignored). A pair judged twice is an error.
    """
    trec, seen = None, {}
    for lineno, line in lines(path, "qrels"):
        fields = line.split()
        if trec is None:
            trec = tuple(fields) != BEIR_HEADER
            if not trec:
                continue
            if len(fields) != 4:
                raise ValueError(f"{path}:{lineno}: expected the BEIR header 'query-id corpus-id score' "
                                 f"or TREC 'qid 0 docid grade', got {line.strip()[:80]!r}")
        want = 4 if trec else 3
        if len(fields) != want:
            raise ValueError(f"{path}:{lineno}: expected {want} fields "
                             f"({'qid 0 docid grade' if trec else 'query-id corpus-id score'}), got {len(fields)}")
        qid, did, grade = (fields[0], fields[2], fields[3]) if trec else fields
        try:
            grade = int(grade)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: grade must be an integer, got {grade!r}") from None
        if (qid, did) in seen:
            raise ValueError(f"{path}:{lineno}: pair ({qid}, {did}) judged twice (first on line {seen[qid, did]})")
        seen[qid, did] = lineno
        yield lineno, qid, did, grade
    if not seen:
        raise ValueError(f"{path}: no judgements in the file")


def read_qrels(path, queries=None, corpus=None):
    """{query id: {doc id: grade}}; ids missing from `queries` / `corpus` (when given) are errors."""
    qrels = {}
    for lineno, qid, did, grade in iter_qrels(path):
        if queries is not None and qid not in queries:
            raise ValueError(f"{path}:{lineno}: query-id {qid!r} is not in the queries file")
        if corpus is not None and did not in corpus:
            raise ValueError(f"{path}:{lineno}: corpus-id {did!r} is not in the corpus")
        qrels.setdefault(qid, {})[did] = grade
    return qrels


def beir_paths(qrels):
    """(corpus.jsonl, queries.jsonl) of the BEIR layout DIR/qrels/SPLIT.tsv: both in DIR. ValueError when
    qrels is not in a qrels/ folder, or is a link into another dataset's (which corpus was meant?)."""
    here = Path(os.path.abspath(qrels)).parent
    if here.name != "qrels":
        raise ValueError(f"qrels: {qrels} is not in a qrels/ folder (the BEIR layout is DIR/qrels/SPLIT.tsv "
                         "beside DIR/corpus.jsonl and DIR/queries.jsonl); move it there, or (prcl eval) pass --corpus "
                         "and --queries")
    linked = Path(qrels).resolve().parent
    if linked != here.resolve():
        raise ValueError(f"qrels: {qrels} is a link into {linked}, another folder than the one it is in; put a "
                         "copy there, or (prcl eval) pass --corpus and --queries to say which corpus to read")
    return here.parent / "corpus.jsonl", here.parent / "queries.jsonl"


def split_paths(qrels, corpus=None, queries=None):
    """(corpus, queries) of a qrels file: the given ones, else the BEIR layout's (beir_paths)."""
    if corpus is None or queries is None:
        default_corpus, default_queries = beir_paths(qrels)
        corpus, queries = corpus or default_corpus, queries or default_queries
    return corpus, queries


def read_split(qrels, corpus=None, queries=None):
    """(queries, corpus, qrels) of one split; corpus/queries default to the BEIR layout's (beir_paths)."""
    corpus, queries = split_paths(qrels, corpus, queries)
    queries, corpus = read_queries(queries), read_corpus(corpus)
    return queries, corpus, read_qrels(qrels, queries, corpus)


def check_id(_id, what):
    if any(c.isspace() for c in _id):
        raise ValueError(f"{what} {_id!r} contains whitespace, which a TREC run or qrels line cannot hold; "
                         "rename it (e.g. spaces to underscores)")


# ---- search ----------------------------------------------------------------------------------------------

def search(query_emb, doc_texts, encode_documents, *, k=100, chunk_size=4096):
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


def measures_for(ks=(1, 10, 100)):
    """{name in our metrics: ir-measures measure}: nDCG@10, recall@k, MRR@10, MAP over the run's depth."""
    from ir_measures import AP, RR, R, nDCG

    depth = max(max(ks), 10)
    out = {"ndcg@10": nDCG @ 10, "mrr@10": RR @ 10, f"map@{depth}": AP @ depth}
    out.update({f"recall@{k}": R @ k for k in ks})
    return out


def compute_metrics(qrels, run, ks=(1, 10, 100)):
    """Mean of each measure over the queries of `qrels` with a relevant (grade >= 1) document; one that
    `run` ({qid: {docid: score}}) leaves out scores 0. Queries judged only non-relevant are left out
    (ir-measures would average them in as zeros)."""
    import ir_measures

    measures = measures_for(ks)
    qrels = {q: judged for q, judged in qrels.items() if any(g > 0 for g in judged.values())}
    agg = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
    return {name: float(agg[m]) for name, m in measures.items()}


def evaluate(encode, queries, corpus, qrels, *, instructions=None, ks=(1, 10, 100), chunk_size=4096):
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


def examples_to_beir(examples):
    """A JSONL evaluation file's examples (prcl.training.data.Example) as (queries, instructions, corpus,
    qrels): every distinct document text one corpus entry, each query's positives grade 1; its graded
    documents and negatives are part of the corpus only."""
    corpus, doc_id, queries, instructions, qrels = {}, {}, {}, {}, {}
    for n, ex in enumerate(examples):
        qid = f"q{n}"
        queries[qid], instructions[qid] = ex.query, ex.instruction
        for text, _ in ex.documents():
            if text not in doc_id:
                doc_id[text] = f"d{len(doc_id)}"
                corpus[doc_id[text]] = text
        qrels[qid] = {doc_id[t]: 1 for t in ex.positives}
    return queries, instructions, corpus, qrels


def ranked(docs):
    """(doc id, score) best first, ties broken as trec_eval (and so compute_metrics) breaks them: by doc id,
    descending."""
    return sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)


def write_run(path, run, name="prcl"):
    """TREC run file: `qid Q0 docid rank score name`, best first, scores at full precision (repr): a
    reader of the file ranks as compute_metrics did."""
    check_id(name, "run name")
    text = []
    for qid, docs in run.items():
        check_id(qid, "query id")
        for rank, (did, s) in enumerate(ranked(docs), 1):
            check_id(did, "document id")
            text.append(f"{qid} Q0 {did} {rank} {float(s)!r} {name}\n")
    write_text(path, "".join(text))


# ---- encoders --------------------------------------------------------------------------------------------

def is_sentence_transformer(path):
    return os.path.isfile(os.path.join(path, "modules.json"))


def load_encode(model, *, adapter=None, gguf_file=None, batch_size=32, max_length=512, pooling="mean",
                device=None):
    """encode(texts, instruction) for a model path: a sentence-transformers directory (modules.json;
    the instruction is its prompt) or an LLM for prcl.encoders.LLMEncoder (directory or .gguf); each
    call shows a progress bar (`prcl eval` embeds the whole corpus)."""
    check_model_path(model, gguf_file, prog="prcl eval")
    device = resolve_device(device)
    if is_sentence_transformer(model):
        if adapter or gguf_file:
            raise ValueError("adapter/gguf_file: apply to LLM encoders, not to a sentence-transformers model")
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model, device=device)
        st.max_seq_length = max_length

        def encode(texts, instruction):
            return st.encode(texts, prompt=instruction, batch_size=batch_size, convert_to_tensor=True,
                             normalize_embeddings=True, show_progress_bar=True).float()
        return encode
    from prcl.encoders import LLMEncoder

    enc = LLMEncoder.from_pretrained(model, gguf_file=gguf_file, pooling=pooling, max_length=max_length)
    if adapter:
        enc.load_adapter(adapter)
    enc.model.to(device)
    return lambda texts, instruction: enc.encode(texts, instruction=instruction, batch_size=batch_size,
                                                 progress=True)


# ---- prcl eval -------------------------------------------------------------------------------------------

def parser():
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
    ap.add_argument("--pooling", default="mean", help="LLM pooling: mean, last, weighted")
    ap.add_argument("--device", default=None)
    return ap


def main(argv=None):
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
