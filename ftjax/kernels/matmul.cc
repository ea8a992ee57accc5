// A dense matrix product for XLA:CPU as an XLA FFI custom call, for bfloat16 operands on CPUs
// whose bfloat16 dot instructions are slower than their float32 FMAs.
//
// Why: XLA:CPU runs a bf16 x bf16 -> f32 dot on YNNPACK's bfloat16 kernels, which use the
// CPU's bfloat16 dot-product instruction (vdpbf16ps). On some CPUs that instruction delivers
// half the FLOP rate of float32 FMAs (measured on an Intel Xeon of family 6 model 207: 81 against
// 173 GFLOP/s per core), so those dots run at ~150 GFLOP/s where float32 ones reach ~280. Here
// the operands are converted to float32 while they are packed into cache-sized panels (which a
// fast product copies anyway) and multiplied with float32 FMAs; the result is rounded once to
// the output dtype. The values are those of a dot with float32 accumulation.
//
// C[M, N] = op(A) op(B): A is [M, K] row-major, or [K, M] with transpose_a; B is [K, N], or
// [N, K] with transpose_b. A and B share one dtype (float32 or bfloat16); C is float32 or
// bfloat16. The three products of a dense layer's training step take these forms without
// copies: x w, dy w^T (transpose_b) and x^T dy (transpose_a).
//
// The structure is that of the GotoBLAS/BLIS family: B packed into panels of kCols columns, A
// into panels of kRows rows per block of kBlockRows rows and at most kDepth of the contracted
// dimension, and a kRows x kCols register tile of float32 accumulators that reads one packed A
// panel and one packed B panel.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include <thread>
#include <cstdlib>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

namespace {

using namespace ftjax;  // NOLINT: the shared helpers of common.h

constexpr int64_t kRows = 12;         // register tile: rows of C (broadcast from A)
constexpr int64_t kCols = 32;         // register tile: columns of C (two AVX-512 vectors)
constexpr int64_t kDepth = 192;       // at most this much of K per packed A block
constexpr int64_t kBlockRows = 96;    // rows of A packed together (a multiple of kRows)
constexpr int64_t kTaskCols = 2048;   // at most this many columns of C per task

// One operand: element (r, c) of the logical matrix is p[r * ld + c], or p[c * ld + r] when
// transposed; bf16 says the elements are bfloat16 bits.
struct Operand {
  const void* p;
  int64_t ld;
  bool transposed;
  bool bf16;

  float At(int64_t r, int64_t c) const {
    const int64_t i = transposed ? c * ld + r : r * ld + c;
    return bf16 ? Bf16ToF32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  // Pointer to the (contiguous) run of stored elements starting at flat index i.
  const float* F32(int64_t i) const { return static_cast<const float*>(p) + i; }
  const uint16_t* Bf16(int64_t i) const { return static_cast<const uint16_t*>(p) + i; }
};

#if defined(__AVX512F__)
inline __mmask16 FirstLanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff)
                 : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// Up to 16 consecutive stored elements from flat index i, as float32 (the rest zero).
inline __m512 Load16(const Operand& x, int64_t i, __mmask16 lanes) {
  if (x.bf16) {
    const __m256i h = _mm256_maskz_loadu_epi16(lanes, x.Bf16(i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(lanes, x.F32(i));
}

// In-register transpose of 16 x 16 floats: r[i] lane j -> r[j] lane i.
inline void Transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
}

// dst[t * width + j] = line j's element t (t < depth, j < lines <= 16), where line j is the
// stored run x[start + j * stride + t]: a transposing copy, 16 x 16 at a time. Lanes j >= lines
// are written as zeros; `mask` selects which of the 16 lanes of each row are stored.
inline void PackTransposed(const Operand& x, int64_t start, int64_t stride, int64_t lines,
                           int64_t depth, float* dst, int64_t width, __mmask16 mask) {
  __m512 r[16];
  for (int64_t t0 = 0; t0 < depth; t0 += 16) {
    const __mmask16 tail = FirstLanes(depth - t0);
    for (int64_t j = 0; j < 16; ++j)
      r[j] = j < lines ? Load16(x, start + j * stride + t0, tail) : _mm512_setzero_ps();
    Transpose16(r);
    const int64_t rows = std::min<int64_t>(16, depth - t0);
    for (int64_t t = 0; t < rows; ++t) _mm512_mask_storeu_ps(dst + (t0 + t) * width, mask, r[t]);
  }
}
#endif

// B(k, n) for k < K and n in [n0, n0 + width) into panels of kCols columns, zero-padded:
// dst[q * K * kCols + k * kCols + j] = B(k, n0 + q * kCols + j).
void PackB(const Operand& b, int64_t K, int64_t n0, int64_t width, float* dst) {
  for (int64_t q = 0; q * kCols < width; ++q) {
    float* panel = dst + q * K * kCols;
    const int64_t n = n0 + q * kCols, cols = std::min(kCols, width - q * kCols);
#if defined(__AVX512F__)
    if (!b.transposed) {
      const __mmask16 lo = FirstLanes(cols), hi = FirstLanes(cols - 16);
      for (int64_t k = 0; k < K; ++k) {
        _mm512_store_ps(panel + k * kCols, Load16(b, k * b.ld + n, lo));
        _mm512_store_ps(panel + k * kCols + 16, Load16(b, k * b.ld + n + 16, hi));
      }
    } else {
      // B(k, n) = b[n * ld + k]: the panel's columns are stored rows of b.
      for (int64_t half = 0; half < 2; ++half)
        PackTransposed(b, (n + 16 * half) * b.ld, b.ld, std::min<int64_t>(16, cols - 16 * half),
                       K, panel + 16 * half, kCols, 0xffff);
    }
#else
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < kCols; ++j)
        panel[k * kCols + j] = j < cols ? b.At(k, n + j) : 0.0f;
#endif
  }
}

// A(m, k) for m in [m0, m0 + rows), k in [k0, k0 + depth) into panels of kRows rows,
// zero-padded: dst[p * depth * kRows + t * kRows + i] = A(m0 + p * kRows + i, k0 + t).
void PackA(const Operand& a, int64_t m0, int64_t rows, int64_t k0, int64_t depth, float* dst) {
  for (int64_t p = 0; p * kRows < rows; ++p) {
    float* panel = dst + p * depth * kRows;
    const int64_t m = m0 + p * kRows, height = std::min(kRows, rows - p * kRows);
#if defined(__AVX512F__)
    if (a.transposed) {
      // A(m, k) = a[k * ld + m]: the panel's rows are contiguous for each k.
      const __mmask16 lanes = FirstLanes(height);
      for (int64_t t = 0; t < depth; ++t)
        _mm512_mask_storeu_ps(panel + t * kRows, FirstLanes(kRows),
                              Load16(a, (k0 + t) * a.ld + m, lanes));
    } else {
      PackTransposed(a, m * a.ld + k0, a.ld, height, depth, panel, kRows, FirstLanes(kRows));
    }
#else
    for (int64_t t = 0; t < depth; ++t)
      for (int64_t i = 0; i < kRows; ++i)
        panel[t * kRows + i] = i < height ? a.At(m + i, k0 + t) : 0.0f;
#endif
  }
}

// c[i * ldc + j] (+)= sum_t a[t * kRows + i] b[t * kCols + j] for i < rows, j < cols.
void Tile(int64_t depth, const float* a, const float* b, float* c, int64_t ldc, int64_t rows,
          int64_t cols, bool accumulate) {
#if defined(__AVX512F__)
  __m512 acc[kRows][2];
  for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  // The tile's rows of C are fetched while it computes: stores to lines not in cache stall.
  for (int64_t i = 0; i < rows; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 16), _MM_HINT_T0);
  }
  for (int64_t t = 0; t < depth; ++t) {
    const __m512 b0 = _mm512_load_ps(b + t * kCols), b1 = _mm512_load_ps(b + t * kCols + 16);
    const float* at = a + t * kRows;
#pragma GCC unroll 12
    for (int i = 0; i < kRows; ++i) {
      const __m512 x = _mm512_set1_ps(at[i]);
      acc[i][0] = _mm512_fmadd_ps(x, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(x, b1, acc[i][1]);
    }
  }
  const __mmask16 lo = FirstLanes(cols), hi = FirstLanes(cols - 16);
  // A loop of compile-time length: indexing acc by a run-time row would keep it in memory.
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i) {
    if (i >= rows) break;
    float* ci = c + i * ldc;
    __m512 v0 = acc[i][0], v1 = acc[i][1];
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(lo, ci));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(hi, ci + 16));
    }
    _mm512_mask_storeu_ps(ci, lo, v0);
    _mm512_mask_storeu_ps(ci + 16, hi, v1);
  }
#else
  float acc[kRows][kCols] = {};
  for (int64_t t = 0; t < depth; ++t)
    for (int64_t i = 0; i < kRows; ++i)
      for (int64_t j = 0; j < kCols; ++j) acc[i][j] += a[t * kRows + i] * b[t * kCols + j];
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
#endif
}

// A row of float32 values to bfloat16 bits.
void RoundRow(const float* x, int64_t n, uint16_t* out) {
  int64_t j = 0;
#if defined(__AVX512BF16__)
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j))));
#endif
  for (; j < n; ++j) out[j] = F32ToBf16(x[j]);
}

// Owns float32 scratch aligned for the packed panels' aligned loads.
class Scratch {
 public:
  float* Get(size_t n) {
    storage_.resize(n + 16);
    const uintptr_t p = reinterpret_cast<uintptr_t>(storage_.data());
    return reinterpret_cast<float*>((p + 63) & ~uintptr_t{63});
  }

 private:
  std::vector<float> storage_;
};

struct Problem {
  Operand a, b;
  int64_t m, n, k;
  void* c;       // [m, n] row-major
  bool c_bf16;
};

// C[m0:m1, n0:n1]: B's columns packed once for all of K, then blocks of kBlockRows rows of A,
// each over K in steps of at most kDepth, accumulated in C (or in float32 scratch when C is
// bfloat16 and K takes more than one step).
void Block(const Problem& pr, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = pr.k, width = n1 - n0, panels = (width + kCols - 1) / kCols;
  const int64_t steps = (K + kDepth - 1) / kDepth, depth = (K + steps - 1) / steps;
  Scratch b_scratch, a_scratch, c_scratch;
  float* bp = b_scratch.Get(panels * kCols * K);
  PackB(pr.b, K, n0, width, bp);
  float* ap = a_scratch.Get(RoundUp(kBlockRows, kRows) * depth);
  const bool direct = !pr.c_bf16;
  float* cs = direct ? nullptr : c_scratch.Get(kBlockRows * width);
  for (int64_t i0 = m0; i0 < m1; i0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, m1 - i0);
    float* c = direct ? static_cast<float*>(pr.c) + i0 * pr.n + n0 : cs;
    const int64_t ldc = direct ? pr.n : width;
    for (int64_t k0 = 0; k0 < K; k0 += depth) {
      const int64_t d = std::min(depth, K - k0);
      PackA(pr.a, i0, rows, k0, d, ap);
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t cols = std::min(kCols, width - q * kCols);
        const float* bq = bp + q * K * kCols + k0 * kCols;
        for (int64_t p = 0; p * kRows < rows; ++p)
          Tile(d, ap + p * d * kRows, bq, c + p * kRows * ldc + q * kCols, ldc,
               std::min(kRows, rows - p * kRows), cols, k0 > 0);
      }
    }
    if (!direct)
      for (int64_t i = 0; i < rows; ++i)
        RoundRow(cs + i * width, width, static_cast<uint16_t*>(pr.c) + (i0 + i) * pr.n + n0);
  }
}

// Splits C into tasks: across the larger of its two dimensions, one part per thread (each task
// packs its own share of B and all of its rows of A), with at most kTaskCols columns each.
void Run(ffi::ThreadPool& pool, const Problem& pr) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t row_parts = 1, col_parts = (pr.n + kTaskCols - 1) / kTaskCols;
  if (pr.m > pr.n)
    row_parts = std::max<int64_t>(1, std::min(threads, (pr.m + kRows - 1) / kRows));
  else
    col_parts = std::max(col_parts, std::min(threads, (pr.n + kCols - 1) / kCols));
  const int64_t row_step = RoundUp((pr.m + row_parts - 1) / row_parts, kRows);
  const int64_t col_step = RoundUp((pr.n + col_parts - 1) / col_parts, kCols);
  row_parts = (pr.m + row_step - 1) / row_step;
  col_parts = (pr.n + col_step - 1) / col_step;
  ParallelFor(pool, row_parts * col_parts, [&](int64_t task) {
    const int64_t m0 = (task / col_parts) * row_step, n0 = (task % col_parts) * col_step;
    Block(pr, m0, std::min(pr.m, m0 + row_step), n0, std::min(pr.n, n0 + col_step));
  });
}

bool Supported(ffi::DataType t) { return t == ffi::F32 || t == ffi::BF16; }

ffi::Error Matmul(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, bool transpose_a,
                  bool transpose_b, ffi::Result<ffi::AnyBuffer> c) {
  const auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2)
    return ffi::Error::InvalidArgument("matmul operands and result must be matrices");
  if (a.element_type() != b.element_type() || !Supported(a.element_type()) ||
      !Supported(c->element_type()))
    return ffi::Error::InvalidArgument(
        "matmul operands must share a dtype, float32 or bfloat16, as must the result");
  const int64_t m = transpose_a ? da[1] : da[0], k = transpose_a ? da[0] : da[1];
  const int64_t kb = transpose_b ? db[1] : db[0], n = transpose_b ? db[0] : db[1];
  if (k != kb || dc[0] != m || dc[1] != n)
    return ffi::Error::InvalidArgument("matmul shapes do not match");
  const bool bf16 = a.element_type() == ffi::BF16;
  Problem pr{{a.untyped_data(), da[1], transpose_a, bf16},
             {b.untyped_data(), db[1], transpose_b, bf16},
             m, n, k, c->untyped_data(), c->element_type() == ffi::BF16};
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(pr.c, 0, m * n * (pr.c_bf16 ? 2 : 4));
    return ffi::Error::Success();
  }
  Run(pool, pr);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b")
                                  .Ret<ffi::AnyBuffer>());  // c
