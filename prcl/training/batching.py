"""One training batch as the paper builds it: B queries × N documents with sparse labels.

Columns are every document the batch's queries list (positives, graded, hard negatives); each query is
scored against all of them, so other queries' documents are its in-batch negatives. Labels:

    y = 1 for a positive, y = relevance for a graded document   (listed in labels / label_index)
    y = 0 for the query's own hard negatives and other queries' documents   (left implicit: unlisted)
    y = −1 (excluded) for a copy of a text the query listed, in another query's column, and for a
          document that a query with the same text (and instruction) lists as relevant

Counting a copy of your own positive as a negative would push the query away from its positive. With
dedup (the default) identical texts share one column, so copies only arise across ranks or with
dedup=False; repeated queries still need the second rule. The rule is excluded_pairs, on text ids; the
sentence-transformers losses apply it to token ids (prcl.integrations.sentence_transformers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    queries: list  # B query texts
    instructions: list  # B instructions (None = no instruction)
    docs: list  # N document texts, one per column
    labels: torch.Tensor  # (B, K) float32: y per listed pair; padding 0. Or (B, N) dense (label_index None)
    label_index: torch.Tensor | None  # (B, K) int64 column of each listed pair; −1 pads

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.queries), len(self.docs)

    def dense_labels(self, n_docs: int | None = None, offset: int = 0) -> torch.Tensor:
        """(B, n_docs) labels with unlisted pairs 0 (the softmax loss and tests); columns shifted by offset."""
        y = torch.zeros(len(self.queries), n_docs or len(self.docs))
        if self.label_index is None:  # dense
            y[:, offset:offset + len(self.docs)] = self.labels
            return y
        listed = self.label_index >= 0
        rows = torch.arange(len(self.queries))[:, None].expand_as(listed)
        y[rows[listed], self.label_index[listed] + offset] = self.labels[listed]
        return y


def _same_id_pairs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All (a, b), a ≠ b, with ids[a] == ids[b]. Only the entries whose id repeats are compared, so the cost
    follows the number of repeats."""
    idx = (torch.bincount(ids)[ids] > 1).nonzero().squeeze(1)
    same = ids[idx, None] == ids[None, idx]
    same.fill_diagonal_(False)
    a, b = same.nonzero(as_tuple=True)
    return idx[a], idx[b]


def excluded_pairs(query_ids: torch.Tensor, doc_ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   relevant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, documents) of the pairs left out of the loss (y = −1), sorted by query, then document.

    Query i leaves out a document j it does not list when j's text is the text of a document i lists (a copy
    of its positive is not a negative; a copy of its hard negative would count twice), or of a document
    relevant to another query with i's text and instruction (that document answers i too).

    Args:
        query_ids: (B,) non-negative int64 ids, equal for queries of the same text and instruction.
        doc_ids: (N,) non-negative int64 ids, equal for documents of the same text.
        rows, cols: the listed pairs (query, document), int64 of one length.
        relevant: bool, one per listed pair: y > 0.
    Returns:
        (query rows, document columns), int64.

    Example:
        # B = 2, N = 3; document 2 repeats document 0's text, which query 0 lists
        excluded_pairs(torch.tensor([0, 1]), torch.tensor([0, 1, 0]), torch.tensor([0, 1]), torch.tensor([0, 1]),
                       torch.tensor([True, True]))  # -> (tensor([0]), tensor([2]))
    """
    N = doc_ids.shape[0]
    queries, texts = [rows], [doc_ids[cols]]
    twin, twin_of = _same_id_pairs(query_ids)
    if twin.numel():  # the relevant texts of each query's twins
        rel_rows, rel_cols = rows[relevant], cols[relevant]
        t, r = (twin_of[:, None] == rel_rows[None, :]).nonzero(as_tuple=True)
        queries.append(twin[t])
        texts.append(doc_ids[rel_cols[r]])
    queries, texts = torch.cat(queries), torch.cat(texts)
    # every column holding each (query, text) pair's text: columns sorted by text, each text's run
    order = torch.argsort(doc_ids, stable=True)
    first = torch.searchsorted(doc_ids[order], texts)
    count = torch.searchsorted(doc_ids[order], texts, right=True) - first
    run_start = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    within = torch.arange(run_start.shape[0], device=doc_ids.device) - run_start
    q = torch.repeat_interleave(queries, count)
    d = order[torch.repeat_interleave(first, count) + within]
    key = q * N + d
    key = torch.unique(key[~torch.isin(key, rows * N + cols)])  # a query's own documents stay as it listed them
    return key // N, key % N


def build_batch(examples: list, *, dedup: bool = True) -> Batch:
    """Batch of `examples` (a list of data.Example). dedup=False gives every listing its own column."""
    if not examples:
        raise ValueError("examples: a batch needs at least one example")
    docs, columns_of = [], {}  # columns_of: text -> every column holding it
    listed, judged = [], []  # per query: {column: y}; the columns of its graded documents
    for ex in examples:
        own, graded = {}, {text for text, _ in ex.graded}
        judged.append(set())
        for text, y in ex.documents():
            if dedup and text in columns_of:
                col = columns_of[text][0]
            else:
                col = len(docs)
                docs.append(text)
                columns_of.setdefault(text, []).append(col)
            own[col] = max(y, own.get(col, y))
            if text in graded:
                judged[-1].add(col)
        listed.append(own)
    # hard negatives (y = 0) are left implicit; a graded 0 is listed, so that a teacher leaves it 0
    rows = [{c: y for c, y in own.items() if y > 0 or c in cols} for own, cols in zip(listed, judged)]
    for i, j in zip(*_excluded(examples, docs, listed)):
        rows[i][j] = -1.0
    return _sparse_batch(examples, docs, [sorted(r.items()) for r in rows])


def _excluded(examples: list, docs: list[str], listed: list[dict]) -> tuple[list[int], list[int]]:
    """excluded_pairs of the batch, its texts numbered."""
    def numbered(keys):
        first = {}
        return torch.tensor([first.setdefault(k, len(first)) for k in keys], dtype=torch.int64)

    pairs = [(i, c, y) for i, own in enumerate(listed) for c, y in own.items()]
    rows, cols, ys = (torch.tensor(x, dtype=torch.int64 if k < 2 else torch.float32)
                      for k, x in enumerate(zip(*pairs)))
    q, d = excluded_pairs(numbered((ex.instruction, ex.query) for ex in examples), numbered(docs), rows, cols, ys > 0)
    return q.tolist(), d.tolist()


def _sparse_batch(examples: list, docs: list[str], rows: list[list[tuple[int, float]]]) -> Batch:
    K = max(1, max(len(r) for r in rows))
    labels = torch.zeros(len(rows), K)
    label_index = torch.full((len(rows), K), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            label_index[i, : len(r)] = torch.tensor([c for c, _ in r])
            labels[i, : len(r)] = torch.tensor([y for _, y in r])
    return Batch([ex.query for ex in examples], [ex.instruction for ex in examples], docs, labels, label_index)
