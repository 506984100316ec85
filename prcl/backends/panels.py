"""The gradient of Σ_i w_i Σ_j l_ij over bounded panels of the B×N pair matrix.

    G_ij = σ(z_ij) − y_ij  (0 for excluded pairs),  W = diag(w):
    dq = t·W·G·d      dd = t·Gᵀ·(W·q)      dt = Σ W·G∘S      db = Σ W·G

Backends return G·d and Gᵀ·q times grad_scale = c (prcl.core.ops passes t times the reduction's weight),
in float32, or rounded once to the inputs' dtype when asked (`out_dtype`).

A backend supplies `block(q_rows, d_cols, labels, label_index, col, w_rows, threshold_rows) -> (loss
row sums, G, Σ W·G∘S, Σ W·G)` for one panel, whose labels are the panel's rows of the kernel label
layout (prcl.core.ops), whose first document is `col` and whose rows' false-negative thresholds (or None)
are threshold_rows; this driver feeds each panel's G to the two gradient GEMMs, so
memory stays one panel however large B·N grows. The weights go on the thin side (rows of q and of
G·d), never into G: G = σ − y stays in [−1, 1], where fp16 and bf16 panels hold it without underflow
or overflow. Every panel's G·d and Gᵀ·q is accumulated in float32, never rounded to 16 bits first.
Panels are visited in a fixed order: results are deterministic.
"""
from collections.abc import Callable

import torch
from torch import Tensor

from prcl.backends.tuning import panel_shape
from prcl.core.labels import panel_labels

# One panel's work: (q rows, d columns, the panel's labels, label_index, first column, row weights,
# row thresholds) -> (loss row sums, G, Σ W·G∘S, Σ W·G)
Block = Callable[[Tensor, Tensor, Tensor, Tensor | None, int, Tensor | None, Tensor | None],
                 tuple[Tensor, Tensor, Tensor, Tensor]]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (the gradcheck tests run the ops in float64)."""
    return torch.promote_types(dtype, torch.float32)


def panel_grads(q: Tensor, d: Tensor, labels: Tensor, label_index: Tensor | None, w: Tensor | None, block: Block,
                panel_elems: int, grad_scale: Tensor, out_dtype: torch.dtype | None = None,
                threshold: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns row sums of l (B,), c·G·d (B, D), c·Gᵀ·q (N, D) (in out_dtype, if given), Σ G∘S and
    Σ G (0-dim) in acc_dtype."""
    (B, D), N = q.shape, d.shape[0]
    acc = acc_dtype(q.dtype)
    rows = q.new_zeros(B, dtype=acc)
    gd = q.new_zeros(B, D, dtype=acc)
    gq = q.new_zeros(N, D, dtype=acc)
    gs = q.new_zeros((), dtype=acc)
    g = q.new_zeros((), dtype=acc)
    pm, pn = panel_shape(B, N, panel_elems)
    for i in range(0, B, pm):
        q_i, w_i = q[i:i + pm], None if w is None else w[i:i + pm]
        q_w = q_i if w_i is None else (q_i * w_i[:, None]).to(q.dtype)
        for j in range(0, N, pn):
            d_j = d[j:j + pn]
            y, index = panel_labels(labels, label_index, i, j, q_i.shape[0], d_j.shape[0])
            r, G, gs_ij, g_ij = block(q_i, d_j, y, index, j, w_i, None if threshold is None else threshold[i:i + pm])
            rows[i:i + pm] += r
            if w_i is None:
                _accumulate_mm(gd[i:i + pm], G, d_j)
            else:
                gd[i:i + pm] += w_i[:, None] * _mm(G, d_j, acc)
            _accumulate_mm(gq[j:j + pn], G.T, q_w)
            gs += gs_ij
            g += g_ij
    return (rows, *finish_grads(gd, gq, grad_scale, out_dtype), gs, g)


def finish_grads(gd: Tensor, gq: Tensor, grad_scale: Tensor,
                 out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """c·G·d and c·Gᵀ·q from their float32 sums, rounded once to out_dtype when given."""
    gd, gq = gd.mul_(grad_scale), gq.mul_(grad_scale)
    if out_dtype is not None:
        gd, gq = gd.to(out_dtype), gq.to(out_dtype)
    return gd, gq


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b with an `acc`-typed result, however a and b are typed."""
    if a.dtype == acc:
        return a @ b
    if a.is_cuda:  # cuBLAS: 16-bit tensor-core GEMM with float32 output (torch >= 2.8)
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)  # no 16-bit→float32 GEMM on CPU (the interpreter tests)


def _accumulate_mm(out: Tensor, a: Tensor, b: Tensor) -> None:
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += _mm(a, b, out.dtype)
