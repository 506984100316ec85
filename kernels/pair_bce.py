"""Tiles of z = t·q_i·d_j + b: per-row Σ_j softplus(z_ij), and optionally G_ij = σ(z_ij).

1. A program owns BLOCK_M query rows and one contiguous split of the column tiles, so forward-only
   launches fill the GPU even when B is small (grid = row tiles × SPLIT_N).
2. Per column tile, S = q_tile @ d_tileᵀ accumulates over D in BLOCK_K steps on the tensor cores.
   Tiles arrive through tensor descriptors (TMA on Hopper): zero-filled past the edges, so loads
   need no masks, and the loop is software-pipelined; pointer tensors instead cost ~128 registers
   per thread and spilled at 128×128 tiles.
3. The epilogue stays in registers; one e = exp(−|z|) serves both special functions:
       softplus(z) = max(z, 0) + log1p(e)        σ(z) = (z ≥ 0 ? 1 : e) / (1 + e)
4. Row sums go to a (SPLIT_N, M) buffer and Σ w_i·σ∘S, Σ w_i·σ to one slot per program; the launcher sums
   them in a fixed order, so results are deterministic (no atomics).
5. WRITE_G stores G for one panel (the descriptor clips the edges); the two gradient GEMMs
   (G·d, Gᵀ·q) run on it afterwards.
"""
import triton
import triton.language as tl


@triton.jit
def pair_tile_kernel(
    q_desc, d_desc, g_desc,  # q (M, D), d (N, D), G (M, N) workspace
    scale_ptr, bias_ptr, w_ptr,  # t and b 0-dim, w (M,)
    rows_ptr, stats_ptr,  # rows (SPLIT_N, M) f32, stats (programs, 2) f32
    M, N, D, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WRITE_G: tl.constexpr, HAS_W: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    off_m = pid_m * BLOCK_M
    o_m = off_m + tl.arange(0, BLOCK_M)
    m_m = o_m < M
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
        b_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            b_q = q_desc.load([off_m, k])  # [BLOCK_M, BLOCK_K]
            b_d = d_desc.load([off_n, k])  # [BLOCK_N, BLOCK_K]
            if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton #11584)
                b_q = b_q.to(tl.float32)
                b_d = b_d.to(tl.float32)
            b_s = tl.dot(b_q, b_d.T, b_s, input_precision=INPUT_PRECISION)
        b_z = b_s * t + b
        b_e = tl.exp(-tl.abs(b_z))
        b_u = 1.0 + b_e
        # log1p(e) without libdevice (absent in the interpreter): log(u)·e/(u−1) cancels the rounding
        # of u = 1 + e (Goldberg); a plain log(1 + e) loses most digits of the tiny negatives' softplus.
        b_du = b_u - 1.0
        b_log1p = tl.where(b_du == 0.0, b_e, tl.log(b_u) * (b_e / tl.maximum(b_du, 1e-30)))
        m_mn = m_m[:, None] & (o_n < N)[None, :]
        b_rows += tl.sum(tl.where(m_mn, tl.maximum(b_z, 0.0) + b_log1p, 0.0), 1)
        if WRITE_G:
            # l = softplus(z) − y·z ;  dl/dz = σ(z) − y ; the −y part is the caller's sparse correction
            b_sig = tl.where(m_mn, tl.where(b_z >= 0, 1.0, b_e) / b_u, 0.0)
            b_gs += tl.sum(b_sig * b_s, 1)
            b_g += tl.sum(b_sig, 1)
            g_desc.store([off_m, off_n], b_sig.to(g_desc.dtype))
    tl.store(rows_ptr + pid_s * M + o_m, b_rows, mask=m_m)
    if WRITE_G:
        if HAS_W:  # per-row weights apply to the row sums only: G itself stays σ (see prcl/panels.py)
            b_gs = b_gs * b_w
            b_g = b_g * b_w
        pid = pid_s * tl.num_programs(0) + pid_m
        tl.store(stats_ptr + 2 * pid, tl.sum(b_gs, 0))
        tl.store(stats_ptr + 2 * pid + 1, tl.sum(b_g, 0))
