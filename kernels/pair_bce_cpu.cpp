// The native CPU kernel of prcl's loss (docs/design.md), without allocating q @ d.T:
//
//     rows_i = Σ_j l_ij,   l = softplus(z) − y·z,   z = t·q·dᵀ + b,   pairs with y < 0 excluded
//     G_ij = w_i·(σ(z_ij) − y_ij):   c·G·d (B, D),   c·Gᵀ·q (N, D),   Σ G∘S,   Σ G      (w = None means 1)
//
// the pieces of prcl/backends/panels.py, with the gradients times c = grad_scale (t times the reduction's
// weight, from prcl/core/ops.py; 1 when absent). Labels come in the ops' layout (prcl/core/ops.py): a dense
// (B, N) matrix, or K (index, label) columns per row. Float32 arithmetic: bf16/fp16 rows are converted
// tile by tile into float32 buffers, never a float32 copy of q or d, and with `rounded` the gradients
// leave in the inputs' dtype, rounded once; without it, in float32 (the ring strategy sums them).
//
// 1. The pair matrix is cut into tiles of TM query rows × TN document columns. A tile's similarity
//    block S = q_P·d_jᵀ comes from the BLAS GEMM behind at::mm_out (MKL in the torch wheels), written
//    into a per-thread float32 buffer of TM×TN: workspace is tiles × busy threads, never B×N.
// 2. One pass over the tile does the special functions, with the tile row's labels beside it (a row
//    of the dense matrix, or a zeroed scratch row where the sparse columns are set and reset);
//    e = exp(−|z|) serves everything; with r = e/(1 + e) = σ(−|z|):
//        l = (1 − y)·max(z, 0) + y·max(−z, 0) + log1p(e)       (no cancellation of y·z)
//        G = (1 − y) − r  if z ≥ 0  else  r − y                 (σ − y without forming σ ≈ 1)
//    A pair with y = 0 and S above the row's false-negative threshold (prcl/core/loss.py; +inf without
//    one) is excluded like y < 0: one more compare per pair.
//    It is plain C++ the compiler vectorises, compiled three times (AVX-512, AVX2+FMA, baseline
//    x86-64) and picked at load time from cpuid, so the library stays safe to move between machines.
// 3. G overwrites S in place and feeds two more GEMMs: Gᵀ·q_P accumulates into the tile's rows of
//    Gᵀ·q, G·d_j into a partial of G·d for the row tile.
// 4. Ownership, never atomics, and results that do not depend on the thread count (up to kChunks
//    threads): the document tiles are dealt into a fixed number of contiguous chunks, a function of
//    N alone. Row tiles run one after another; inside one, threads take whole chunks. A chunk owns
//    its rows of Gᵀ·q (each summed over row tiles in order) and its own partial of G·d, of the row
//    sums and of Σ G∘S, Σ G; the partials are added in chunk order. Which thread ran a chunk
//    changes nothing. The forward-only pass works the same way, without the gradients.
// 5. The gradients are multiplied by c and rounded to the output dtype once, from float32: G·d per row
//    tile, after its chunk partials are added; Gᵀ·q per column tile when B fits one row tile, else
//    from one float32 N×D accumulator (for float32 output, the output itself). So the workspace
//    beyond the outputs is tiles, TM·D floats per chunk and, past one row tile with 16-bit inputs,
//    that accumulator.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace prcl_native {
namespace {

// ---------------------------------------------------------------------------------------------
// Tile configuration (the one place for it), measured on a 2-core Xeon (AVX-512, MKL) in CPU time
// of loss_grads at B = N = 4096 and 8192: TM is the K of the Gᵀ·q GEMM and sets how often a
// column tile's rows of Gᵀ·q travel through cache, so tall tiles pay most at small D (D = 32, 8192²:
// TM 256 → 768 took 497 → 250 ms); at D ≥ 256 every shape tried was within 10% of three
// whole-matrix GEMMs. TM = 1024 was as fast but made MKL block that K differently on one thread
// than inside a parallel region, so 1 and 2 threads disagreed in the last bits of Gᵀ·q.
// PRCL_NATIVE_TILES="TM,TN[,TN_MIN]" overrides the shape, for tuning.
constexpr int64_t kTileM = 768;      // query rows per tile
constexpr int64_t kTileN = 256;      // document columns per tile, at most, at small D
// Narrower tiles for small N, so that every thread finds work, but not too narrow at large D: each
// chunk writes a TM×D partial of G·d whose K is its column count. Measured in CPU time at D = 768:
// B = N = 1024, minimum width 64 (8 chunks of 128 columns) 38 ms, 512 (2 chunks) 33 ms, three
// whole-matrix GEMMs 30 ms; at 4096², 256- vs 512-wide tiles 588 vs 561 ms (GEMMs: 594).
constexpr int64_t kMinTileN = 64;
int64_t min_tile_n(int64_t D) { return std::min<int64_t>(512, std::max<int64_t>(kMinTileN, 2 * D / 3)); }
// Document tiles are dealt into this many chunks (fewer when N is small). Results do not depend on
// the thread count as long as it is ≤ kChunks; more threads get one chunk each (chunks = threads),
// and then the grouping of the partial sums, hence the last bits, follows the thread count.
// Workspace: chunks·TM·D floats of G·d partials plus threads·TM·TN floats of S tiles (threads ≤
// chunks), and for 16-bit inputs TM·D + threads·TN·D floats of converted rows.
constexpr int64_t kChunks = 8;

// Threads that find work among `items` independent items.
int64_t busy_threads(int64_t items) { return std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads())); }

struct Plan {
  int64_t tm, tn;      // tile shape
  int64_t col_tiles;   // ceil(N / tn)
  int64_t chunks;      // contiguous groups of column tiles; depends on N (and on threads > kChunks)
  int64_t tile_begin(int64_t c) const { return c * col_tiles / chunks; }
};

Plan make_plan(int64_t B, int64_t N, int64_t D) {
  int64_t tm = kTileM, tn_min = min_tile_n(D), tn_max = std::max(kTileN, tn_min);
  if (const char* env = std::getenv("PRCL_NATIVE_TILES")) {  // "TM,TN" or "TM,TN,TN_MIN"
    long m = 0, n = 0, n_min = 0;
    const int got = std::sscanf(env, "%ld,%ld,%ld", &m, &n, &n_min);
    if (got >= 2 && m > 0 && n > 0) {
      tm = m;
      tn_max = n;
      tn_min = got == 3 && n_min > 0 ? n_min : std::min(tn_min, tn_max);
    }
  }
  const int64_t chunks = std::max<int64_t>(kChunks, at::get_num_threads());
  Plan p;
  p.tm = std::min(B, tm);
  p.tn = std::min(N, std::min(tn_max, std::max(tn_min, (N + chunks - 1) / chunks)));
  p.col_tiles = (N + p.tn - 1) / p.tn;
  p.chunks = std::min(p.col_tiles, chunks);
  return p;
}

// ---------------------------------------------------------------------------------------------
// Special functions, branch-free so that the loops below vectorise.

#define PRCL_INLINE inline __attribute__((always_inline))

// exp(x) for x ≤ 0. exp(x) = 2^n·exp(r) with n = round(x/ln 2) and r = x − n·ln 2, |r| ≤ ln2/2;
// ln 2 is split in a part with 8 trailing zero bits (n·LN2_HI is exact for |n| < 2^8) and the
// remainder (Cody–Waite), so r keeps its digits. exp(r) by its Taylor polynomial to degree 7: the
// truncation r⁸/8! < 5.3e-9 relative, below float32's 6e-8. Below −87, 2^n leaves the normal range:
// return 0 (σ and log1p there are < 2e-38; eager gives subnormals, no test can tell).
PRCL_INLINE float exp_nonpos(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.42860682030941723212e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding and subtracting it rounds to an integer
  const float xc = x < -87.0f ? -87.0f : x;
  const float nf = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - nf * kLn2Hi) - nf * kLn2Lo;
  float p = 1.0f / 5040 + r * (1.0f / 40320);
  p = 1.0f / 720 + r * p;
  p = 1.0f / 120 + r * p;
  p = 1.0f / 24 + r * p;
  p = 1.0f / 6 + r * p;
  p = 0.5f + r * p;
  p = 1.0f + r * p;
  p = 1.0f + r * p;
  const int32_t bits = (static_cast<int32_t>(nf) + 127) << 23;  // 2^n, n ∈ [−126, 0]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.0f ? 0.0f : p * two_n;
}

// log1p(e) for e ∈ [0, 1]. log1p(e) = 2·atanh(s) with s = e/(2+e) ∈ [0, 1/3], and
// 2·atanh(s) = 2s·(1 + s²/3 + s⁴/5 + … + s¹²/13) + O(s¹⁵/15): truncation < 1.4e-8 relative. Unlike
// log(1 + e) it keeps full relative precision for tiny e — the softplus of the many far negatives.
PRCL_INLINE float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float p = 1.0f / 11 + s2 * (1.0f / 13);
  p = 1.0f / 9 + s2 * p;
  p = 1.0f / 7 + s2 * p;
  p = 1.0f / 5 + s2 * p;
  p = 1.0f / 3 + s2 * p;
  p = 1.0f + s2 * p;
  return 2.0f * s * p;
}

// Σ_c l_c over one row of a tile, with labels y_c (y < 0: excluded pair; y = 0 and s > thr too).
PRCL_INLINE float loss_row_body(const float* __restrict s, const float* __restrict y, int64_t n, float t,
                                float b, float thr) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) {
    const float z = t * s[c] + b;
    const bool keep = y[c] >= 0.0f && !(y[c] == 0.0f && s[c] > thr);
    const float yc = keep ? y[c] : 0.0f;  // −inf labels must not reach a product
    const float e = exp_nonpos(-std::fabs(z));
    const float l = (1.0f - yc) * (z > 0.0f ? z : 0.0f) + yc * (z < 0.0f ? -z : 0.0f) + log1p_unit(e);
    acc += keep ? l : 0.0f;
  }
  return acc;
}

// One row of a tile: s_c ← G_c = w·(σ(z_c) − y_c) in place; returns Σ l_c, adds Σ G∘S, Σ G to sums.
PRCL_INLINE float loss_grad_row_body(float* __restrict s, const float* __restrict y, int64_t n, float t,
                                     float b, float thr, float w, float* __restrict sums) {
  float acc = 0.0f, acc_gs = 0.0f, acc_g = 0.0f;
#pragma omp simd reduction(+ : acc, acc_gs, acc_g)
  for (int64_t c = 0; c < n; ++c) {
    const float sv = s[c];
    const float z = t * sv + b;
    const bool keep = y[c] >= 0.0f && !(y[c] == 0.0f && sv > thr);
    const float yc = keep ? y[c] : 0.0f;
    const float e = exp_nonpos(-std::fabs(z));
    const float r = e / (1.0f + e);
    const float l = (1.0f - yc) * (z > 0.0f ? z : 0.0f) + yc * (z < 0.0f ? -z : 0.0f) + log1p_unit(e);
    const float g = keep ? w * (z >= 0.0f ? (1.0f - yc) - r : r - yc) : 0.0f;
    acc += keep ? l : 0.0f;
    acc_gs += g * sv;
    acc_g += g;
    s[c] = g;
  }
  sums[0] += acc_gs;
  sums[1] += acc_g;
  return acc;
}

using RowFn = float (*)(const float*, const float*, int64_t, float, float, float);
using GradRowFn = float (*)(float*, const float*, int64_t, float, float, float, float, float*);

#define PRCL_DEFINE_EPILOGUE(SUFFIX, ATTR)                                                         \
  ATTR float loss_row_##SUFFIX(const float* s, const float* y, int64_t n, float t, float b,        \
                               float thr) {                                                        \
    return loss_row_body(s, y, n, t, b, thr);                                                      \
  }                                                                                                \
  ATTR float loss_grad_row_##SUFFIX(float* s, const float* y, int64_t n, float t, float b,         \
                                    float thr, float w, float* sums) {                             \
    return loss_grad_row_body(s, y, n, t, b, thr, w, sums);                                        \
  }

PRCL_DEFINE_EPILOGUE(base, )

// Runtime ISA dispatch: at::vec's wide types exist only inside ATen's own per-ISA builds, so an
// extension compiled for generic x86-64 would get its scalar fallback. Compile the epilogue per ISA.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PRCL_HAVE_ISA_DISPATCH 1
PRCL_DEFINE_EPILOGUE(avx2, __attribute__((target("avx2,fma"))))
PRCL_DEFINE_EPILOGUE(avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,"
                                                   "prefer-vector-width=512"))))
#endif

struct Epilogue {
  RowFn row;
  GradRowFn grad_row;
  const char* isa;
};

Epilogue pick_epilogue() {
  std::string want;
  if (const char* env = std::getenv("PRCL_NATIVE_ISA")) want = env;  // "avx512", "avx2", "base"
#ifdef PRCL_HAVE_ISA_DISPATCH
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && (want.empty() || want == "avx512"))
    return {loss_row_avx512, loss_grad_row_avx512, "avx512"};
  if (avx2 && (want.empty() || want == "avx512" || want == "avx2"))
    return {loss_row_avx2, loss_grad_row_avx2, "avx2"};
#endif
  return {loss_row_base, loss_grad_row_base, "base"};
}

const Epilogue& epilogue() {
  static const Epilogue e = pick_epilogue();
  return e;
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.

void check_inputs(const at::Tensor& q, const at::Tensor& d, const at::Tensor& scale,
                  const at::Tensor& bias) {
  TORCH_CHECK(q.dim() == 2 && d.dim() == 2 && q.size(1) == d.size(1),
              "prcl native: q (B, D) and d (N, D) must be 2-D with the same D, got q", q.sizes(),
              " and d", d.sizes());
  TORCH_CHECK(q.is_cpu() && d.is_cpu() && scale.is_cpu() && bias.is_cpu(),
              "prcl native: q, d, scale and bias must be CPU tensors");
  TORCH_CHECK(q.is_floating_point() && q.scalar_type() == d.scalar_type(),
              "prcl native: q and d must be floating point of one dtype, got ", q.scalar_type(), " and ",
              d.scalar_type());
  TORCH_CHECK(scale.numel() == 1 && bias.numel() == 1,
              "prcl native: scale and bias must hold one value each");
}

// The kernel sits below autograd: detached rows in their own dtype, copied only when not contiguous.
at::Tensor rows_of(const at::Tensor& x) { return x.detach().contiguous(); }

// A (rows × cols) float32 matrix over a raw buffer.
at::Tensor tile_view(float* p, int64_t rows, int64_t cols) {
  return at::from_blob(p, {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// Rows [r0, r0 + n) of x as float32: a view of x when it is float32, else converted into buf.
at::Tensor fp32_block(const at::Tensor& x, int64_t r0, int64_t n, float* buf) {
  const at::Tensor rows = x.narrow(0, r0, n);
  if (x.scalar_type() == at::kFloat) return rows;
  return tile_view(buf, n, x.size(1)).copy_(rows);
}

// Per busy thread: one S tile (TM×TN float32, uninitialised), one row of TN zeroed label scratch,
// and, for inputs that are not float32, TN×D floats for a converted document tile.
struct Workspace {
  int64_t threads, s_floats, d_offset, per;
  std::unique_ptr<float[]> buf;

  Workspace(const Plan& p, int64_t D, bool convert)
      : threads(busy_threads(p.chunks)), s_floats(p.tm * p.tn), d_offset(s_floats + p.tn),
        per(d_offset + (convert ? p.tn * D : 0)), buf(new float[threads * per]) {
    for (int64_t i = 0; i < threads; ++i) std::fill_n(buf.get() + i * per + s_floats, p.tn, 0.0f);
  }
};

// The labels in the ops' layout: dense (B, N), or K (index, label) columns per row (index: int64,
// outside [0, N) lists nothing). row() hands the epilogue a tile row's labels: a row of the dense
// matrix, or the thread's zeroed scratch with the row's listed pairs set; clear() zeroes them again.
struct Labels {
  at::Tensor y, idx;  // float32 contiguous; idx undefined for dense labels
  int64_t N, K;

  Labels(const at::Tensor& labels, const c10::optional<at::Tensor>& index, int64_t B, int64_t N_)
      : y(labels.detach().to(at::kFloat).contiguous()), N(N_), K(0) {
    if (index.has_value()) {
      idx = index->detach().contiguous();
      K = idx.size(1);
      TORCH_CHECK(idx.scalar_type() == at::kLong && y.sizes() == idx.sizes() && y.size(0) == B,
                  "prcl native: labels and label_index must both be (B, K) with int64 indices, got ",
                  y.sizes(), " and ", idx.sizes());
    } else {
      TORCH_CHECK(y.dim() == 2 && y.size(0) == B && y.size(1) == N,
                  "prcl native: dense labels must be (B, N) = (", B, ", ", N, "), got ", y.sizes());
    }
  }

  const float* row(int64_t i, int64_t j0, int64_t nt, float* scratch) const {
    if (!idx.defined()) return y.data_ptr<float>() + i * N + j0;
    for_listed(i, j0, nt, [&](int64_t c, float v) { scratch[c] = v; });
    return scratch;
  }

  void clear(int64_t i, int64_t j0, int64_t nt, float* scratch) const {
    if (idx.defined()) for_listed(i, j0, nt, [&](int64_t c, float) { scratch[c] = 0.0f; });
  }

  template <typename F>
  void for_listed(int64_t i, int64_t j0, int64_t nt, const F& f) const {
    const int64_t* ix = idx.data_ptr<int64_t>() + i * K;
    const float* yv = y.data_ptr<float>() + i * K;
    for (int64_t k = 0; k < K; ++k)
      if (ix[k] >= j0 && ix[k] < j0 + nt) f(ix[k] - j0, yv[k]);
  }
};

// The per-row false-negative thresholds (B,) as float32, or none: every row's is +inf.
struct Thresholds {
  at::Tensor v;
  Thresholds(const c10::optional<at::Tensor>& threshold, int64_t B) {
    if (!threshold.has_value()) return;
    v = threshold->detach().to(at::kFloat).contiguous();
    TORCH_CHECK(v.dim() == 1 && v.size(0) == B, "prcl native: threshold must be (B,) = (", B, ",), got ",
                v.sizes());
  }
  float operator[](int64_t i) const { return v.defined() ? v.data_ptr<float>()[i] : INFINITY; }
};

// Runs work(item, thread's workspace) for item in [0, n ≤ chunks) on the intra-op threads, each thread
// taking the next free item, where at::parallel_for alone would hand each a fixed share: on a shared
// machine (this one ran at load 3–4 on 2 cores) a thread that loses its core would leave its share for
// the others to wait on. Who runs an item cannot change a result: every item writes only what it owns.
template <typename Work>
void for_each_item(int64_t n, Workspace& ws, const Work& work) {
  const int64_t threads = busy_threads(n);
  TORCH_INTERNAL_ASSERT(threads <= ws.threads);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // TLS: not inherited by worker threads
    float* w = ws.buf.get() + at::get_thread_num() * ws.per;
    for (int64_t item = next.fetch_add(1); item < n; item = next.fetch_add(1)) work(item, w);
  });
}

// ---------------------------------------------------------------------------------------------
// rows_i = Σ_j l_ij. Row tiles run one after another; inside one, each chunk writes its own partial
// row sums, added in chunk order afterwards.
at::Tensor loss_rows(const at::Tensor& q_in, const at::Tensor& d_in, const at::Tensor& scale,
                     const at::Tensor& bias, const at::Tensor& labels,
                     const c10::optional<at::Tensor>& label_index,
                     const c10::optional<at::Tensor>& threshold) {
  check_inputs(q_in, d_in, scale, bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor q = rows_of(q_in), d = rows_of(d_in);
  const int64_t B = q.size(0), N = d.size(0), D = q.size(1);
  const float t = scale.item<float>(), b = bias.item<float>();
  at::Tensor out = at::zeros({B}, q.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return out;
  const Labels Y(labels, label_index, B, N);
  const Thresholds thr(threshold, B);
  const Plan p = make_plan(B, N, D);
  const Epilogue& ep = epilogue();
  const bool convert = q.scalar_type() != at::kFloat;
  Workspace ws(p, D, convert);
  std::unique_ptr<float[]> q_buf(new float[convert ? p.tm * D : 0]);

  std::vector<double> partial(static_cast<size_t>(p.chunks * p.tm));  // [chunk][row of the tile]
  float* o = out.data_ptr<float>();
  for (int64_t i0 = 0; i0 < B; i0 += p.tm) {
    const int64_t mt = std::min(p.tm, B - i0);
    const at::Tensor q_i = fp32_block(q, i0, mt, q_buf.get());
    std::fill(partial.begin(), partial.end(), 0.0);
    for_each_item(p.chunks, ws, [&](int64_t c, float* w) {
      double* rows = partial.data() + c * p.tm;
      for (int64_t tile = p.tile_begin(c); tile < p.tile_begin(c + 1); ++tile) {
        const int64_t j0 = tile * p.tn, nt = std::min(p.tn, N - j0);
        at::Tensor s = tile_view(w, mt, nt);
        at::mm_out(s, q_i, fp32_block(d, j0, nt, w + ws.d_offset).t());  // S = q_i·d_jᵀ  (mt, nt)
        float* scratch = w + ws.s_floats;
        for (int64_t r = 0; r < mt; ++r) {
          rows[r] += ep.row(w + r * nt, Y.row(i0 + r, j0, nt, scratch), nt, t, b, thr[i0 + r]);
          Y.clear(i0 + r, j0, nt, scratch);
        }
      }
    });
    for (int64_t r = 0; r < mt; ++r) {
      double acc = 0.0;
      for (int64_t c = 0; c < p.chunks; ++c) acc += partial[c * p.tm + r];
      o[i0 + r] = static_cast<float>(acc);
    }
  }
  return out;
}

// Row sums, grad_scale·G·d, grad_scale·Gᵀ·q, Σ G∘S and Σ G of Σ_i w_i Σ_j l_ij (prcl/backends/panels.py's
// pieces, scaled): the two gradients in the inputs' dtypes when `rounded`, else float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_grads(
    const at::Tensor& q_in, const at::Tensor& d_in, const at::Tensor& scale, const at::Tensor& bias,
    const at::Tensor& labels, const c10::optional<at::Tensor>& label_index,
    const c10::optional<at::Tensor>& w_in, const c10::optional<at::Tensor>& grad_scale, bool rounded,
    const c10::optional<at::Tensor>& threshold) {
  check_inputs(q_in, d_in, scale, bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor q = rows_of(q_in), d = rows_of(d_in);
  const int64_t B = q.size(0), N = d.size(0), D = q.size(1);
  at::Tensor w;
  if (w_in.has_value()) {
    TORCH_CHECK(w_in->dim() == 1 && w_in->size(0) == B, "prcl native: w must be (B,) = (", B,
                ",), got ", w_in->sizes());
    w = w_in->detach().to(at::kFloat).contiguous();
  }
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float t = scale.item<float>(), b = bias.item<float>();
  const float gscale = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor rows_out = at::zeros({B}, f32);
  at::Tensor dq = at::zeros({B, D}, rounded ? q.options() : f32);
  at::Tensor dd = at::zeros({N, D}, rounded ? d.options() : f32);
  if (B == 0 || N == 0) return {rows_out, dq, dd, at::zeros({}, f32), at::zeros({}, f32)};
  const Labels Y(labels, label_index, B, N);
  const Thresholds thr(threshold, B);
  const Plan p = make_plan(B, N, D);
  const Epilogue& ep = epilogue();
  const bool convert = q.scalar_type() != at::kFloat;
  // Gᵀ·q summed over row tiles in float32: into dd itself when that is float32; with one row tile
  // and a 16-bit dd, no sum: each column tile's rows go out through the thread's converted-tile buffer
  const int64_t row_tiles = (B + p.tm - 1) / p.tm;
  const at::Tensor dd_acc = dd.scalar_type() == at::kFloat ? dd
                            : row_tiles > 1                ? at::empty({N, D}, f32)
                                                           : at::Tensor();
  Workspace ws(p, D, convert);
  std::unique_ptr<float[]> q_buf(new float[convert ? p.tm * D : 0]);
  at::Tensor dq_part = at::empty({p.chunks, p.tm, D}, f32);  // G·d partials of the row tile, per chunk
  std::vector<double> rows_part(static_cast<size_t>(p.chunks * p.tm));
  std::vector<double> sums_part(static_cast<size_t>(2 * p.chunks));
  double gs_total = 0.0, g_total = 0.0;

  for (int64_t i0 = 0; i0 < B; i0 += p.tm) {
    const int64_t mt = std::min(p.tm, B - i0);
    const at::Tensor q_i = fp32_block(q, i0, mt, q_buf.get());
    std::fill(rows_part.begin(), rows_part.end(), 0.0);
    std::fill(sums_part.begin(), sums_part.end(), 0.0);
    for_each_item(p.chunks, ws, [&](int64_t c, float* w) {
      at::Tensor gd_c = dq_part[c].narrow(0, 0, mt);
      double* rows = rows_part.data() + c * p.tm;
      float* d_buf = w + ws.d_offset;
      for (int64_t tile = p.tile_begin(c); tile < p.tile_begin(c + 1); ++tile) {
        const int64_t j0 = tile * p.tn, nt = std::min(p.tn, N - j0);
        const at::Tensor d_j = fp32_block(d, j0, nt, d_buf);
        at::Tensor s = tile_view(w, mt, nt);
        at::mm_out(s, q_i, d_j.t());  // S = q_i·d_jᵀ  (mt, nt)
        float* scratch = w + ws.s_floats;
        for (int64_t r = 0; r < mt; ++r) {
          float row_sums[2] = {0.0f, 0.0f};  // Σ G∘S, Σ G of the row
          const float* y = Y.row(i0 + r, j0, nt, scratch);
          rows[r] += ep.grad_row(w + r * nt, y, nt, t, b, thr[i0 + r], wp ? wp[i0 + r] : 1.0f, row_sums);
          Y.clear(i0 + r, j0, nt, scratch);
          sums_part[2 * c] += row_sums[0];
          sums_part[2 * c + 1] += row_sums[1];
        }
        if (tile == p.tile_begin(c)) at::mm_out(gd_c, s, d_j);  // G·d_j  (mt, D)
        else gd_c.addmm_(s, d_j);
        if (!dd_acc.defined()) {  // Gᵀ·q_i (nt, D) is final: into d_j's buffer, which G·d_j is done with
          at::Tensor gq = tile_view(d_buf, nt, D);
          dd.narrow(0, j0, nt).copy_(at::mm_out(gq, s.t(), q_i).mul_(gscale));
        } else if (i0 == 0) {
          at::Tensor gq = dd_acc.narrow(0, j0, nt);
          at::mm_out(gq, s.t(), q_i);
        } else {
          dd_acc.narrow(0, j0, nt).addmm_(s.t(), q_i);
        }
      }
    });
    // the chunks' partials, added in chunk order: the sums do not depend on who ran which chunk
    // (on this thread: chunks·TM·D adds per row tile, next to 6·TM·N·D flops of GEMMs)
    float* part = dq_part.data_ptr<float>();
    for (int64_t c = 1; c < p.chunks; ++c) {
      const float* src = part + c * p.tm * D;
      for (int64_t k = 0; k < mt * D; ++k) part[k] += src[k];
    }
    dq.narrow(0, i0, mt).copy_(dq_part[0].narrow(0, 0, mt).mul_(gscale));
    float* rows = rows_out.data_ptr<float>() + i0;
    for (int64_t r = 0; r < mt; ++r) {
      double acc = 0.0;
      for (int64_t c = 0; c < p.chunks; ++c) acc += rows_part[c * p.tm + r];
      rows[r] = static_cast<float>(acc);
    }
    for (int64_t c = 0; c < p.chunks; ++c) {
      gs_total += sums_part[2 * c];
      g_total += sums_part[2 * c + 1];
    }
  }
  if (dd_acc.defined()) {
    dd_acc.mul_(gscale);
    if (!dd_acc.is_same(dd)) dd.copy_(dd_acc);
  }
  return {rows_out, dq, dd, at::scalar_tensor(gs_total, f32), at::scalar_tensor(g_total, f32)};
}

std::string info() {
  return std::string("isa=") + epilogue().isa + " tile_rows=" + std::to_string(kTileM) + " threads=" + std::to_string(at::get_num_threads()) +
         " built-against-torch=" + PRCL_TORCH_VERSION;
}

}  // namespace
}  // namespace prcl_native

TORCH_LIBRARY_FRAGMENT(prcl, m) {
  m.def(
      "native_loss_rows(Tensor q, Tensor d, Tensor scale, Tensor bias, Tensor labels, "
      "Tensor? label_index, Tensor? threshold=None) -> Tensor");
  m.def(
      "native_loss_grads(Tensor q, Tensor d, Tensor scale, Tensor bias, Tensor labels, "
      "Tensor? label_index, Tensor? w, Tensor? grad_scale=None, bool rounded=False, Tensor? threshold=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("native_info() -> str", &prcl_native::info);
}

TORCH_LIBRARY_IMPL(prcl, CPU, m) {
  m.impl("native_loss_rows", &prcl_native::loss_rows);
  m.impl("native_loss_grads", &prcl_native::loss_grads);
}
