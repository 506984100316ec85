"""BEIR / TREC files: corpus, queries and qrels read with every line checked, and TREC run files written.

    corpus.jsonl    {"_id": str, "title": str (optional), "text": str} per line
    queries.jsonl   {"_id": str, "text": str} per line
    qrels           BEIR TSV with the header `query-id  corpus-id  score`, or TREC `qid 0 docid grade`

A bad line in any file raises ValueError as `FILE:LINE: reason`. Ids hold no whitespace (a TREC run or
qrels line could not be split back into its fields); a UTF-8 byte-order mark opening a file is dropped.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from prcl.files import regular_file, write_text
from prcl.retrieval.metrics import ranked

BEIR_HEADER = ("query-id", "corpus-id", "score")
PathLike = str | os.PathLike


def lines(path: PathLike, what: str) -> Iterator[tuple[int, str]]:
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


def json_object(line: str, kind: str | None = None) -> dict:
    """The JSON object on one line of a JSON Lines file; ValueError with the reason (invalid JSON, or another
    value than an object; `kind` names what the object should have been)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object{f' ({kind})' if kind else ''}, got {type(obj).__name__}")
    return obj


def _jsonl(path: PathLike, kind: str) -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) for the non-blank lines of a JSON Lines file."""
    for lineno, line in lines(path, "queries" if kind == "query" else "corpus"):
        try:
            obj = json_object(line, kind)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        yield lineno, obj


def _read_texts(path: PathLike, kind: str, with_title: bool, keep: Iterable[str] | None = None) -> dict[str, str]:
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


def read_corpus(path: PathLike, keep: Iterable[str] | None = None) -> dict[str, str]:
    """{doc id: "title text"} from a BEIR corpus.jsonl; with `keep`, only those ids (every line is checked)."""
    return _read_texts(path, "document", with_title=True, keep=keep)


def read_queries(path: PathLike) -> dict[str, str]:
    """{query id: text} from a BEIR queries.jsonl."""
    return _read_texts(path, "query", with_title=False)


def iter_qrels(path: PathLike) -> Iterator[tuple[int, str, str, int]]:
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


def read_qrels(path: PathLike, queries: Iterable[str] | None = None,
               corpus: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """{query id: {doc id: grade}}; ids missing from `queries` / `corpus` (when given) are errors."""
    qrels = {}
    for lineno, qid, did, grade in iter_qrels(path):
        if queries is not None and qid not in queries:
            raise ValueError(f"{path}:{lineno}: query-id {qid!r} is not in the queries file")
        if corpus is not None and did not in corpus:
            raise ValueError(f"{path}:{lineno}: corpus-id {did!r} is not in the corpus")
        qrels.setdefault(qid, {})[did] = grade
    return qrels


def beir_paths(qrels: PathLike) -> tuple[Path, Path]:
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


def split_paths(qrels: PathLike, corpus: PathLike | None = None,
                queries: PathLike | None = None) -> tuple[PathLike, PathLike]:
    """(corpus, queries) of a qrels file: the given ones, else the BEIR layout's (beir_paths)."""
    if corpus is None or queries is None:
        default_corpus, default_queries = beir_paths(qrels)
        corpus, queries = corpus or default_corpus, queries or default_queries
    return corpus, queries


def read_split(qrels: PathLike, corpus: PathLike | None = None, queries: PathLike | None = None
               ) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """(queries, corpus, qrels) of one split; corpus/queries default to the BEIR layout's (beir_paths)."""
    corpus, queries = split_paths(qrels, corpus, queries)
    queries, corpus = read_queries(queries), read_corpus(corpus)
    return queries, corpus, read_qrels(qrels, queries, corpus)


def check_id(_id: str, what: str) -> None:
    """ValueError naming `what` when the id holds whitespace."""
    if any(c.isspace() for c in _id):
        raise ValueError(f"{what} {_id!r} contains whitespace, which a TREC run or qrels line cannot hold; "
                         "rename it (e.g. spaces to underscores)")


def examples_to_beir(examples: Iterable) -> tuple[dict, dict, dict, dict]:
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


def write_run(path: PathLike, run: dict[str, dict[str, float]], name: str = "prcl") -> None:
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
