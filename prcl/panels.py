"""The gradient of Σ_i w_i Σ_j softplus(t·q_i·d_j + b) over bounded panels of the B×N pair matrix.

    G_ij = σ(z_ij), W = diag(w):   dq = t·W·G·d   dd = t·Gᵀ·(W·q)   dt = Σ W·G∘S   db = Σ W·G

A backend supplies `block(q_rows, d_cols, w_rows) -> (softplus row sums, G, Σ W·G∘S, Σ W·G)` for one
panel; this driver feeds each panel's G to the two gradient GEMMs, so memory stays one panel however
large B·N grows. The weights go on the thin side (rows of q and of G·d), never into G: G = σ stays in
[0, 1], where fp16 and bf16 panels hold it without underflow or overflow. Panels are visited in a
fixed order: results are deterministic.
"""
import math

import torch


def acc_dtype(dtype):
    """float32, or float64 for float64 inputs (the gradcheck tests run the ops in float64)."""
    return torch.promote_types(dtype, torch.float32)


def panel_shape(B, N, panel_elems):
    cols = min(N, max(1, math.isqrt(panel_elems)))
    return min(B, max(1, panel_elems // cols)), cols


def panel_grads(q, d, w, block, panel_elems):
    """Returns row sums of softplus (B,), G·d (B, D), Gᵀ·q (N, D), Σ G∘S and Σ G (0-dim) in acc_dtype."""
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
            r, G, gs_ij, g_ij = block(q_i, d_j, w_i)
            rows[i:i + pm] += r
            if w_i is None:
                _accumulate_mm(gd[i:i + pm], G, d_j)
            else:
                gd[i:i + pm] += w_i[:, None] * (G @ d_j)
            _accumulate_mm(gq[j:j + pn], G.T, q_w)
            gs += gs_ij
            g += g_ij
    return rows, gd, gq, gs, g


def _accumulate_mm(acc, a, b):
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:  # a 16-bit GEMM (tensor cores) rounds its output once; accumulate panels in float32
        acc += a @ b
