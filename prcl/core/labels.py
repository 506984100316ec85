"""Label forms and every conversion between them: one function per conversion, used by every backend.

Public forms (prcl.fused_pair_bce): None (pair (i, i) positive), graded diagonal (B,), dense (B, N), or
listed (B, K) with label_index (B, K), −1 pads. A label < 0 excludes its pair.

The kernels' layout (prcl.core.ops): dense, `labels (B, N), label_index None`; or listed, `labels (B, K),
label_index (B, K)`, where every unlisted pair has y = 0 and an index outside [0, N) lists nothing. The
diagonal forms become one listed pair per row, (i, i). No conversion builds B×N except `dense_labels`
(the eager reference's) and a dense panel's tile (`label_tile`, one bounded panel at a time).
"""

import torch
from torch import Tensor

KernelLabels = tuple[Tensor, Tensor | None]  # (labels, label_index) in the kernels' layout


def kernel_labels(labels: Tensor | None, label_index: Tensor | None, B: int,
                  device: torch.device | str) -> KernelLabels:
    """Any public label form in the kernels' layout. The diagonal forms: (B, 1) labels at index i."""
    if labels is None or labels.dim() == 1:
        y = torch.ones(B, 1, device=device) if labels is None else labels[:, None]
        return y, torch.arange(B, device=device)[:, None]
    return labels, label_index


def no_pairs(B: int, device: torch.device | str) -> KernelLabels:
    """The kernels' layout listing no pair: every pair a negative (y = 0)."""
    return torch.zeros(B, 0, device=device), torch.zeros(B, 0, dtype=torch.int64, device=device)


def offset_labels(labels: Tensor, label_index: Tensor | None, offset: int, n_total: int) -> KernelLabels:
    """Labels (kernels' layout) of N documents as labels over n_total documents in which those sit at
    rows offset … offset + N − 1; every other document is a negative. Dense labels are zero-padded to
    (B, n_total); listed ones keep their size."""
    if label_index is not None:
        return labels, torch.where(label_index >= 0, label_index + offset, -1)
    y = labels.new_zeros(labels.shape[0], n_total)
    y[:, offset:offset + labels.shape[1]] = labels
    return y, None


def listed_pairs(label_index: Tensor, N: int) -> Tensor:
    """Which slots of listed labels name a document of [0, N) (pads and other indices list nothing)."""
    return (label_index >= 0) & (label_index < N)


def panel_labels(labels: Tensor, label_index: Tensor | None, i: int, j: int, rows: int,
                 cols: int) -> KernelLabels:
    """The panel (rows i:i+rows, columns j:j+cols) of the kernels' layout: a dense tile, or the rows'
    lists, their indices still global (`label_tile` compares them with the panel's first column)."""
    if label_index is None:
        return labels[i:i + rows, j:j + cols], None
    return labels[i:i + rows], label_index[i:i + rows]


def label_tile(labels: Tensor, label_index: Tensor | None, col: int, cols: int, dtype: torch.dtype) -> Tensor:
    """The dense (rows, cols) labels, in dtype, of a panel of the kernels' layout whose first document
    is `col`; unlisted pairs are 0."""
    if label_index is None:
        return labels.to(dtype)
    # scatter into one spare column that catches the indices outside the panel: no boolean indexing,
    # which would read a count on the host
    local = label_index - col if col else label_index
    local = torch.where((local >= 0) & (local < cols), local, cols)
    tile = labels.new_zeros(labels.shape[0], cols + 1, dtype=dtype)
    return tile.scatter_(1, local, labels.to(dtype))[:, :cols]


def dense_labels(labels: Tensor | None, label_index: Tensor | None, B: int, N: int,
                 device: torch.device | str) -> Tensor:
    """The (B, N) float32 label matrix of any public form; entries < 0 mark excluded pairs."""
    if label_index is not None or (labels is not None and labels.dim() == 2):
        return label_tile(labels, label_index, 0, N, torch.float32)  # type: ignore[arg-type]
    y = torch.zeros(B, N, device=device)
    diagonal = y.diagonal()  # the diagonal forms: N >= B
    if labels is None:
        diagonal.fill_(1.0)
    else:
        diagonal.copy_(labels)
    return y
