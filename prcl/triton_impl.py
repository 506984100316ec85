"""Launchers for kernels/pair_bce.py: the forward-only row sums and the panel gradient.

Forward only (2·B·N·D): one launch over the whole B×N, no workspace.
Gradient (6·B·N·D): per panel, one launch writes G = w_i σ(z_ij) in the input dtype, then the two
gradient GEMMs G·d and Gᵀ·q run on cuBLAS; the workspace is one panel, whatever B·N is.
"""
import os

import torch
import triton

from prcl.kernels.pair_bce import pair_tile_kernel
from prcl.panels import panel_grads

PANEL_ELEMS = 1 << 26  # 128 MiB of bf16 G: panels of 8192 × 8192 keep the GEMMs large


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(q):
    """Block sizes and launch settings, in one place. The interpreter gets small tiles so that
    small test shapes still cross several row tiles, column tiles and splits."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1), 4
    BLOCK_K = 32 if q.dtype == torch.float32 else 64
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=BLOCK_K, num_warps=8, num_stages=3), 4 * sms


def _launch(q, d, scale, bias, w, G):
    """Runs the tile kernel over q (M, D) × d (N, D). Returns (row sums (M,), Σ G∘S, Σ G)."""
    (M, D), N = q.shape, d.shape[0]
    cfg, programs = _config(q)
    m_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    n_tiles = triton.cdiv(N, cfg["BLOCK_N"])
    tiles_per_split = triton.cdiv(n_tiles, min(n_tiles, max(1, programs // m_tiles)))
    split = triton.cdiv(n_tiles, tiles_per_split)
    rows = q.new_empty(split, M, dtype=torch.float32)
    write_g = G is not None
    stats = q.new_empty(m_tiles * split, 2, dtype=torch.float32) if write_g else rows
    fp32 = q.dtype == torch.float32
    pair_tile_kernel[(m_tiles, split)](
        q, d, scale, bias, w if w is not None else rows,
        rows, G if write_g else rows, stats,
        M, N, D, tiles_per_split,
        q.stride(0), q.stride(1), d.stride(0), d.stride(1),
        G.stride(0) if write_g else 0, G.stride(1) if write_g else 0,
        WRITE_G=write_g, HAS_W=w is not None,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        # fp32 inputs get fp32 products, as eager fp32 matmul does unless TF32 is switched on
        INPUT_PRECISION="ieee" if fp32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32",
        **cfg,
    )
    if not write_g:
        return rows.sum(0), None, None
    total = stats.sum(0)
    return rows.sum(0), total[0], total[1]


def softplus_rows(q, d, scale, bias):
    return _launch(q, d, scale, bias, None, None)[0]


def softplus_grads(q, d, scale, bias, w):
    """Row sums and the raw gradient pieces of Σ_i w_i Σ_j softplus(z_ij); see prcl.panels."""
    workspace = []

    def block(q_i, d_j, w_i):
        if not workspace:
            workspace.append(q.new_empty(q_i.shape[0], d_j.shape[0]))
        G = workspace[0][: q_i.shape[0], : d_j.shape[0]]
        rows, gs, g = _launch(q_i, d_j, scale, bias, w_i, G)
        return rows, G, gs, g

    return panel_grads(q, d, w, block, PANEL_ELEMS)
