"""Σ_j softplus(t·q_i·d_j + b) per row and its gradient in plain PyTorch, one bounded panel at a time.

The PyTorch twin of the Triton kernels: same panels, same algebra, float32 throughout (float64 for
float64 inputs, so that gradcheck can run through the ops). It never
allocates B×N, only a few panel-sized buffers (PANEL_ELEMS float32 elements each).
"""
import torch
import torch.nn.functional as F

from prcl.panels import acc_dtype, panel_grads, panel_shape

PANEL_ELEMS = 1 << 20


def _acc(x):
    return x.to(acc_dtype(x.dtype))


def _logits(q, d, scale, bias):
    """z = (t·q)·dᵀ + b, the bias added by the GEMM itself: one pass over the panel, not three."""
    return torch.addmm(bias, q * scale, d.T)


def softplus_rows(q, d, scale, bias):
    q, d = _acc(q), _acc(d)
    B, N = q.shape[0], d.shape[0]
    rows = q.new_zeros(B)
    pm, pn = panel_shape(B, N, PANEL_ELEMS)
    for i in range(0, B, pm):
        for j in range(0, N, pn):
            rows[i:i + pm] += F.softplus(_logits(q[i:i + pm], d[j:j + pn], scale, bias)).sum(1)
    return rows


def softplus_grads(q, d, scale, bias, w):
    """Row sums and the raw gradient pieces of Σ_i w_i Σ_j softplus(z_ij); see prcl.panels."""

    def block(q_i, d_j, w_i):
        z = _logits(q_i, d_j, scale, bias)
        r = F.softplus(z).sum(1)
        G = torch.sigmoid(z)
        # S is not kept: Σ G∘S = (Σ G∘z − b·Σ G) / t, since s = (z − b) / t
        if w_i is None:
            g, gz = G.sum(), torch.dot(G.view(-1), z.view(-1))
        else:
            g, gz = w_i @ G.sum(1), w_i @ torch.bmm(G[:, None, :], z[:, :, None]).view(-1)
        return r, G, (gz - bias * g) / scale, g

    return panel_grads(_acc(q), _acc(d), w, block, PANEL_ELEMS)
