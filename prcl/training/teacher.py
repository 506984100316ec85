"""Teacher-graded labels: a second encoder grades every (query, document) pair of a batch.

PRCL's labels may be dense, one per pair, so a teacher can say how related each in-batch "negative"
is, where binary labels call every one of them irrelevant. The teacher embeds the batch's queries (without the
student's instruction: it has its own conventions) and documents, L2-normalised, under no_grad; its
cosines s_ij become labels by a per-row calibration anchored on the row's own positives:

    p_i = max over the row's positives of s_ij              (its listed pairs of the row's top label)
    m_i = median over the row's N documents of s_ij         (what it gives a typical in-batch document;
                                                             for even N the lower middle value, as torch.median)
    y_ij = r_i · clamp((s_ij − m_i) / (p_i − m_i), 0, 1)    for every pair the data did not list

with r_i the row's top label (1 for prcl train's positives), so a document the teacher ranks with the
positive gets the positive's relevance, one at or below the batch's median 0,
and the scale of the teacher's cosines (which differs between models) drops out. Listed pairs keep
the data's label (positives 1, graded documents their relevance, 0 included, excluded pairs −1); a row
without a listed positive, or whose positive the teacher scores at or below the median, keeps 0 elsewhere.
`prcl train --teacher` and prcl.integrations.sentence_transformers' `teacher=` both grade this way.
"""
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prcl.core.labels import kernel_labels, label_tile, listed_pairs
from prcl.files import load_errors
from prcl.training.batching import Batch

if TYPE_CHECKING:
    from prcl.encoders import LLMEncoder


class _SentenceTransformerTeacher:
    """A sentence-transformers model behind LLMEncoder.encode's signature, with normalised rows."""

    def __init__(self, path: str, device: torch.device) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device=str(device))

    def encode(self, texts: list, batch_size: int) -> torch.Tensor:
        return self.model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                                 show_progress_bar=False)


def load_teacher(path: str, *, max_length: int, device: torch.device) -> "_SentenceTransformerTeacher | LLMEncoder":
    """A frozen float32 teacher in eval mode: a sentence-transformers directory (modules.json) through
    sentence-transformers, with its own pooling and length; anything else as prcl.encoders.LLMEncoder
    (mean pooling, max_length tokens). float32 whatever the checkpoint's dtype: the calibration divides by
    p − median, small, so a 16-bit teacher's rounding moves the labels visibly. ValueError naming the
    teacher when it does not load."""
    teacher: _SentenceTransformerTeacher | LLMEncoder
    with load_errors("teacher", path):
        if (Path(path) / "modules.json").is_file():
            teacher = _SentenceTransformerTeacher(path, device)
        else:
            from prcl.encoders import LLMEncoder as Encoder

            teacher = Encoder.from_pretrained(path, max_length=max_length)
    teacher.model.to(device, torch.float32).eval().requires_grad_(False)
    return teacher


@torch.no_grad()
def calibrated_labels(s: torch.Tensor, labels: torch.Tensor | None, label_index: torch.Tensor | None) -> torch.Tensor:
    """(B, N) float32 labels on s's device from the teacher's cosines s (B, N) and the data's labels in any
    form of prcl.fused_pair_bce: a pair those list keeps its label (dense labels list every pair), every
    other pair gets the teacher's. ValueError naming the teacher when s is not finite (one flag read on
    the host: the teacher's path only)."""
    B, N = s.shape
    s = s.float()
    if not torch.isfinite(s).all():
        raise ValueError("teacher: its embeddings are not finite (NaN or inf) for this batch")
    y, index = kernel_labels(labels, label_index, B, s.device)
    if index is None:
        return y.to(s.device, torch.float32)
    y, index = y.to(s.device), index.to(s.device)
    data = label_tile(y, index, 0, N, torch.float32)
    listed = label_tile(listed_pairs(index, N).float(), index, 0, N, torch.float32) > 0
    top = torch.where(listed, data, -torch.inf).amax(1, keepdim=True)
    p = torch.where(listed & (data == top) & (top > 0), s, -torch.inf).amax(1, keepdim=True)
    m = s.median(1, keepdim=True).values
    usable = p > m  # a positive the teacher ranks above the median: the row has a scale
    graded = ((s - m) / torch.where(usable, p - m, 1.0)).clamp(0, 1) * torch.where(usable, top, 0.0)
    return torch.where(listed, data, graded)


@torch.no_grad()
def teacher_batch(batch: Batch, teacher: "_SentenceTransformerTeacher | LLMEncoder", batch_size: int) -> Batch:
    """The batch with dense (B, N) labels (label_index None): the data's labels where it lists a pair,
    the teacher's elsewhere. teacher: load_teacher's; it embeds batch_size texts per call."""
    q = teacher.encode(batch.queries, batch_size=batch_size).float()
    d = teacher.encode(batch.docs, batch_size=batch_size).float()
    y = calibrated_labels((q @ d.T).cpu(), batch.labels, batch.label_index)  # the Batch's labels live on the CPU
    return Batch(batch.queries, batch.instructions, batch.docs, y, None)
