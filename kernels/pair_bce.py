"""Tiles of z = t·q_i·d_j + b: per-row Σ_j l_ij with l = softplus(z) − y·z, and optionally
G_ij = σ(z_ij) − y_ij, excluded pairs (y < 0) left out of both.

1. A program owns BLOCK_M query rows and one contiguous split of the column tiles, so forward-only
   launches fill the GPU even when B is small (grid = row tiles × SPLIT_N).
2. Per column tile, S = q_tile @ d_tileᵀ accumulates over D in BLOCK_K steps on the tensor cores.
   Tiles arrive through tensor descriptors (TMA on Hopper): zero-filled past the edges, so loads
   need no masks, and the loop is software-pipelined; pointer tensors instead cost ~128 registers
   per thread and spilled at 128×128 tiles.
3. Labels are label-light: a dense tile read beside S (DENSE_Y), or K (index, label) columns per row,
   matched against the tile's document numbers (col0 + column); unmatched pairs have y = 0.
4. The epilogue stays in registers, in float32; one e = exp(−|z|) serves everything. With
   r = e/(1 + e) = σ(−|z|):
       l = (1 − y)·max(z, 0) + y·max(−z, 0) + log1p(e)       (softplus(z) − y·z, no cancellation)
       G = (1 − y) − r  if z ≥ 0  else  r − y                 (σ(z) − y, never σ ≈ 1 minus y ≈ 1)
   so a converged positive (σ → 1, y = 1) keeps its small gradient −r to float32 precision before
   G is rounded, once, to the panel's 16-bit dtype.
5. Row sums go to a (SPLIT_N, M) buffer and Σ w_i·G∘S, Σ w_i·G to one slot per program; the launcher
   sums them in a fixed order, so results are deterministic (no atomics).
6. WRITE_G stores G for one panel (the descriptor clips the edges); the two gradient GEMMs
   (G·d, Gᵀ·q) run on it afterwards.
"""
import triton
import triton.language as tl


@triton.jit
def pair_tile_kernel(
    q_desc, d_desc, g_desc,  # q (M, D), d (N, D), G (M, N) workspace
    scale_ptr, bias_ptr, w_ptr,  # t and b 0-dim, w (M,)
    y_ptr, idx_ptr,  # labels: dense (M, N), or (M, K) labels with (M, K) int64 document indices
    rows_ptr, stats_ptr,  # rows (SPLIT_N, M) f32, stats (programs, 2) f32
    M, N, D, K, col0, stride_ym, stride_yn, stride_im, stride_ik, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WRITE_G: tl.constexpr, HAS_W: tl.constexpr, DENSE_Y: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    off_m = pid_m * BLOCK_M
    o_m = off_m + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_m64 = o_m.to(tl.int64)  # row × stride of a dense label matrix can pass 2³¹
    t = tl.load(scale_ptr).to(tl.float32)
    b = tl.load(bias_ptr).to(tl.float32)
    if HAS_W:
        b_w = tl.load(w_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)  # [BLOCK_M]
    b_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_gs = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for tile in range(first, last):
        off_n = tile * BLOCK_N
        o_n = off_n + tl.arange(0, BLOCK_N)
        m_mn = m_m[:, None] & (o_n < N)[None, :]
        b_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            b_q = q_desc.load([off_m, k])  # [BLOCK_M, BLOCK_K]
            b_d = d_desc.load([off_n, k])  # [BLOCK_N, BLOCK_K]
            if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton #11584)
                b_q = b_q.to(tl.float32)
                b_d = b_d.to(tl.float32)
            b_s = tl.dot(b_q, b_d.T, b_s, input_precision=INPUT_PRECISION)
        if DENSE_Y:
            p_y = y_ptr + o_m64[:, None] * stride_ym + o_n[None, :] * stride_yn
            b_y = tl.load(p_y, mask=m_mn, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_N]
        else:
            b_y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for c in range(0, K):
                b_idx = tl.load(idx_ptr + o_m64 * stride_im + c * stride_ik, mask=m_m, other=-1)  # [BLOCK_M]
                b_lab = tl.load(y_ptr + o_m64 * stride_ym + c * stride_yn, mask=m_m, other=0.0)  # [BLOCK_M]
                b_y = tl.where(b_idx[:, None] == (col0 + o_n)[None, :], b_lab.to(tl.float32)[:, None], b_y)
        m_keep = m_mn & (b_y >= 0.0)  # y < 0 excludes the pair (−inf too: it never reaches a product)
        b_y = tl.where(m_keep, b_y, 0.0)
        b_z = b_s * t + b
        b_e = tl.exp(-tl.abs(b_z))
        b_u = 1.0 + b_e
        # log1p(e) without libdevice (absent in the interpreter): log(u)·e/(u−1) cancels the rounding
        # of u = 1 + e (Goldberg); a plain log(1 + e) loses most digits of the tiny negatives' softplus.
        b_du = b_u - 1.0
        b_log1p = tl.where(b_du == 0.0, b_e, tl.log(b_u) * (b_e / tl.maximum(b_du, 1e-30)))
        b_l = (1.0 - b_y) * tl.maximum(b_z, 0.0) + b_y * tl.maximum(-b_z, 0.0) + b_log1p
        b_rows += tl.sum(tl.where(m_keep, b_l, 0.0), 1)
        if WRITE_G:
            b_r = b_e / b_u
            b_gr = tl.where(m_keep, tl.where(b_z >= 0, (1.0 - b_y) - b_r, b_r - b_y), 0.0)
            b_gs += tl.sum(b_gr * b_s, 1)
            b_g += tl.sum(b_gr, 1)
            g_desc.store([off_m, off_n], b_gr.to(g_desc.dtype))
    tl.store(rows_ptr + pid_s * M + o_m, b_rows, mask=m_m)
    if WRITE_G:
        if HAS_W:  # per-row weights apply to the row sums only: G itself stays σ − y (see prcl/panels.py)
            b_gs = b_gs * b_w
            b_g = b_g * b_w
        pid = pid_s * tl.num_programs(0) + pid_m
        tl.store(stats_ptr + 2 * pid, tl.sum(b_gs, 0))
        tl.store(stats_ptr + 2 * pid + 1, tl.sum(b_g, 0))
