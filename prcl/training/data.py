"""Training data: JSON Lines, one query per line, streamed in shuffled blocks with a resumable position.

    {"query": str, "positive": str | [str], "negatives": [str], "instruction": str, "graded": [{"text": str, "relevance": float}]}

"negatives", "instruction" and "graded" are optional; any other key is an error (a misspelled
"negative" would otherwise drop the negatives silently). A bad line is reported as
`FILE:LINE: reason`; the stream stops on it unless skip_bad_lines, which counts and reports it instead.

A data path ending in .tsv is a BEIR-layout qrels file instead (DIR/qrels/SPLIT.tsv beside
DIR/corpus.jsonl and DIR/queries.jsonl): see read_beir.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prcl.files import regular_file
from prcl.retrieval.readers import json_object

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A bad line in a training or evaluation file: `path:lineno: reason`."""

    def __init__(self, path: str | os.PathLike, lineno: int, reason: str) -> None:
        super().__init__(f"{path}:{lineno}: {reason}")
        self.path, self.lineno, self.reason = path, lineno, reason


@dataclass(frozen=True)
class Example:
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    instruction: str | None = None
    graded: tuple[tuple[str, float], ...] = ()  # ((text, relevance), ...)

    def documents(self) -> list[tuple[str, float]]:
        """(text, label) for every document this query lists; a text listed twice keeps its highest label."""
        best = {}  # insertion order: positives, graded, negatives
        for text, y in [(t, 1.0) for t in self.positives] + list(self.graded) + [(t, 0.0) for t in self.negatives]:
            best[text] = max(y, best.get(text, y))
        return list(best.items())


def _texts(obj, key, allow_str):
    value = obj[key]
    if allow_str and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        want = "a string or a list of strings" if allow_str else "a list of strings"
        raise ValueError(f'"{key}" must be {want}, got {json.dumps(value)[:80]}')
    if any(not t.strip() for t in value):
        raise ValueError(f'"{key}" contains an empty string')
    return tuple(value)


KEYS = ("query", "positive", "negatives", "instruction", "graded")


def parse_example(line: str) -> Example:
    """One JSONL line -> Example; ValueError with the reason when the line is not a valid example."""
    obj = json_object(line)
    unknown = [k for k in obj if k not in KEYS]
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(json.dumps, unknown))}; allowed: {', '.join(KEYS)}")
    for key in ("query", "positive"):
        if key not in obj:
            raise ValueError(f'missing "{key}"')
    if not isinstance(obj["query"], str) or not obj["query"].strip():
        raise ValueError(f'"query" must be a non-empty string, got {json.dumps(obj["query"])[:80]}')
    positives = _texts(obj, "positive", allow_str=True)
    if not positives:
        raise ValueError('"positive" is empty: every query needs at least one positive document')
    negatives = _texts(obj, "negatives", allow_str=False) if "negatives" in obj else ()
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise ValueError(f'"instruction" must be a string, got {json.dumps(instruction)[:80]}')
    if obj.get("graded") is not None and not isinstance(obj["graded"], list):
        raise ValueError(f'"graded" must be a list, got {type(obj["graded"]).__name__}')
    graded = []
    for k, g in enumerate(obj.get("graded") or []):
        if not isinstance(g, dict) or not isinstance(g.get("text"), str) or not g["text"].strip():
            raise ValueError(f'"graded"[{k}] must be an object with a non-empty string "text"')
        rel = g.get("relevance")
        # bool is an int in Python; true/false as a relevance is a data bug, not 1.0/0.0
        if isinstance(rel, bool) or not isinstance(rel, (int, float)) or not math.isfinite(rel):
            raise ValueError(f'"graded"[{k}]["relevance"] must be a number in [0, 1], got {json.dumps(rel)}')
        if not 0.0 <= rel <= 1.0:
            raise ValueError(f'"graded"[{k}]["relevance"] must lie in [0, 1], got {rel}')
        graded.append((g["text"], float(rel)))
    return Example(obj["query"], positives, negatives, instruction or None, tuple(graded))


@dataclass
class SkipReport:
    """Bad lines skipped under skip_bad_lines: a count and the first few reasons."""
    count: int = 0
    first: list = field(default_factory=list)
    keep: int = 10
    log: object = None

    def add(self, err: object) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(str(err))
            (self.log or _stderr)(f"skipping bad line: {err}")
        elif self.count == self.keep + 1:
            (self.log or _stderr)("further bad lines are skipped silently; the count is reported at the end")

    def summary(self, path: str | os.PathLike) -> str:
        return f"{path}: skipped {self.count} bad line(s)" if self.count else ""


def _stderr(msg):
    print(msg, file=sys.stderr)


def is_beir(path: str | os.PathLike) -> bool:
    """True for a BEIR/TREC qrels path (.tsv), False for JSON Lines examples."""
    return str(path).endswith(".tsv")


def read_beir(qrels: str | os.PathLike, corpus: str | os.PathLike | None = None,
              queries: str | os.PathLike | None = None) -> list[Example]:
    """Training examples from BEIR-layout qrels (`query-id corpus-id score`, or TREC `qid 0 docid grade`),
    in the order queries first appear in the file.

    corpus / queries default to corpus.jsonl / queries.jsonl in the qrels folder's parent (the BEIR
    layout). Relevance = grade / the file's highest grade: documents at the highest grade are positives,
    the others graded documents, those at grade <= 0 with relevance 0 (judged irrelevant: listed, so that a
    teacher leaves them 0, where it grades a hard negative). A query whose best document is below
    the highest grade has no positive, only graded documents. Bad lines raise `FILE:LINE: reason`.
    """
    from prcl.retrieval import iter_qrels, read_corpus, read_queries, split_paths

    corpus, queries = split_paths(qrels, corpus, queries)
    judged = list(iter_qrels(qrels))
    query_text = read_queries(queries)
    doc_text = read_corpus(corpus, keep={did for _, _, did, _ in judged})
    for lineno, qid, did, _ in judged:
        if qid not in query_text:
            raise DataError(qrels, lineno, f"query-id {qid!r} is not in {queries}")
        if did not in doc_text:
            raise DataError(qrels, lineno, f"corpus-id {did!r} is not in {corpus}")
    top = max(grade for *_, grade in judged)
    if top <= 0:
        raise ValueError(f"{qrels}: no pair has a grade above 0, so nothing is relevant")
    by_query = {}
    for _, qid, did, grade in judged:
        by_query.setdefault(qid, []).append((doc_text[did], grade))
    return [Example(query_text[qid], tuple(t for t, g in docs if g == top), (), None,
                    tuple((t, max(g, 0) / top) for t, g in docs if g < top))
            for qid, docs in by_query.items()]


def data_files(path: str | os.PathLike) -> list[str | os.PathLike]:
    """The files a training data set is read from: the JSONL file, or BEIR qrels and their corpus and queries."""
    if is_beir(path):
        from prcl.retrieval import split_paths

        return [path, *split_paths(path)]
    return [path]


@functools.lru_cache(maxsize=1)
def _beir_examples(path, mtime):
    return read_beir(path)


def iter_file(path: str | os.PathLike, *, skip_bad_lines: bool = False, skipped: SkipReport | None = None,
              start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, int, Example]]:
    """Yields (byte offset after the line, line number, Example) from `start` = (byte offset, lines before it).

    Blank lines are allowed (and skipped). A bad line raises DataError, or goes to `skipped`.
    BEIR qrels (is_beir) are read whole (and cached); their positions count queries.
    """
    if is_beir(path):
        examples = _beir_examples(os.path.abspath(path), os.path.getmtime(path))
        for k in range(start[0], len(examples)):
            yield k + 1, k + 1, examples[k]
        return
    offset, lineno = start
    with open(regular_file(path, "data"), "rb") as f:
        f.seek(offset)
        for raw in f:
            offset += len(raw)
            lineno += 1
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff" if lineno == 1 else "")
            except UnicodeDecodeError as e:
                err = DataError(path, lineno, f"not UTF-8 ({e.reason} at byte {e.start})")
            else:
                if not line.strip():
                    continue
                try:
                    yield offset, lineno, parse_example(line)
                    continue
                except ValueError as e:
                    err = DataError(path, lineno, str(e))
            if not skip_bad_lines:
                raise err
            if skipped is not None:
                skipped.add(err)


def check_file(path: str | os.PathLike) -> None:
    """Reads the whole file once, raising DataError at its first bad line; returns the example count.
    Run before anything heavy is loaded, so a bad line costs seconds, not a model load."""
    return sum(1 for _ in iter_file(path))


def read_examples(path: str | os.PathLike, *, skip_bad_lines: bool = False,
                  skipped: SkipReport | None = None) -> list[Example]:
    """All examples of a (small, e.g. evaluation) file, in order."""
    return [ex for _, _, ex in iter_file(path, skip_bad_lines=skip_bad_lines, skipped=skipped)]


class ExampleStream:
    """An endless, resumable stream of examples: the file is read in blocks of `block_size` valid lines,
    each block shuffled by a seed derived from (seed, epoch, block offset); epochs repeat the file.

    Never holds more than one block. `state_dict()` after taking an example is the position of the next
    one: (epoch, byte offset and line number where the current block starts, examples taken from it).
    Resuming re-reads that block, reshuffles it identically and skips what was taken.
    """

    def __init__(self, path: str | os.PathLike, *, block_size: int = 4096, seed: int = 0, shuffle: bool = True,
                 skip_bad_lines: bool = False, log: Callable[[str], object] | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.path, self.block_size, self.seed, self.shuffle = path, block_size, seed, shuffle
        self.skip_bad_lines = skip_bad_lines
        self.skipped = SkipReport(log=log)
        self.state = {"epoch": 0, "offset": 0, "lineno": 0, "taken": 0}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict, source: str = "state", realign: bool = False) -> None:
        """Continue from a saved position; ValueError naming `source` when it cannot be one in this file
        (past its end, inside a line, more taken than a block holds). realign (the file changed since the
        position was saved): such a position goes on at the next line instead, in a new block."""
        st = {k: state[k] for k in ("epoch", "offset", "lineno", "taken")}
        if is_beir(self.path):
            end, boundary = len(_beir_examples(os.path.abspath(self.path), os.path.getmtime(self.path))), True
        else:
            end = os.path.getsize(self.path)
            with open(regular_file(self.path, "data"), "rb") as f:
                f.seek(max(0, st["offset"] - 1))
                boundary = st["offset"] == 0 or f.read(1) == b"\n"
        valid = st["offset"] <= end and boundary and st["lineno"] <= st["offset"] and st["taken"] <= self.block_size
        if not valid and realign:
            st, valid = self._next_line(st["epoch"], st["offset"], end), True
            logger.warning("resume: %s: the saved data position is not one in the changed %s; going on at %s",
                           source, self.path, st)
        if not valid:
            raise ValueError(f"resume: {source}: data position {st} is not a position in {self.path} ({end} "
                             f"{'queries' if is_beir(self.path) else 'bytes'}) with blocks of {self.block_size}")
        self.state = st

    def _next_line(self, epoch, offset, end):
        """The position of the first line that starts at or after offset; past the end, the next epoch's start."""
        lineno = offset  # BEIR positions count queries
        if not is_beir(self.path) and offset < end:
            lineno = 0
            with open(self.path, "rb") as f:
                while f.tell() < offset:
                    f.readline()
                    lineno += 1
                offset = f.tell()
        if offset >= end:
            return {"epoch": epoch + 1, "offset": 0, "lineno": 0, "taken": 0}
        return {"epoch": epoch, "offset": offset, "lineno": lineno, "taken": 0}

    def _block(self, offset, lineno):
        block, end = [], (offset, lineno)
        # bad lines are reported in the first epoch only; later epochs skip the same lines quietly
        skipped = self.skipped if self.state["epoch"] == 0 else None
        for end_offset, end_lineno, ex in iter_file(self.path, skip_bad_lines=self.skip_bad_lines,
                                                    skipped=skipped, start=(offset, lineno)):
            block.append(ex)
            end = (end_offset, end_lineno)
            if len(block) == self.block_size:
                break
        return block, end

    def __iter__(self):
        st = self.state
        while True:
            block, (end_offset, end_lineno) = self._block(st["offset"], st["lineno"])
            if not block:
                if st["offset"] == 0:
                    raise DataError(self.path, st["lineno"], "no valid examples in the file")
                st.update(epoch=st["epoch"] + 1, offset=0, lineno=0, taken=0)
                continue
            order = list(range(len(block)))
            if self.shuffle:
                random.Random(f"{self.seed}/{st['epoch']}/{st['offset']}").shuffle(order)
            for k in range(st["taken"], len(block)):
                st["taken"] = k + 1
                yield block[order[k]]
            st.update(offset=end_offset, lineno=end_lineno, taken=0)
