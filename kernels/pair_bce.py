"""Tiles of z = t·q_i·d_j + b: per-row Σ_j softplus(z_ij), and optionally G_ij = w_i σ(z_ij).

1. A program owns BLOCK_M query rows and one contiguous split of the column tiles, so forward-only
   launches fill the GPU even when B is small (grid = row tiles × SPLIT_N).
2. Per column tile, S = q_tile @ d_tileᵀ accumulates over D in BLOCK_K steps on the tensor cores.
3. The epilogue stays in registers; one e = exp(−|z|) serves both special functions:
       softplus(z) = max(z, 0) + log1p(e)        σ(z) = (z ≥ 0 ? 1 : e) / (1 + e)
4. Row sums go to a (SPLIT_N, M) buffer and Σ G∘S, Σ G to one slot per program; the launcher sums
   them in a fixed order, so results are deterministic (no atomics).
5. WRITE_G stores G for one panel; the two gradient GEMMs (G·d, Gᵀ·q) run on it afterwards.
"""
import triton
import triton.language as tl


@triton.jit
def pair_tile_kernel(
    q_ptr, d_ptr, scale_ptr, bias_ptr, w_ptr,  # q (M, D), d (N, D), t and b 0-dim, w (M,)
    rows_ptr, g_ptr, stats_ptr,  # rows (SPLIT_N, M) f32, G (M, N), stats (programs, 2) f32
    M, N, D, tiles_per_split,
    stride_qm, stride_qk, stride_dn, stride_dk, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WRITE_G: tl.constexpr, HAS_W: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_k = tl.arange(0, BLOCK_K)
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
        o_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            m_k = k + o_k < D
            p_q = q_ptr + o_m[:, None] * stride_qm + (k + o_k)[None, :] * stride_qk
            p_d = d_ptr + (k + o_k)[:, None] * stride_dk + o_n[None, :] * stride_dn
            b_q = tl.load(p_q, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            b_d = tl.load(p_d, mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton #11584)
                b_q = b_q.to(tl.float32)
                b_d = b_d.to(tl.float32)
            b_s = tl.dot(b_q, b_d, b_s, input_precision=INPUT_PRECISION)
        b_z = b_s * t + b
        b_e = tl.exp(-tl.abs(b_z))
        b_u = 1.0 + b_e
        # log1p(e) without libdevice: log(u)·e/(u−1) cancels the rounding of u = 1 + e (Goldberg);
        # a plain log(1 + e) loses most digits of the many tiny negatives' softplus.
        b_du = b_u - 1.0
        b_log1p = tl.where(b_du == 0.0, b_e, tl.log(b_u) * (b_e / tl.maximum(b_du, 1e-30)))
        m_mn = m_m[:, None] & m_n[None, :]
        b_rows += tl.sum(tl.where(m_mn, tl.maximum(b_z, 0.0) + b_log1p, 0.0), 1)
        if WRITE_G:
            # l = softplus(z) − y·z ;  dl/dz = σ(z) − y ; the −y part is the caller's sparse correction
            b_sig = tl.where(b_z >= 0, 1.0, b_e) / b_u
            if HAS_W:
                b_sig = b_sig * b_w[:, None]
            b_sig = tl.where(m_mn, b_sig, 0.0)
            b_gs += tl.sum(b_sig * b_s, 1)
            b_g += tl.sum(b_sig, 1)
            p_g = g_ptr + o_m[:, None] * stride_gm + o_n[None, :] * stride_gn
            tl.store(p_g, b_sig.to(g_ptr.dtype.element_ty), mask=m_mn)
    tl.store(rows_ptr + pid_s * M + o_m, b_rows, mask=m_m)
    if WRITE_G:
        pid = pid_s * tl.num_programs(0) + pid_m
        tl.store(stats_ptr + 2 * pid, tl.sum(b_gs, 0))
        tl.store(stats_ptr + 2 * pid + 1, tl.sum(b_g, 0))
