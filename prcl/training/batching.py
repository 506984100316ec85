"""One training batch as the paper builds it: B queries × N documents with sparse labels.

Columns are every document the batch's queries list (positives, graded, hard negatives); each query is
scored against all of them, so other queries' documents are its in-batch negatives. Labels:

    y = 1 for a positive, y = relevance for a graded document   (listed in labels / label_index)
    y = 0 for the query's own hard negatives and other queries' documents   (left implicit: unlisted)
    y = −1 (excluded) for a copy of a text the query listed, in another query's column, and for a
          document that a query with the same text (and instruction) lists as relevant

Counting a copy of your own positive as a negative would push the query away from its positive. With
dedup (the default) identical texts share one column, so copies only arise across ranks or with
dedup=False; repeated queries still need the second rule.
"""
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    queries: list  # B query texts
    instructions: list  # B instructions (None = no instruction)
    docs: list  # N document texts, one per column
    labels: torch.Tensor  # (B, K) float32: y per listed pair; padding 0
    label_index: torch.Tensor  # (B, K) int64 column of each listed pair; −1 pads

    @property
    def shape(self):
        return len(self.queries), len(self.docs)

    def dense_labels(self, n_docs=None, offset=0):
        """(B, n_docs) labels with unlisted pairs 0 (the softmax loss and tests); columns shifted by offset."""
        y = torch.zeros(len(self.queries), n_docs or len(self.docs))
        listed = self.label_index >= 0
        rows = torch.arange(len(self.queries))[:, None].expand_as(listed)
        y[rows[listed], self.label_index[listed] + offset] = self.labels[listed]
        return y


def build_batch(examples, *, dedup=True):
    """Batch of `examples` (a list of data.Example). dedup=False gives every listing its own column."""
    if not examples:
        raise ValueError("examples: a batch needs at least one example")
    docs, columns_of = [], {}  # columns_of: text -> every column holding it
    listed = []  # per query: {column: y}
    for ex in examples:
        own = {}
        for text, y in ex.documents():
            if dedup and text in columns_of:
                col = columns_of[text][0]
            else:
                col = len(docs)
                docs.append(text)
                columns_of.setdefault(text, []).append(col)
            own[col] = max(y, own.get(col, y))
        listed.append(own)

    # texts each query's key (instruction, query) marks as relevant, over all rows with that key
    relevant_of = {}
    for ex, own in zip(examples, listed):
        relevant_of.setdefault((ex.instruction, ex.query), set()).update(docs[c] for c, y in own.items() if y > 0)

    rows = []
    for ex, own in zip(examples, listed):
        row = {c: y for c, y in own.items() if y > 0}  # hard negatives: y = 0, left implicit
        own_texts = {docs[c] for c in own}
        for text in own_texts | relevant_of[(ex.instruction, ex.query)]:
            for col in columns_of[text]:
                if col not in own:
                    row[col] = -1.0
        rows.append(sorted(row.items()))

    K = max(1, max(len(r) for r in rows))
    labels = torch.zeros(len(rows), K)
    label_index = torch.full((len(rows), K), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            label_index[i, : len(r)] = torch.tensor([c for c, _ in r])
            labels[i, : len(r)] = torch.tensor([y for _, y in r])
    return Batch([ex.query for ex in examples], [ex.instruction for ex in examples], docs, labels, label_index)
