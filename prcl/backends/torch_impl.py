"""Σ_j l_ij per row and its gradient in plain PyTorch, one bounded panel at a time.

The PyTorch twin of the Triton kernels: same panels, same label layout, same per-pair algebra,
float32 throughout (float64 for float64 inputs, so that gradcheck can run through the ops). It never
allocates B×N, only a few panel-sized buffers (tuning.TORCH_PANEL_ELEMS elements each), and reads no tensor
value on the host: it runs on any device torch supports, meta included.
"""
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from prcl.backends import tuning
from prcl.backends.panels import acc_dtype, panel_grads
from prcl.backends.tuning import panel_shape
from prcl.core.labels import label_tile, listed_pairs, panel_labels


def _acc(x: Tensor) -> Tensor:
    return x.to(acc_dtype(x.dtype))


def pair_terms(s: Tensor, t: Tensor, b: Tensor, y: Tensor,
               threshold: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per pair, from the similarity s, the label y (< 0: excluded) and z = t·s + b:
    (l = softplus(z) − y·z, G = σ(z) − y), both 0 for excluded pairs; with a per-row threshold
    (rows, 1), a pair with y = 0 and s > threshold is excluded too (prcl.core.loss, false negatives).

    With e = exp(−|z|) and r = e/(1 + e) = σ(−|z|):
        l = (1 − y)·max(z, 0) + y·max(−z, 0) + log1p(e)      no cancellation of y·z against softplus
        G = (1 − y) − r  if z ≥ 0  else  r − y               σ − y without forming σ ≈ 1 first
    """
    z = s * t + b
    keep = y >= 0
    if threshold is not None:
        keep = keep & ~((y == 0) & (s > threshold))
    y = torch.where(keep, y, 0.0)  # −inf labels must not reach a product
    e = torch.exp(-z.abs())
    r = e / (1 + e)
    loss = (1 - y) * z.clamp(min=0) + y * (-z).clamp(min=0) + torch.log1p(e)
    grad = torch.where(z >= 0, (1 - y) - r, r - y)
    return torch.where(keep, loss, 0.0), torch.where(keep, grad, 0.0)


def _rows_of(threshold: Tensor | None, i: int, rows: int) -> Tensor | None:
    return None if threshold is None else threshold[i:i + rows, None]


def rows(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
         threshold: Tensor | None = None) -> Tensor:
    q, d = _acc(q), _acc(d)
    B, N = q.shape[0], d.shape[0]
    out = q.new_zeros(B)
    pm, pn = panel_shape(B, N, tuning.TORCH_PANEL_ELEMS)
    for i in range(0, B, pm):
        for j in range(0, N, pn):
            q_i, d_j = q[i:i + pm], d[j:j + pn]
            y, index = panel_labels(labels, label_index, i, j, q_i.shape[0], d_j.shape[0])
            loss, _ = pair_terms(q_i @ d_j.T, scale, bias, label_tile(y, index, j, d_j.shape[0], q.dtype),
                                 _rows_of(threshold, i, q_i.shape[0]))
            out[i:i + pm] += loss.sum(1)
    return out


def grads(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
          w: Tensor | None, grad_scale: Tensor, rounded: bool,
          threshold: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row sums and the gradient pieces of Σ_i w_i Σ_j l_ij; see prcl.backends.panels."""

    def block(q_i: Tensor, d_j: Tensor, y: Tensor, index: Tensor | None, col: int, w_i: Tensor | None,
              thr_i: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = q_i @ d_j.T
        loss, G = pair_terms(s, scale, bias, label_tile(y, index, col, d_j.shape[0], s.dtype),
                             None if thr_i is None else thr_i[:, None])
        # torch's sum reduces in a tree; a BLAS dot accumulates in one float32 register per lane, which
        # lost digits of Σ G∘S over a panel (its terms cancel: 3.5e-5 relative at B = N = 1024)
        gs_rows = (G * s).sum(1)
        if w_i is None:
            g, gs = G.sum(), gs_rows.sum()
        else:
            g, gs = w_i @ G.sum(1), w_i @ gs_rows
        return loss.sum(1), G, gs, g

    return panel_grads(_acc(q), _acc(d), labels, label_index, w, block, tuning.TORCH_PANEL_ELEMS, grad_scale,
                       q.dtype if rounded else None, threshold)


def _panels(q: Tensor, d: Tensor, labels: Tensor,
            label_index: Tensor | None) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """(row slice, float32 S, dense label tile) over bounded panels of the pair matrix, in order."""
    acc = acc_dtype(q.dtype)
    B, N = q.shape[0], d.shape[0]
    pm, pn = panel_shape(B, N, tuning.TORCH_PANEL_ELEMS)
    for i in range(0, B, pm):
        for j in range(0, N, pn):
            q_i, d_j = q[i:i + pm], d[j:j + pn]
            y, index = panel_labels(labels, label_index, i, j, q_i.shape[0], d_j.shape[0])
            yield slice(i, i + q_i.shape[0]), q_i.to(acc) @ d_j.to(acc).T, label_tile(y, index, j, d_j.shape[0], acc)


def listed_dots(q: Tensor, d: Tensor, label_index: Tensor) -> Tensor:
    """q_i·d_j in float32 (B, K) for each listed pair (i, label_index[i, k]), one row-dot per column:
    B×D at a time, never B×N. Pads and out-of-range indices read document 0: callers mask them."""
    q, d = q.to(acc_dtype(q.dtype)), d.to(acc_dtype(d.dtype))
    docs = label_index.clamp(0, d.shape[0] - 1)
    s = q.new_zeros(label_index.shape)
    for k in range(label_index.shape[1]):
        s[:, k] = torch.linalg.vecdot(q, d[docs[:, k]])
    return s


def labelled_max(q: Tensor, d: Tensor, labels: Tensor, label_index: Tensor | None) -> Tensor:
    """p_i = max over row i's pairs with y > 0 of q_i·d_j, float32 (B,), −inf for rows without one;
    from the inputs as the kernels read them (products summed in float32). Listed labels take K row
    dots each; a dense label matrix takes one forward pass over bounded panels."""
    acc = acc_dtype(q.dtype)
    B, N = q.shape[0], d.shape[0]
    if label_index is not None:
        if label_index.shape[1] == 0:
            return q.new_full((B,), -math.inf, dtype=acc)
        listed = listed_pairs(label_index, N) & (labels > 0)
        return torch.where(listed, listed_dots(q, d, label_index), -math.inf).amax(1)
    best = q.new_full((B,), -math.inf, dtype=acc)
    for rows_, s, y in _panels(q, d, labels, label_index):
        best[rows_] = torch.maximum(best[rows_], torch.where(y > 0, s, -math.inf).amax(1))
    return best


def masked_count(q: Tensor, d: Tensor, labels: Tensor, label_index: Tensor | None, threshold: Tensor) -> Tensor:
    """How many pairs the threshold excludes (y = 0 and s > threshold_i): an int64 0-dim tensor, from
    one more forward pass over bounded panels (2·B·N·D), read by nobody on the host."""
    count = q.new_zeros((), dtype=torch.int64)
    for rows_, s, y in _panels(q, d, labels, label_index):
        count += ((y == 0) & (s > threshold[rows_, None])).sum()
    return count

