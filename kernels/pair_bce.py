"""Tiles of z = t·q_i·d_j + b: per-row Σ_j l_ij with l = softplus(z) − y·z, and optionally
G_ij = σ(z_ij) − y_ij, excluded pairs (y < 0) left out of both.

1. A program owns BLOCK_M query rows and one contiguous split of the column tiles, so forward-only
   launches fill the GPU even when B is small (grid = row tiles × SPLIT_N).
2. Per column tile, S = q_tile @ d_tileᵀ accumulates over D in BLOCK_K steps on the tensor cores.
   Tiles arrive through tensor descriptors (TMA on Hopper): zero-filled past the edges, so loads
   need no masks, and the loop is software-pipelined; pointer tensors instead cost ~128 registers
   per thread and spilled at 128×128 tiles.
3. Labels are label-light: a dense tile read beside S (DENSE_Y), or K (index, label) columns per row:
   per row the label's column, then one compare and two selects per pair (−y, and the bias: the
   epilogue only subtracts y, and a negated select cost ptxas 12.8 one FADD per pair). On the GPU the
   compare and selects are inline PTX: as tl.where, triton 3.6's LLVM packed the compare results into
   bit masks and unpacked them per pair (the sm_90 gradient kernel then took 148 registers). K = 1
   (the diagonal forms) reads each row's label once per program and carries nothing from tile to
   tile; K ≠ 1 (MANY_LABELS) loops over the columns per tile. Unmatched pairs have y = 0. A pair left
   out (y < 0, or a column past N in the last tile, where TMA filled S with 0) gets the bias −1e30:
   then e = 0 and l = G = G·S = 0, with no mask per pair; when BLOCK_N divides N (RAGGED_N off, every
   full-size panel) no tile has such columns and the bias is one scalar. With HAS_THR, a pair with
   y = 0 whose S exceeds its row's false-negative threshold (prcl/core/loss.py, +inf for a row without
   one) gets the bias −1e30 too: two compares and a select per pair, nothing more in memory.
4. The epilogue stays in registers, in float32, in base 2: z₂ = z·log2(e) = S·(t·log2 e) + b·log2 e,
   row sums scaled by ln 2 once. One e = 2^(−|z₂|) = exp(−|z|) serves everything. With
   r = e/(1 + e) = σ(−|z|) and c = 1 − y (z ≥ 0) or −y (z < 0):
       l = z·c + log1p(e)             = (1 − y)·max(z, 0) + y·max(−z, 0) + log1p(e), two terms ≥ 0
       G = c − r  if z ≥ 0  else  c + r                   (σ(z) − y, never σ ≈ 1 minus y ≈ 1)
   so a converged positive (σ → 1, y = 1) keeps its small gradient −r to float32 precision before
   G is rounded, once, to the panel's 16-bit dtype (c is exact there, c ± r rounds once).
   Approximations (on the GPU; the interpreter runs numpy's exp2 and a true division instead, the
   polynomials are the same float32 arithmetic on both):
   - 2^x: ex2.approx.ftz.f32 (one MUFU.EX2, −|z₂| its operand modifier), max 2 ulp (PTX ISA); e below
     2^−126 flushes to 0, so log1p(e) and r are 0 there instead of < 1.2e−38.
   - 1/(1 + e): rcp.approx.ftz.f32 (one MUFU.RCP), max 1 ulp (PTX ISA). With e's 2 ulp, r is within
     4.3e−7 relative of e/(1 + e) for the float32 e (worst case over e ∈ [1e−30, 1], numpy).
   - log1p(e), forward: e·P(e), P for log2(1 + e)/e of degree 7 (float32 inputs) or 5 (16-bit):
     max relative error 3.1e−7 or 8.5e−6; gradient: r·Q(e), Q for (1 + e)·log2(1 + e)/e, one degree
     fewer as r is at hand, 6 or 4: max 4.8e−7 or 1.1e−5 with the reciprocal anywhere within 1 ulp.
     Measured in float32 Horner (one FMA per step) against float64 numpy on 900k points of
     e ∈ [1e−30, 1]. The loss's relative error from them is at most theirs (the other term of l is
     ≥ 0); the 16-bit bound, 1.1e−5, is 20× below the fp16 floor of the accuracy rule (2.5e−4) and G
     does not use them (docs/design.md, "Epilogue approximations"). No lg2.approx: its absolute error
     (~2^−22 near 1) would be ~1 % of log1p(e) at e ≈ 1e−5, the typical negative with b = −log(N − 1).
   Every GPU figure above is from the PTX ISA's stated bounds, not a GPU run.
5. Row sums go to a (SPLIT_N, M) buffer and Σ w_i·G∘S, Σ w_i·G to one slot per program; the launcher
   sums them in a fixed order, so results are deterministic (no atomics).
6. WRITE_G stores G for one panel (the descriptor clips the edges); the two gradient GEMMs
   (G·d, Gᵀ·q) run on it afterwards.
pair_pass_kernel is the other gradient design, two passes that keep G in registers (its docstring).
"""
import triton
import triton.language as tl

EXCLUDED = tl.constexpr(-1.0e30)  # bias of a pair left out (y < 0, or a column past N): e = 0, so l = G = 0
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _exp2_neg_abs(x, INTERPRET: tl.constexpr):
    """2^(−|x|); on the GPU ex2.approx.ftz.f32 (at most 2 ulp), −|x| written in the PTX so that ptxas
    makes it MUFU.EX2's operand modifier (tl.abs becomes an integer op that it does not fold)."""
    if INTERPRET:
        out = tl.math.exp2(-tl.abs(x))
    else:
        out = tl.inline_asm_elementwise(
            "{ .reg .f32 t; abs.f32 t, $1; neg.f32 t, t; ex2.approx.ftz.f32 $0, t; }", "=f,f", [x],
            dtype=tl.float32, is_pure=True, pack=1)
    return out


@triton.jit
def _rcp(x, INTERPRET: tl.constexpr):
    """1/x; rcp.approx.ftz.f32 on the GPU (one MUFU.RCP, at most 1 ulp), a division in the interpreter."""
    if INTERPRET:
        out = 1.0 / x
    else:
        out = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                        is_pure=True, pack=1)
    return out


@triton.jit
def _log2_1p_over(e, SHORT: tl.constexpr):
    """log2(1 + e)/e for e in [0, 1]: a polynomial of degree 7, or 5 where SHORT (16-bit inputs), fit
    by iteratively reweighted least squares in relative error."""
    if SHORT:
        p = e * -0.034435901790857315 + 0.14603276550769806
        p = p * e - 0.30303600430488586
        p = p * e + 0.46917393803596497
        p = p * e - 0.7204261422157288
        p = p * e + 1.4426828622817993
    else:
        p = e * -0.012319469824433327 + 0.06360787898302078
        p = p * e - 0.15535184741020203
        p = p * e + 0.25600969791412354
        p = p * e - 0.35339483618736267
        p = p * e + 0.48006370663642883
        p = p * e - 0.7213100790977478
        p = p * e + 1.4426947832107544
    return p


@triton.jit
def _log2_1p_over_r(e, SHORT: tl.constexpr):
    """(1 + e)·log2(1 + e)/e for e in [0, 1], so that log2(1 + e) = r·this with r = e/(1 + e): one
    degree fewer than _log2_1p_over for the same accuracy, where r is at hand (the gradient): 6, or 4
    where SHORT."""
    if SHORT:
        p = e * -0.02075125090777874 + 0.08911700546741486
        p = p * e - 0.23150260746479034
        p = p * e + 0.7204041481018066
        p = p * e + 1.4427108764648438
    else:
        p = e * -0.004816813860088587 + 0.02378103695809841
        p = p * e - 0.059648510068655014
        p = p * e + 0.11659503728151321
        p = p * e - 0.23992517590522766
        p = p * e + 0.721318781375885
        p = p * e + 1.4426952600479126
    return p


@triton.jit
def _gradient(b_z, b_e, b_ny, INTERPRET: tl.constexpr):
    """(G = σ(z) − y, r = σ(−|z|), c = 1 − y or −y) from z₂, e = 2^(−|z₂|) and −y (see 4.)."""
    b_r = b_e * _rcp(1.0 + b_e, INTERPRET)
    b_c = tl.where(b_z >= 0.0, 1.0, 0.0) + b_ny  # exact for y = 1
    # −r where z ≥ 0 (z is never −0: b2 is not), else r: one bit operation
    b_sr = b_r.to(tl.int32, bitcast=True) ^ (~b_z.to(tl.int32, bitcast=True) & -0x80000000)
    b_sr = b_sr.to(tl.float32, bitcast=True)
    return b_c + b_sr, b_r, b_c  # (1 − y) − r or r − y, rounded once


@triton.jit
def _row_label(idx_ptr, y_ptr, o_m64, m_m, c, stride_im, stride_ik, stride_ym, stride_yn, col0, N, b2):
    """Sparse label column c of each row: (its column in this launch, −1 if none or not in 0..N−1;
    −y; the bias, EXCLUDED for a negative label)."""
    b_idx = tl.load(idx_ptr + o_m64 * stride_im + c * stride_ik, mask=m_m, other=-1) - col0  # [BLOCK_M]
    b_lab = tl.load(y_ptr + o_m64 * stride_ym + c * stride_yn, mask=m_m, other=0.0).to(tl.float32)
    b_col = tl.where((b_idx >= 0) & (b_idx < N), b_idx, -1).to(tl.int32)
    return b_col, tl.minimum(-b_lab, 0.0), tl.where(b_lab >= 0.0, b2, EXCLUDED)


@triton.jit
def _place(b_ny, b_b, b_at, b_here, b_nly, b_lb, INTERPRET: tl.constexpr):
    """The (−y, bias) tiles with one label per row placed where its column b_at equals b_here (shapes
    that broadcast to the tile's): one compare and two selects per pair, in PTX on the GPU (see 3.)."""
    if INTERPRET:
        hit = b_at == b_here
        ny, b = tl.where(hit, b_nly, b_ny), tl.where(hit, b_lb, b_b)
    else:
        ny, b = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.eq.s32 p, $2, $3; selp.f32 $0, $4, $5, p; selp.f32 $1, $6, $7, p; }",
            "=f,=f,r,r,f,f,f,f", [b_at, b_here, b_nly, b_ny, b_lb, b_b],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    return ny, b


@triton.jit
def _masked(b_b, b_ny, b_s, b_thr, INTERPRET: tl.constexpr):
    """The bias tile with the false negatives excluded: −y = 0 (y = 0; an excluded pair has −y = 0
    too and keeps its bias) and S above the row's threshold (see 3.). On the GPU two compares and a
    select in PTX: as tl.where of a boolean and, the sm_90 forward kernel took 189 registers, not 128."""
    if INTERPRET:
        b = tl.where((b_ny == 0.0) & (b_s > b_thr), EXCLUDED, b_b)
    else:
        b = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.eq.f32 p, $2, 0f00000000; setp.gt.and.f32 p, $3, $4, p; "
            "selp.f32 $0, 0fF149F2CA, $1, p; }",  # 0fF149F2CA: −1e30, EXCLUDED
            "=f,f,f,f,f", [b_b, b_ny, b_s, b_thr], dtype=tl.float32, is_pure=True, pack=1)
    return b


@triton.jit
def pair_tile_kernel(
    q_desc, d_desc, g_desc,  # q (M, D), d (N, D), G (M, N) workspace
    scale_ptr, bias_ptr, w_ptr, thr_ptr,  # t and b 0-dim, w (M,), false-negative thresholds (M,)
    y_ptr, idx_ptr,  # labels: dense (M, N), or (M, K) labels with (M, K) int64 document indices
    rows_ptr, stats_ptr,  # rows (SPLIT_N, M) f32, stats (programs, 2) f32
    M, N, D, K, col0, stride_ym, stride_yn, stride_im, stride_ik, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WRITE_G: tl.constexpr, HAS_W: tl.constexpr, DENSE_Y: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, MANY_LABELS: tl.constexpr,
    RAGGED_N: tl.constexpr, HAS_THR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    off_m = pid_m * BLOCK_M
    o_m = off_m + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_m64 = o_m.to(tl.int64)  # row × stride of a dense label matrix can pass 2³¹
    cols = tl.arange(0, BLOCK_N)
    SHORT: tl.constexpr = q_desc.dtype != tl.float32  # 16-bit inputs: shorter log1p polynomials (see 4.)
    # z·log2(e) = S·t2 + b2: the epilogue works in base 2 and the row sums are scaled by ln 2 once
    t2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    b2 = tl.load(bias_ptr).to(tl.float32) * LOG2E + 0.0  # + 0.0: a bias of −0 becomes +0, so z is never −0
    b_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_gs = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_tiles = tl.cdiv(N, BLOCK_N)
    if RAGGED_N:  # only the last column tile has columns past N: their bias excludes them (S is 0 there)
        b_last = tl.where(cols < N - (n_tiles - 1) * BLOCK_N, b2, EXCLUDED)  # [BLOCK_N]
    if not DENSE_Y and not MANY_LABELS:
        b_col1, b_nly1, b_lb1 = _row_label(idx_ptr, y_ptr, o_m64, m_m, 0, stride_im, stride_ik, stride_ym, stride_yn,
                                          col0, N, b2)
    if HAS_THR:
        b_thr = tl.load(thr_ptr + o_m, mask=m_m, other=float("inf"))[:, None]
    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, n_tiles)
    for tile in range(first, last):
        off_n = tile * BLOCK_N
        b_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            b_q = q_desc.load([off_m, k])  # [BLOCK_M, BLOCK_K]
            b_d = d_desc.load([off_n, k])  # [BLOCK_N, BLOCK_K]
            if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton #11584)
                b_q = b_q.to(tl.float32)
                b_d = b_d.to(tl.float32)
            b_s = tl.dot(b_q, b_d.T, b_s, input_precision=INPUT_PRECISION)
        if DENSE_Y:
            p_y = y_ptr + o_m64[:, None] * stride_ym + (off_n + cols)[None, :] * stride_yn
            b_y = tl.load(p_y, mask=m_m[:, None] & (off_n + cols < N)[None, :], other=-1.0).to(tl.float32)
            b_b = tl.where(b_y >= 0.0, b2, EXCLUDED)  # y < 0 excludes the pair (−inf too)
            b_ny = tl.minimum(-b_y, 0.0)
        else:
            if RAGGED_N:
                b_cb = tl.where(tile == n_tiles - 1, b_last, b2)[None, :]
            else:  # N a multiple of BLOCK_N (every full-size panel): no column is past N
                b_cb = b2
            if MANY_LABELS:  # a loop carrying the (y, bias) tiles: Triton keeps them out of the MMA layout
                b_ny = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                b_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) + b_cb
                for c in range(0, K):
                    b_col, b_nly, b_lb = _row_label(idx_ptr, y_ptr, o_m64, m_m, c, stride_im, stride_ik,
                                                   stride_ym, stride_yn, col0, N, b2)
                    b_ny, b_b = _place(b_ny, b_b, (b_col - off_n)[:, None], cols[None, :], b_nly[:, None],
                                       b_lb[:, None], INTERPRET)
            else:  # one label per row (the diagonal forms), read once per program: nothing carried
                b_ny, b_b = _place(0.0, b_cb, (b_col1 - off_n)[:, None], cols[None, :], b_nly1[:, None],
                                   b_lb1[:, None], INTERPRET)
        if HAS_THR:
            b_b = _masked(b_b, b_ny, b_s, b_thr, INTERPRET)
        b_z = b_s * t2 + b_b
        b_e = _exp2_neg_abs(b_z, INTERPRET)  # e = exp(−|z|) ∈ [0, 1]
        if WRITE_G:
            b_gr, b_r, b_c = _gradient(b_z, b_e, b_ny, INTERPRET)
            # (1 − y)·max(z, 0) + y·max(−z, 0) + log1p(e): two terms ≥ 0
            b_rows += tl.sum(tl.fma(b_r, _log2_1p_over_r(b_e, SHORT), b_z * b_c), 1)
            b_gs += tl.sum(b_gr * b_s, 1)
            b_g += tl.sum(b_gr, 1)
            g_desc.store([off_m, off_n], b_gr.to(g_desc.dtype))
        else:
            b_m = tl.fma(b_ny, b_z, tl.maximum(b_z, 0.0))  # the same z·c, rounded once
            b_rows += tl.sum(tl.fma(b_e, _log2_1p_over(b_e, SHORT), b_m), 1)
    tl.store(rows_ptr + pid_s * M + o_m, b_rows * LN2, mask=m_m)
    if WRITE_G:
        b_g = tl.where(m_m, b_g, 0.0)  # rows past M saw S = 0, not nothing (their G·S is 0 already)
        if HAS_W:  # per-row weights apply to the row sums only: G itself stays σ − y (see prcl/backends/panels.py)
            b_w = tl.load(w_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)
            b_gs = b_gs * b_w
            b_g = b_g * b_w
        pid = pid_s * tl.num_programs(0) + pid_m
        tl.store(stats_ptr + 2 * pid, tl.sum(b_gs, 0))
        tl.store(stats_ptr + 2 * pid + 1, tl.sum(b_g, 0))


@triton.jit
def pair_pass_kernel(
    own_desc, str_desc,  # owned rows (O, D), streamed rows (S, D): q, d in the row pass; d, q in the column pass
    scale_ptr, bias_ptr, w_ptr, thr_ptr,  # t and b 0-dim, w (M,) and false-negative thresholds (M,) of the queries
    y_ptr, idx_ptr,  # labels as pair_tile_kernel's, always (query, document)-indexed
    rows_ptr, stats_ptr, acc_ptr,  # row pass: rows (SPLIT, O), stats (programs, 2); acc (SPLIT, O, D), all f32
    O, S, D, K, stride_ym, stride_yn, stride_im, stride_ik, tiles_per_split,
    BLOCK_O: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ROW_PASS: tl.constexpr,
    HAS_W: tl.constexpr, DENSE_Y: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, MANY_LABELS: tl.constexpr, RAGGED_S: tl.constexpr, HAS_THR: tl.constexpr,
):
    """One pass of the two-pass gradient (D ≤ BLOCK_D ≤ 256, docs/design.md "Two-pass gradient"): a
    program owns BLOCK_O rows and a split of the streamed tiles; per tile it computes S (queries ×
    documents in the row pass, documents × queries in the column pass), G as pair_tile_kernel does
    (rounded once to the inputs' dtype), and accumulates G·streamed rows in float32 registers. The row
    pass also sums the loss rows, Σ w·G∘S and Σ w·G; the column pass weights the streamed queries by w
    (rounded to their dtype, as prcl.backends.panels does), the row pass its own rows' G·d. Rows or columns past
    the edges are zero-filled by the descriptors: their products add 0."""
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    off_o = pid_o * BLOCK_O
    o_o = off_o + tl.arange(0, BLOCK_O)
    m_o = o_o < O
    o_o64 = o_o.to(tl.int64)
    cols = tl.arange(0, BLOCK_S)
    SHORT: tl.constexpr = own_desc.dtype != tl.float32
    t2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    b2 = tl.load(bias_ptr).to(tl.float32) * LOG2E + 0.0
    b_own = own_desc.load([off_o, 0])  # [BLOCK_O, BLOCK_D], the whole of D
    if UPCAST:
        b_own = b_own.to(tl.float32)
    b_acc = tl.zeros([BLOCK_O, BLOCK_D], dtype=tl.float32)
    n_tiles = tl.cdiv(S, BLOCK_S)
    if ROW_PASS:
        b_rows = tl.zeros([BLOCK_O], dtype=tl.float32)
        b_gs = tl.zeros([BLOCK_O], dtype=tl.float32)
        b_g = tl.zeros([BLOCK_O], dtype=tl.float32)
        if RAGGED_S:
            b_last = tl.where(cols < S - (n_tiles - 1) * BLOCK_S, b2, EXCLUDED)
        if not DENSE_Y and not MANY_LABELS:
            b_col1, b_nly1, b_lb1 = _row_label(idx_ptr, y_ptr, o_o64, m_o, 0, stride_im, stride_ik, stride_ym,
                                              stride_yn, 0, S, b2)
        if HAS_THR:
            b_thr = tl.load(thr_ptr + o_o, mask=m_o, other=float("inf"))[:, None]
    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, n_tiles)
    for tile in range(first, last):
        off_s = tile * BLOCK_S
        o_s = off_s + cols
        m_s = o_s < S
        b_str = str_desc.load([off_s, 0])  # [BLOCK_S, BLOCK_D]
        if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton #11584)
            b_str = b_str.to(tl.float32)
        b_s = tl.dot(b_own, b_str.T, input_precision=INPUT_PRECISION)  # [BLOCK_O, BLOCK_S]
        if DENSE_Y:
            if ROW_PASS:
                p_y = y_ptr + o_o64[:, None] * stride_ym + o_s[None, :] * stride_yn
            else:
                p_y = y_ptr + o_s.to(tl.int64)[None, :] * stride_ym + o_o64[:, None] * stride_yn
            b_y = tl.load(p_y, mask=m_o[:, None] & m_s[None, :], other=-1.0).to(tl.float32)
            b_b = tl.where(b_y >= 0.0, b2, EXCLUDED)
            b_ny = tl.minimum(-b_y, 0.0)
        elif ROW_PASS:  # the owned queries' labels, placed in the streamed documents' columns
            if RAGGED_S:
                b_cb = tl.where(tile == n_tiles - 1, b_last, b2)[None, :]
            else:
                b_cb = b2
            if MANY_LABELS:
                b_ny = tl.zeros([BLOCK_O, BLOCK_S], dtype=tl.float32)
                b_b = tl.zeros([BLOCK_O, BLOCK_S], dtype=tl.float32) + b_cb
                for c in range(0, K):
                    b_col, b_nly, b_lb = _row_label(idx_ptr, y_ptr, o_o64, m_o, c, stride_im, stride_ik,
                                                   stride_ym, stride_yn, 0, S, b2)
                    b_ny, b_b = _place(b_ny, b_b, (b_col - off_s)[:, None], cols[None, :], b_nly[:, None],
                                       b_lb[:, None], INTERPRET)
            else:
                b_ny, b_b = _place(0.0, b_cb, (b_col1 - off_s)[:, None], cols[None, :], b_nly1[:, None],
                                   b_lb1[:, None], INTERPRET)
        else:  # the streamed queries' labels, placed in the owned documents' rows
            o_s64 = o_s.to(tl.int64)
            here = tl.arange(0, BLOCK_O)[:, None]
            if MANY_LABELS:
                b_ny = tl.zeros([BLOCK_O, BLOCK_S], dtype=tl.float32)
                b_b = tl.zeros([BLOCK_O, BLOCK_S], dtype=tl.float32) + b2
                for c in range(0, K):
                    b_col, b_nly, b_lb = _row_label(idx_ptr, y_ptr, o_s64, m_s, c, stride_im, stride_ik,
                                                   stride_ym, stride_yn, 0, O, b2)
                    b_ny, b_b = _place(b_ny, b_b, (b_col - off_o)[None, :], here, b_nly[None, :], b_lb[None, :],
                                       INTERPRET)
            else:
                b_col, b_nly, b_lb = _row_label(idx_ptr, y_ptr, o_s64, m_s, 0, stride_im, stride_ik, stride_ym,
                                               stride_yn, 0, O, b2)
                b_ny, b_b = _place(0.0, b2, (b_col - off_o)[None, :], here, b_nly[None, :], b_lb[None, :],
                                   INTERPRET)
        if HAS_THR:
            if not ROW_PASS:  # the streamed queries' thresholds
                b_thr = tl.load(thr_ptr + o_s, mask=m_s, other=float("inf"))[None, :]
            b_b = _masked(b_b, b_ny, b_s, b_thr, INTERPRET)
        b_z = b_s * t2 + b_b
        b_e = _exp2_neg_abs(b_z, INTERPRET)
        b_gr, b_r, b_c = _gradient(b_z, b_e, b_ny, INTERPRET)
        if ROW_PASS:
            b_rows += tl.sum(tl.fma(b_r, _log2_1p_over_r(b_e, SHORT), b_z * b_c), 1)
            b_gs += tl.sum(b_gr * b_s, 1)
            b_g += tl.sum(b_gr, 1)
        b_g16 = b_gr.to(own_desc.dtype)  # G rounded once to the inputs' dtype, as the panel design stores it
        if UPCAST:
            b_g16 = b_g16.to(tl.float32)
        if HAS_W and not ROW_PASS:
            b_w = tl.load(w_ptr + o_s, mask=m_s, other=0.0).to(tl.float32)
            b_str = (b_str.to(tl.float32) * b_w[:, None]).to(str_desc.dtype)
            if UPCAST:
                b_str = b_str.to(tl.float32)
        b_acc = tl.dot(b_g16, b_str, b_acc, input_precision=INPUT_PRECISION)
    if ROW_PASS and HAS_W:  # dq = t·W·G·d: the weights on the thin side (see prcl/backends/panels.py)
        b_w = tl.load(w_ptr + o_o, mask=m_o, other=0.0).to(tl.float32)
        b_acc = b_acc * b_w[:, None]
        b_gs = b_gs * b_w
        b_g = b_g * b_w
    o_d = tl.arange(0, BLOCK_D)
    tl.store(acc_ptr + (pid_s * O + o_o64)[:, None] * D + o_d[None, :], b_acc, mask=m_o[:, None] & (o_d < D)[None, :])
    if ROW_PASS:
        tl.store(rows_ptr + pid_s * O + o_o, b_rows * LN2, mask=m_o)
        pid = pid_s * tl.num_programs(0) + pid_o
        tl.store(stats_ptr + 2 * pid, tl.sum(b_gs, 0))
        tl.store(stats_ptr + 2 * pid + 1, tl.sum(tl.where(m_o, b_g, 0.0), 0))  # rows past O saw S = 0
