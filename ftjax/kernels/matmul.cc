// A dense matrix product for XLA:CPU as an XLA FFI custom call, for bfloat16 operands on CPUs
// where XLA's bfloat16 dot leaves speed on the table.
//
// Why: XLA:CPU runs a bf16 x bf16 -> f32 dot on YNNPACK's bfloat16 kernels, which use the
// CPU's bfloat16 dot-product instruction (vdpbf16ps). How fast that is depends on the CPU:
// - On some CPUs the instruction delivers half the FLOP rate of float32 FMAs (measured on an
//   Intel Xeon of family 6 model 207: 81 against 173 GFLOP/s per core), so those dots run at
//   ~150 GFLOP/s where float32 ones reach ~280. The `fma` variant converts the operands to
//   float32 while they are packed into cache-sized panels (which a fast product copies anyway)
//   and multiplies with float32 FMAs.
// - On others it runs at twice the FMA FLOP rate (AMD Zen 4: ~210 against ~105 GFLOP/s per
//   core), where YNNPACK reaches about two thirds of it. The `dot` variant packs the operands as
//   pairs of bfloat16 along the contracted dimension and multiplies with vdpbf16ps.
// Either way the accumulation is in float32 and the result is rounded once to the output dtype.
// Which variant (or XLA's own dot) is fastest is measured per machine by the Python side.
//
// C[M, N] = op(A) op(B): A is [M, K] row-major, or [K, M] with transpose_a; B is [K, N], or
// [N, K] with transpose_b. A and B share one dtype (float32 or bfloat16); C is float32 or
// bfloat16. The three products of a dense layer's training step take these forms without
// copies: x w, dy w^T (transpose_b) and x^T dy (transpose_a). A float32 layer's bias rides along
// (Dense): x w + b with b as the accumulators' start, and dy w^T with dy's column sums (the bias
// gradient) taken while the product reads dy; where the layer's input was gelu(y + b'), dy w^T
// can leave the registers already multiplied by GELU's slope (its gate), with b''s gradient.
//
// The structure is that of the GotoBLAS/BLIS family: B packed into panels of kCols columns for
// at most kPackDepth of the contracted dimension, A into panels of kRows rows per block of
// kBlockRows rows and at most kDepth words of the contracted dimension, and a kRows x kCols
// register tile of float32 accumulators that reads one packed A panel and one packed B panel.
// A packed word is one float32 value (`fma`) or a pair of bfloat16 values (`dot`).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>
#include <thread>
#include <cstdlib>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

namespace {

using namespace ftjax;  // NOLINT: the shared helpers of common.h

constexpr int64_t kRows = 12;          // register tile: rows of C (broadcast from A)
constexpr int64_t kCols = 32;          // register tile: columns of C (two AVX-512 vectors)
constexpr int64_t kDepth = 192;        // at most this many words of K per packed A block
constexpr int64_t kBlockRows = 96;     // rows of A packed together (a multiple of kRows)
constexpr int64_t kTaskCols = 2048;    // at most this many columns of C per task
constexpr int64_t kPackDepth = 2048;   // at most this many words of K per packed B (bounds
                                       // the scratch: a 32000-wide K would take ~100 MB)


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

// Up to 32 consecutive stored bfloat16 elements from flat index i as 16 pairs, one per 32-bit
// lane (the first element in the low half); elements past `count` are zero.
inline __m512 LoadPairs(const Operand& x, int64_t i, int64_t count) {
  const __mmask32 lanes = count >= 32 ? ~__mmask32{0}
                          : count <= 0 ? 0 : static_cast<__mmask32>((1u << count) - 1);
  return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(lanes, x.Bf16(i)));
}

// 16 pairs from two stored runs of bfloat16: lane j = (x[i0 + j], x[i1 + j]), the second
// element zero when there is no second run.
inline __m512 PairRuns(const Operand& x, int64_t i0, int64_t i1, bool second, __mmask16 lanes) {
  const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, x.Bf16(i0)));
  if (!second) return _mm512_castsi512_ps(lo);
  const __m512i hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, x.Bf16(i1)));
  return _mm512_castsi512_ps(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
}

// dst[t * width + j] = word t of line j (t < words, j < lines <= 16), where load(j, t0) gives
// words t0 .. t0 + 15 of line j (zero past its end): a transposing copy, 16 x 16 at a time.
// Lanes j >= lines are written as zeros; `mask` selects which of the 16 lanes of each row are
// stored.
template <typename Load>
inline void PackTransposed(Load load, int64_t lines, int64_t words, float* dst, int64_t width,
                           __mmask16 mask) {
  __m512 r[16];
  for (int64_t t0 = 0; t0 < words; t0 += 16) {
    for (int64_t j = 0; j < 16; ++j) r[j] = j < lines ? load(j, t0) : _mm512_setzero_ps();
    Transpose16(r);
    const int64_t rows = std::min<int64_t>(16, words - t0);
    for (int64_t t = 0; t < rows; ++t) _mm512_mask_storeu_ps(dst + (t0 + t) * width, mask, r[t]);
  }
}
#endif

// Words per packed element run: the `fma` variant packs float32 values, `dot` pairs of bfloat16.
template <bool kDot> constexpr int64_t kUnit = kDot ? 2 : 1;

// B(k, n) for k in [k0, k0 + depth), n in [n0, n0 + width) into panels of kCols columns,
// zero-padded; `words` = depth / kUnit rounded up:
// fma: dst[q * depth * kCols + t * kCols + j] = B(k0 + t, n0 + q * kCols + j);
// dot: dst[q * words * kCols + t * kCols + j] = the pair B(k0 + 2t, .), B(k0 + 2t + 1, .).
// `stride` (at least `words`; 0: `words`) is the panel's height in words, its rows past `words`
// zero (the amx variant reads whole tiles of 16 words).
template <bool kDot>
void PackB(const Operand& b, int64_t k0, int64_t depth, int64_t n0, int64_t width, float* dst,
           int64_t stride = 0) {
  const int64_t words = (depth + kUnit<kDot> - 1) / kUnit<kDot>;
  stride = std::max(stride, words);
  for (int64_t q = 0; q * kCols < width; ++q) {
    float* panel = dst + q * stride * kCols;
    std::memset(panel + words * kCols, 0, (stride - words) * kCols * sizeof(float));
    const int64_t n = n0 + q * kCols, cols = std::min(kCols, width - q * kCols);
#if defined(__AVX512F__)
    const __mmask16 lo = FirstLanes(cols), hi = FirstLanes(cols - 16);
    if (!b.transposed) {
      for (int64_t t = 0; t < words; ++t) {
        float* row = panel + t * kCols;
        if constexpr (kDot) {
          const int64_t k = k0 + 2 * t;
          const bool second = 2 * t + 1 < depth;
          _mm512_store_ps(row, PairRuns(b, k * b.ld + n, (k + 1) * b.ld + n, second, lo));
          _mm512_store_ps(row + 16, PairRuns(b, k * b.ld + n + 16, (k + 1) * b.ld + n + 16,
                                             second, hi));
        } else {
          _mm512_store_ps(row, Load16(b, (k0 + t) * b.ld + n, lo));
          _mm512_store_ps(row + 16, Load16(b, (k0 + t) * b.ld + n + 16, hi));
        }
      }
    } else {
      // B(k, n) = b[n * ld + k]: the panel's columns are stored rows of b.
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t start = (n + 16 * half) * b.ld + k0;
        auto load = [&](int64_t j, int64_t t0) {
          if constexpr (kDot) return LoadPairs(b, start + j * b.ld + 2 * t0, depth - 2 * t0);
          return Load16(b, start + j * b.ld + t0, FirstLanes(depth - t0));
        };
        PackTransposed(load, std::min<int64_t>(16, cols - 16 * half), words, panel + 16 * half,
                       kCols, 0xffff);
      }
    }
#else
    static_assert(!kDot, "the dot variant needs AVX-512");
    for (int64_t t = 0; t < depth; ++t)
      for (int64_t j = 0; j < kCols; ++j)
        panel[t * kCols + j] = j < cols ? b.At(k0 + t, n + j) : 0.0f;
#endif
  }
}

// A(m, k) for m in [m0, m0 + rows), k in [k0, k0 + depth) into panels of kRows rows,
// zero-padded, with words as in PackB: dst[p * words * kRows + t * kRows + i] = word t of row
// m0 + p * kRows + i.
template <bool kDot>
void PackA(const Operand& a, int64_t m0, int64_t rows, int64_t k0, int64_t depth, float* dst) {
  const int64_t words = (depth + kUnit<kDot> - 1) / kUnit<kDot>;
  for (int64_t p = 0; p * kRows < rows; ++p) {
    float* panel = dst + p * words * kRows;
    const int64_t m = m0 + p * kRows, height = std::min(kRows, rows - p * kRows);
#if defined(__AVX512F__)
    if (a.transposed) {
      // A(m, k) = a[k * ld + m]: the panel's rows are contiguous for each k.
      const __mmask16 lanes = FirstLanes(height);
      for (int64_t t = 0; t < words; ++t) {
        __m512 v;
        if constexpr (kDot) {
          const int64_t k = k0 + 2 * t;
          v = PairRuns(a, k * a.ld + m, (k + 1) * a.ld + m, 2 * t + 1 < depth, lanes);
        } else {
          v = Load16(a, (k0 + t) * a.ld + m, lanes);
        }
        _mm512_mask_storeu_ps(panel + t * kRows, FirstLanes(kRows), v);
      }
    } else {
      const int64_t start = m * a.ld + k0;
      auto load = [&](int64_t i, int64_t t0) {
        if constexpr (kDot) return LoadPairs(a, start + i * a.ld + 2 * t0, depth - 2 * t0);
        return Load16(a, start + i * a.ld + t0, FirstLanes(depth - t0));
      };
      PackTransposed(load, height, words, panel, kRows, FirstLanes(kRows));
    }
#else
    for (int64_t t = 0; t < depth; ++t)
      for (int64_t i = 0; i < kRows; ++i)
        panel[t * kRows + i] = i < height ? a.At(m + i, k0 + t) : 0.0f;
#endif
  }
}

#if defined(__AVX512F__)
// A register tile's rows < `rows` and columns < `cols` into c (ldc floats a row), added to what
// c holds when `accumulate`. Always inlined: the tile must stay in registers.
__attribute__((always_inline)) inline void StoreTile(const __m512 (&acc)[kRows][2], float* c,
                                                     int64_t ldc, int64_t rows, int64_t cols,
                                                     bool accumulate) {
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
}
#endif

// c[i * ldc + j] (+)= sum_t a[t * kRows + i] b[t * kCols + j] for i < rows, j < cols, over
// `words` packed words: float32 products (fma), or the dot products of bfloat16 pairs (dot).
template <bool kDot>
void Tile(int64_t words, const float* a, const float* b, float* c, int64_t ldc, int64_t rows,
          int64_t cols, bool accumulate) {
#if defined(__AVX512F__)
  __m512 acc[kRows][2];
  for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  // The tile's rows of C are fetched while it computes: stores to lines not in cache stall.
  for (int64_t i = 0; i < rows; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 16), _MM_HINT_T0);
  }
  for (int64_t t = 0; t < words; ++t) {
    const __m512 b0 = _mm512_load_ps(b + t * kCols), b1 = _mm512_load_ps(b + t * kCols + 16);
    const float* at = a + t * kRows;
#pragma GCC unroll 12
    for (int i = 0; i < kRows; ++i) {
      const __m512 x = _mm512_set1_ps(at[i]);  // a float32 value, or a pair's 32 bits
#if defined(__AVX512BF16__)
      if constexpr (kDot) {
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)x, (__m512bh)b0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)x, (__m512bh)b1);
        continue;
      }
#endif
      acc[i][0] = _mm512_fmadd_ps(x, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(x, b1, acc[i][1]);
    }
  }
  StoreTile(acc, c, ldc, rows, cols, accumulate);
#else
  float acc[kRows][kCols] = {};
  for (int64_t t = 0; t < words; ++t)
    for (int64_t i = 0; i < kRows; ++i)
      for (int64_t j = 0; j < kCols; ++j) acc[i][j] += a[t * kRows + i] * b[t * kCols + j];
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
#endif
}

// The low-rank term that matmul_plus adds to a bfloat16 C's rows before their rounding:
// a2 [m, rank] (row-major, float32) times b [rank, ld] (row-major float32, the rows of b2
// whatever its layout, columns offset to the block's first).
struct LowRank {
  const float* a2;
  const float* b;
  int64_t ld, rank;
  LowRank At(int64_t row, int64_t col) const { return {a2 + row * rank, b + col, ld, rank}; }
};

// A row of float32 values (plus `bias`, n values, where there is one, and the low-rank term
// `lr` of this row, where lr.rank > 0) to bfloat16 bits: a bfloat16 C's complete row, rounded
// once. Always inlined: `BlockAmx` stores C 32 values a row at a time, and as a call (with the
// vzeroupper the compiler puts before it) MiniLM's bfloat16 full fine-tuning step took 1.047x as
// long (0.478 against 0.456 s, five alternations of fresh processes; LoRA 1.06x).
__attribute__((always_inline)) inline void RoundRow(const float* x, int64_t n, uint16_t* out,
                                                    const float* bias = nullptr,
                                                    LowRank lr = {}) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) {
    __m512 v = _mm512_loadu_ps(x + j);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
    for (int64_t t = 0; t < lr.rank; ++t)
      v = _mm512_fmadd_ps(_mm512_set1_ps(lr.a2[t]), _mm512_loadu_ps(lr.b + t * lr.ld + j), v);
    StoreV(out + j, 0xffff, v);
  }
#endif
  for (; j < n; ++j) {
    float v = bias ? x[j] + bias[j] : x[j];
    for (int64_t t = 0; t < lr.rank; ++t) v += lr.a2[t] * lr.b[t * lr.ld + j];
    out[j] = F32ToBf16(v);
  }
}

// sums[0:width] += the `rows` rows of a (ld elements of T apart) over their first `width`
// values, row after row (each column summed in row order).
template <typename T>
void AddRows(const T* a, int64_t ld, int64_t rows, int64_t width, float* sums) {
  for (int64_t i = 0; i < rows; ++i) {
    int64_t c = 0;
#if defined(__AVX512F__)
    for (; c < width; c += 16) {
      const __mmask16 lanes = Live(width, c);
      _mm512_mask_storeu_ps(sums + c, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, sums + c),
                                                           LoadV(a + i * ld + c, lanes)));
    }
#endif
    for (; c < width; ++c) sums[c] += Load(a + i * ld, c);
  }
}

// Float32 scratch aligned for the packed panels' aligned loads: one of a thread's kSlots
// buffers, kept across calls (XLA's worker threads live as long as the process) and grown, never
// cleared. A std::vector per call zero-filled its megabytes and faulted in fresh pages every
// call: ~7% of a float32 [4096, 384] x [384, 1536] product's time went to the kernel clearing
// pages.
class Scratch {
 public:
  static constexpr int kSlots = 3;
  explicit Scratch(int slot) : slot_(slot) {}
  float* Get(size_t n) {
    thread_local std::unique_ptr<float[]> buffers[kSlots];
    thread_local size_t sizes[kSlots] = {};
    if (sizes[slot_] < n + 16) {
      buffers[slot_].reset(new float[n + 16]);
      sizes[slot_] = n + 16;
    }
    const uintptr_t p = reinterpret_cast<uintptr_t>(buffers[slot_].get());
    return reinterpret_cast<float*>((p + 63) & ~uintptr_t{63});
  }

 private:
  int slot_;
};

enum class Variant : int32_t { kFma = 0, kDot = 1, kAmx = 2 };

struct Problem {
  Operand a, b;
  int64_t m, n, k;
  void* c;       // [m, n] row-major
  bool c_bf16;
  // matmul_plus's second product, added to C: a2 [m, rank] row-major float32 times b2
  // [rank, n] (or [n, rank], transposed); rank 0 without one.
  const float* a2 = nullptr;
  Operand b2 = {};
  int64_t rank = 0;
  // For a bfloat16 C: b2's rows as float32, [rank, n] row-major, added by RoundRow.
  const float* low_b = nullptr;
  // Dense's extras (A row-major; A, B and C float32, or all bfloat16): C = A B + `bias` [n]
  // (float32; for a bfloat16 C added before its one rounding), and `sums` [k] set to the column
  // sums of A (over its m rows), read while the product reads A (float32; a bfloat16 A's rows
  // are summed by Run, task by task). With a gate (float32 only)
  // (the input gradient of a layer whose input was gelu(y + b)), each complete value of C is
  // multiplied by gelu'(gate_y + gate_b) (gate_y [m, n], gate_b [n]) before it is stored, and
  // `gate_sums` [n] set to the column sums of that C (the bias b's gradient).
  const float* bias = nullptr;
  float* sums = nullptr;
  const float* gate_y = nullptr;
  const float* gate_b = nullptr;
  float* gate_sums = nullptr;
};

// Row `row`'s low-rank term from column `col` on (none without one).
inline LowRank LowTerm(const Problem& pr, int64_t row, int64_t col) {
  return pr.low_b ? LowRank{pr.a2, pr.low_b, pr.n, pr.rank}.At(row, col) : LowRank{};
}

// C[m0:m1, n0:n1], over K in parts of at most kPackDepth words: each part's columns of B are
// packed once, then blocks of kBlockRows rows of A, each over the part in steps of at most
// kDepth words, accumulated in C (or in float32 scratch when C is bfloat16 and K takes more
// than one step).
template <bool kDot>
void Block(const Problem& pr, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int64_t unit = kUnit<kDot>;
  const int64_t K = pr.k, width = n1 - n0, panels = (width + kCols - 1) / kCols;
  // Parts and steps of equal size (a multiple of the unit, so pairs never straddle them).
  const int64_t parts = (K + kPackDepth * unit - 1) / (kPackDepth * unit);
  const int64_t part = RoundUp((K + parts - 1) / parts, unit);
  const int64_t steps = (part + kDepth * unit - 1) / (kDepth * unit);
  const int64_t depth = RoundUp((part + steps - 1) / steps, unit);
  Scratch b_scratch(0), a_scratch(1), c_scratch(2);
  float* bp = b_scratch.Get(panels * kCols * (part / unit));
  float* ap = a_scratch.Get(RoundUp(kBlockRows, kRows) * (depth / unit));
  // bfloat16 C: with one part, a block of rows at a time; with more, all of the task's rows.
  const bool direct = !pr.c_bf16;
  const int64_t scratch_rows = parts == 1 ? kBlockRows : m1 - m0;
  float* cs = direct ? nullptr : c_scratch.Get(scratch_rows * width);
  for (int64_t p0 = 0; p0 < K; p0 += part) {
    const int64_t part_depth = std::min(part, K - p0);
    PackB<kDot>(pr.b, p0, part_depth, n0, width, bp);
    const int64_t part_words = (part_depth + unit - 1) / unit;
    for (int64_t i0 = m0; i0 < m1; i0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, m1 - i0);
      float* c = direct ? static_cast<float*>(pr.c) + i0 * pr.n + n0
                        : cs + (parts == 1 ? 0 : (i0 - m0) * width);
      const int64_t ldc = direct ? pr.n : width;
      for (int64_t k0 = p0; k0 < p0 + part_depth; k0 += depth) {
        const int64_t d = std::min(depth, p0 + part_depth - k0), words = (d + unit - 1) / unit;
        PackA<kDot>(pr.a, i0, rows, k0, d, ap);
        for (int64_t q = 0; q < panels; ++q) {
          const int64_t cols = std::min(kCols, width - q * kCols);
          const float* bq = bp + q * part_words * kCols + (k0 - p0) / unit * kCols;
          for (int64_t p = 0; p * kRows < rows; ++p)
            Tile<kDot>(words, ap + p * words * kRows, bq, c + p * kRows * ldc + q * kCols, ldc,
                       std::min(kRows, rows - p * kRows), cols, k0 > 0);
        }
      }
      if (!direct && p0 + part >= K)  // the last part: C's rows are complete
        for (int64_t i = 0; i < rows; ++i)
          RoundRow(c + i * width, width, static_cast<uint16_t*>(pr.c) + (i0 + i) * pr.n + n0,
                   pr.bias ? pr.bias + n0 : nullptr, LowTerm(pr, i0 + i, n0));
    }
  }
}


#if defined(__AVX512F__)
// float32 operands (the `fma` variant's own dtype) take a path of their own, which reads a
// row-major A where it lies instead of packing it: down kRows row pointers, the tile's
// kRows x kDirectDepth block of A staying in L1 while the tile walks all of a column block's B
// panels (packed as in Block, streaming from L2), so the transposing copy that packing A makes
// is not needed (on the packed path it took ~7% of MiniLM's float32 LoRA step's cycles). A
// transposed A holds a panel's kRows values of each word side by side already; its panels are
// copied (no transpose) to be contiguous, since its rows can be pages apart (read in place, a
// [2048, 2048]^T A ran at 178 GFLOP/s, copied at 287). Rows of C in blocks of kBlockRows,
// columns in blocks of kDirectCols (a pass's slice of a column block's packed B, kDirectDepth x
// kDirectCols float32 values, stays in the core's L2 cache).
constexpr int64_t kDirectDepth = 384;  // at most this many values of K per pass over C
constexpr int64_t kDirectCols = 384;   // columns of C per block

// StoreTile for a gated product's last pass (Problem's gate): each value v (the tile's, plus
// C's when `accumulate`) is stored as v gelu'(y + b), y's rows ldc apart as C's and b at the
// tile's columns, and the tile's column sums of the stored values are added to sums[0:cols].
__attribute__((always_inline)) inline void StoreGated(const __m512 (&acc)[kRows][2], float* c,
                                                      int64_t ldc, int64_t rows, int64_t cols,
                                                      bool accumulate, const float* y,
                                                      const float* b, float* sums) {
  const __mmask16 lo = FirstLanes(cols), hi = FirstLanes(cols - 16);
  const __m512 b0 = _mm512_maskz_loadu_ps(lo, b), b1 = _mm512_maskz_loadu_ps(hi, b + 16);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i) {
    if (i >= rows) break;
    float* ci = c + i * ldc;
    const float* yi = y + i * ldc;
    __m512 v0 = acc[i][0], v1 = acc[i][1];
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(lo, ci));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(hi, ci + 16));
    }
    // Lanes past `cols` hold 0 (B's panels are zero-padded), and stay 0.
    v0 = _mm512_mul_ps(v0, SlopeV(_mm512_add_ps(_mm512_maskz_loadu_ps(lo, yi), b0)));
    v1 = _mm512_mul_ps(v1, SlopeV(_mm512_add_ps(_mm512_maskz_loadu_ps(hi, yi + 16), b1)));
    _mm512_mask_storeu_ps(ci, lo, v0);
    _mm512_mask_storeu_ps(ci + 16, hi, v1);
    s0 = _mm512_add_ps(s0, v0);
    s1 = _mm512_add_ps(s1, v1);
  }
  _mm512_mask_storeu_ps(sums, lo, _mm512_add_ps(_mm512_maskz_loadu_ps(lo, sums), s0));
  _mm512_mask_storeu_ps(sums + 16, hi, _mm512_add_ps(_mm512_maskz_loadu_ps(hi, sums + 16), s1));
}

// Where a tile's gate reads and sums (Problem's gate): y and b at the tile's origin, the task's
// column sums at its first column; y null: no gate.
struct TileGate {
  const float* y = nullptr;
  const float* b = nullptr;
  float* sums = nullptr;
};

// C[i][0:cols] (+)= init[0:cols] + sum_t rows_a[i][t * step] b[t * kCols + 0:cols] for
// i < rows, t < depth; `init` (a bias) may be null (zeros); with a gate, stored through
// StoreGated. rows_a holds kRows pointers (rows past `rows` repeat a valid one; their results
// are dropped).
void TileDirect(int64_t depth, const float* const* rows_a, int64_t step, const float* b,
                float* c, int64_t ldc, int64_t rows, int64_t cols, bool accumulate,
                const float* init = nullptr, TileGate gate = {}) {
  __m512 acc[kRows][2];
  const __m512 init0 = init ? _mm512_maskz_loadu_ps(FirstLanes(cols), init) : _mm512_setzero_ps();
  const __m512 init1 =
      init ? _mm512_maskz_loadu_ps(FirstLanes(cols - 16), init + 16) : _mm512_setzero_ps();
  for (int i = 0; i < kRows; ++i) {
    acc[i][0] = init0;
    acc[i][1] = init1;
  }
  const float* a[kRows];
  for (int i = 0; i < kRows; ++i) a[i] = rows_a[i];
  for (int64_t t = 0, o = 0; t < depth; ++t, o += step) {
    const __m512 b0 = _mm512_load_ps(b + t * kCols), b1 = _mm512_load_ps(b + t * kCols + 16);
    // B's panels stream from L2 while A's block stays in L1: fetch 32 words (4 KB) ahead
    // (8 words ahead: 5-10% slower at MiniLM's shapes).
    _mm_prefetch(reinterpret_cast<const char*>(b + (t + 32) * kCols), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + (t + 32) * kCols + 16), _MM_HINT_T0);
#pragma GCC unroll 12
    for (int i = 0; i < kRows; ++i) {
      const __m512 x = _mm512_set1_ps(a[i][o]);
      acc[i][0] = _mm512_fmadd_ps(x, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(x, b1, acc[i][1]);
    }
  }
  if (gate.y)
    StoreGated(acc, c, ldc, rows, cols, accumulate, gate.y, gate.b, gate.sums);
  else
    StoreTile(acc, c, ldc, rows, cols, accumulate);
}

// C[m0:m1, n0:n1] for float32 A, B and C (see TileDirect), K in parts of at most kPackDepth
// (B's panels packed once per part and column block) and passes of at most kDirectDepth, the
// first pass's accumulators starting from pr.bias where there is one; then a2 b2 added to each
// block of rows while its C is still in cache. With `sums` (a row-major A), the column sums of
// A's rows m0 .. m1 are added to it, each 12-row panel just before its tiles read it; with a
// gate, the last pass stores through it, adding the column sums to `gate_sums` ([n]).
void BlockDirect(const Problem& pr, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                 float* sums = nullptr, float* gate_sums = nullptr) {
  const int64_t K = pr.k;
  // A transposed A (a weight gradient x^T g: few rows of C, K the tokens) packs B one pass at a
  // time, which then serves all of the task's rows from L2: in parts of 2048, each block of 96
  // rows streamed its part's B from L3 again (alone, at MiniLM's shapes 243-267 GFLOP/s against
  // 261-283 one pass at a time; MiniLM's float32 full step showed no difference beyond its
  // noise, ~1%, where the dgrad has just read g).
  const int64_t pack_depth = pr.a.transposed ? kDirectDepth : kPackDepth;
  const int64_t parts = (K + pack_depth - 1) / pack_depth, part = (K + parts - 1) / parts;
  const int64_t passes = (part + kDirectDepth - 1) / kDirectDepth;
  const int64_t depth = (part + passes - 1) / passes;
  const float* a = static_cast<const float*>(pr.a.p);
  const int64_t step = pr.a.transposed ? kRows : 1;
  Scratch b_scratch(0), a_scratch(1), b2_scratch(2);
  float* ap = a_scratch.Get(pr.a.transposed ? kBlockRows * kDirectDepth + 16 : 0);
  float* b2p = pr.rank ? b2_scratch.Get(RoundUp(std::min(n1 - n0, kDirectCols), kCols) *
                                        pr.rank) : nullptr;
  float* bp = b_scratch.Get(RoundUp(std::min(n1 - n0, kDirectCols), kCols) * part);
  for (int64_t j0 = n0; j0 < n1; j0 += kDirectCols) {
    const int64_t width = std::min(kDirectCols, n1 - j0), panels = (width + kCols - 1) / kCols;
    if (pr.rank) PackB<false>(pr.b2, 0, pr.rank, j0, width, b2p);
    for (int64_t p0 = 0; p0 < K; p0 += part) {
      const int64_t part_depth = std::min(part, K - p0);
      PackB<false>(pr.b, p0, part_depth, j0, width, bp);
      for (int64_t i0 = m0; i0 < m1; i0 += kBlockRows) {
        const int64_t rows = std::min(kBlockRows, m1 - i0);
        float* c = static_cast<float*>(pr.c) + i0 * pr.n + j0;
        for (int64_t k0 = p0; k0 < p0 + part_depth; k0 += depth) {
          const int64_t d = std::min(depth, p0 + part_depth - k0);
          if (pr.a.transposed)
            // A's panels for these rows and this pass, word t of panel p = row k0 + t of a from
            // column i0 + p kRows: kRows values in a row, copied to be contiguous (a is read
            // once; its rows can be a page apart), row by row of a, each row's run of `rows`
            // values read in order (panel by panel, down a's rows, the copies had ~1/6 of a
            // weight gradient's time).
            for (int64_t t = 0; t < d; ++t) {
              const float* src = a + (k0 + t) * pr.a.ld + i0;
              for (int64_t p = 0; p * kRows < rows; ++p) {
                const __mmask16 lanes = FirstLanes(std::min(kRows, rows - p * kRows));
                _mm512_mask_storeu_ps(ap + (p * d + t) * kRows, FirstLanes(kRows),
                                      _mm512_maskz_loadu_ps(lanes, src + p * kRows));
              }
            }
          const bool gated = pr.gate_y && k0 + d >= K;  // the last pass: C is complete
          for (int64_t p = 0; p * kRows < rows; ++p) {
            const int64_t height = std::min(kRows, rows - p * kRows);
            const float* rows_a[kRows];
            if (pr.a.transposed) {
              for (int64_t i = 0; i < kRows; ++i) rows_a[i] = ap + p * d * kRows + i;
            } else {
              for (int64_t i = 0; i < kRows; ++i)
                rows_a[i] = a + (i0 + p * kRows + std::min(i, height - 1)) * pr.a.ld + k0;
              if (sums && j0 == n0) AddRows(rows_a[0], pr.a.ld, height, d, sums + k0);
            }
            for (int64_t q = 0; q < panels; ++q) {
              const int64_t col = j0 + q * kCols;
              TileGate gate;
              if (gated)
                gate = {pr.gate_y + (i0 + p * kRows) * pr.n + col, pr.gate_b + col,
                        gate_sums + col};
              TileDirect(d, rows_a, step, bp + (q * part_depth + (k0 - p0)) * kCols,
                         c + p * kRows * pr.n + q * kCols, pr.n, height,
                         std::min(kCols, width - q * kCols), k0 > 0,
                         pr.bias && k0 == 0 ? pr.bias + col : nullptr, gate);
            }
          }
        }
        if (pr.rank && p0 + part >= K) {  // the last part: add a2 b2 to these rows
          for (int64_t p = 0; p * kRows < rows; ++p) {
            const int64_t height = std::min(kRows, rows - p * kRows);
            const float* rows_a2[kRows];
            for (int64_t i = 0; i < kRows; ++i)
              rows_a2[i] = pr.a2 + (i0 + p * kRows + std::min(i, height - 1)) * pr.rank;
            for (int64_t q = 0; q < panels; ++q)
              TileDirect(pr.rank, rows_a2, 1, b2p + q * pr.rank * kCols,
                         c + p * kRows * pr.n + q * kCols, pr.n, height,
                         std::min(kCols, width - q * kCols), true);
          }
        }
      }
    }
  }
}
#endif


#if defined(FTJAX_AMX)
// The amx variant: Intel AMX's tile registers (Sapphire Rapids and later). A tile holds 16 rows
// of 64 bytes; TDPBF16PS adds to a 16 x 16 float32 tile of C the products of a 16 x 32 bfloat16
// tile of A (16 rows of 16 pairs along K) and a tile of B holding, in each of its 16 rows, the
// pairs of two consecutive rows of B for 16 columns: the `dot` variant's packed B panels are
// that layout already (kCols = 32 columns: two tiles side by side). Each step works on a 32 x 32
// block of C in tiles 0-3, reading two tiles of A (4, 5) and two of B (6, 7), for the whole of
// a part of K, so C leaves the tiles once per part.
constexpr int64_t kTileWords = 16;      // words (bfloat16 pairs) in a tile row
constexpr int64_t kAmxRows = 32;        // rows of C per step (two tiles)
constexpr int64_t kAmxBlockRows = 64;   // rows of A packed together (a multiple of kAmxRows)
constexpr int64_t kAmxPackedB = 1 << 20;   // bytes of packed B per part, at most (L2)
constexpr int64_t kAmxMinPart = 256;   // words of K per part, at least

// A(m, k) for m in [m0, m0 + rows), k in [k0, k0 + depth) as rows of bfloat16 pairs:
// dst[i * stride + t] = the pair A(m0 + i, k0 + 2t), A(m0 + i, k0 + 2t + 1) for t < words,
// i < RoundUp(rows, kAmxRows), zero past the depth and the rows.
void PackAmxA(const Operand& a, int64_t m0, int64_t rows, int64_t k0, int64_t depth,
              int64_t words, int64_t stride, float* dst) {
  const int64_t padded = RoundUp(rows, kAmxRows);
  if (!a.transposed) {
    for (int64_t i = 0; i < padded; ++i)
      for (int64_t t0 = 0; t0 < words; t0 += 16)
        _mm512_store_ps(dst + i * stride + t0,
                        i < rows ? LoadPairs(a, (m0 + i) * a.ld + k0 + 2 * t0, depth - 2 * t0)
                                 : _mm512_setzero_ps());
    return;
  }
  // A(m, k) = a[k * ld + m]: PairRuns gives one word of 16 consecutive rows; a 16 x 16
  // transpose turns 16 of those into 16 words of each row.
  for (int64_t i0 = 0; i0 < padded; i0 += 16) {
    const __mmask16 lanes = FirstLanes(rows - i0);
    for (int64_t t0 = 0; t0 < words; t0 += 16) {
      __m512 r[16];
      for (int64_t t = 0; t < 16; ++t) {
        const int64_t k = k0 + 2 * (t0 + t), at = m0 + i0;
        r[t] = 2 * (t0 + t) < depth
                   ? PairRuns(a, k * a.ld + at, (k + 1) * a.ld + at, 2 * (t0 + t) + 1 < depth,
                              lanes)
                   : _mm512_setzero_ps();
      }
      Transpose16(r);
      for (int64_t i = 0; i < 16; ++i) _mm512_store_ps(dst + (i0 + i) * stride + t0, r[i]);
    }
  }
}

// Tiles 0-3 (the 32 x 32 block of C: rows 0-15 and 16-31 by columns 0-15 and 16-31) plus the
// products of 32 packed rows of A (`a`, `stride` words apart) and a packed B panel, over
// `words` words (a multiple of kTileWords).
inline void AmxSteps(const float* a, int64_t stride, const float* b, int64_t words) {
  for (int64_t t0 = 0; t0 < words; t0 += kTileWords) {
    _tile_loadd(4, a + t0, stride * 4);
    _tile_loadd(5, a + 16 * stride + t0, stride * 4);
    _tile_loadd(6, b + t0 * kCols, kCols * 4);
    _tile_loadd(7, b + t0 * kCols + 16, kCols * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// Tiles 0-3 from or to a 32 x 32 float32 block (row-major, kCols floats a row).
inline void LoadC(const float* c) {
  _tile_loadd(0, c, kCols * 4);
  _tile_loadd(1, c + 16, kCols * 4);
  _tile_loadd(2, c + 16 * kCols, kCols * 4);
  _tile_loadd(3, c + 16 * kCols + 16, kCols * 4);
}
inline void StoreC(float* c) {
  _tile_stored(0, c, kCols * 4);
  _tile_stored(1, c + 16, kCols * 4);
  _tile_stored(2, c + 16 * kCols, kCols * 4);
  _tile_stored(3, c + 16 * kCols + 16, kCols * 4);
}

// As Block, on tiles: K in parts of at most 2 * kPackDepth values (B's panels packed once per
// part), blocks of kAmxBlockRows rows of A packed for the whole part, and each 32 x 32 block of
// C accumulated in tiles over the part; with more than one part, C's blocks wait in float32
// scratch between parts.
void BlockAmx(const Problem& pr, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = pr.k, width = n1 - n0, panels = (width + kCols - 1) / kCols;
  // Parts small enough that the task's packed B stays in the core's L2 cache (each block of A
  // streams it once), but at least kAmxMinPart words (C leaves the tiles once per part).
  const int64_t budget = std::max(kAmxMinPart, std::min(kPackDepth, kAmxPackedB / (width * 4)));
  const int64_t parts = (K + 2 * budget - 1) / (2 * budget);
  const int64_t part = RoundUp((K + parts - 1) / parts, 2 * kTileWords);
  const int64_t stride = part / 2;  // words per packed row, a multiple of kTileWords
  Scratch b_scratch(0), a_scratch(1), c_scratch(2);
  float* bp = b_scratch.Get(panels * kCols * stride);
  float* ap = a_scratch.Get(kAmxBlockRows * stride);
  const int64_t groups = (m1 - m0 + kAmxRows - 1) / kAmxRows;
  float* acc = parts > 1 ? c_scratch.Get(groups * panels * kAmxRows * kCols) : nullptr;
  alignas(64) float block[kAmxRows * kCols];
  Tiles tiles;
  for (int64_t p0 = 0; p0 < K; p0 += part) {
    const int64_t depth = std::min(part, K - p0);
    const int64_t words = RoundUp((depth + 1) / 2, kTileWords);
    const bool first = p0 == 0, last = p0 + part >= K;
    PackB<true>(pr.b, p0, depth, n0, width, bp, stride);
    for (int64_t i0 = m0; i0 < m1; i0 += kAmxBlockRows) {
      const int64_t rows = std::min(kAmxBlockRows, m1 - i0);
      PackAmxA(pr.a, i0, rows, p0, depth, words, stride, ap);
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t cols = std::min(kCols, width - q * kCols);
        for (int64_t g = 0; g < rows; g += kAmxRows) {
          float* saved = acc ? acc + (((i0 - m0 + g) / kAmxRows) * panels + q) * kAmxRows * kCols
                             : nullptr;
          if (first) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            LoadC(saved);
          }
          AmxSteps(ap + g * stride, stride, bp + q * stride * kCols, words);
          StoreC(last ? block : saved);
          if (!last) continue;
          const int64_t height = std::min(kAmxRows, rows - g);
          const float* bias = pr.bias ? pr.bias + n0 + q * kCols : nullptr;
          for (int64_t i = 0; i < height; ++i) {
            const int64_t at = (i0 + g + i) * pr.n + n0 + q * kCols;
            // A bias comes only with Dense, whose bfloat16 products have a bfloat16 C.
            if (pr.c_bf16)
              RoundRow(block + i * kCols, cols, static_cast<uint16_t*>(pr.c) + at, bias,
                       LowTerm(pr, i0 + g + i, n0 + q * kCols));
            else
              std::memcpy(static_cast<float*>(pr.c) + at, block + i * kCols, cols * 4);
          }
        }
      }
    }
  }
}
#endif


// Dense's extras over a complete float32 C, in plain loops (the portable path, and a product
// with nothing to multiply): the bias added to C, A's column sums added to a_sums [k], and the
// gate applied to C with its column sums added to gate_sums [n]; each only where pr asks. A
// bfloat16 product's bias and sums are not its to add (Block and Run add them).
void ApplyExtras(const Problem& pr, float* a_sums, float* gate_sums) {
  if (pr.a.bf16) return;
  float* c = static_cast<float*>(pr.c);
  for (int64_t i = 0; pr.bias && i < pr.m; ++i)
    for (int64_t j = 0; j < pr.n; ++j) c[i * pr.n + j] += pr.bias[j];
  for (int64_t i = 0; pr.sums && i < pr.m; ++i)
    for (int64_t t = 0; t < pr.k; ++t) a_sums[t] += pr.a.At(i, t);
  for (int64_t i = 0; pr.gate_y && i < pr.m; ++i)
    for (int64_t j = 0; j < pr.n; ++j) {
      c[i * pr.n + j] *= Slope(pr.gate_y[i * pr.n + j] + pr.gate_b[j]);
      gate_sums[j] += c[i * pr.n + j];
    }
}

// Splits C into tasks: across the larger of its two dimensions, one part per thread (each task
// packs its own share of B and all of its rows of A), with at most kTaskCols columns each, and
// a multiple of the threads in all where there is work enough (3 equal tasks on 2 threads
// take as long as 4).
void Run(ffi::ThreadPool& pool, const Problem& pr, Variant variant) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t row_parts = 1, col_parts = (pr.n + kTaskCols - 1) / kTaskCols;
  const int64_t max_cols = (pr.n + kCols - 1) / kCols;
  if (pr.m > pr.n)
    row_parts = std::max<int64_t>(1, std::min(threads, (pr.m + kRows - 1) / kRows));
  else
    col_parts = std::min(max_cols, RoundUp(col_parts, threads));
  const int64_t row_step = RoundUp((pr.m + row_parts - 1) / row_parts, kRows);
  const int64_t col_step = RoundUp((pr.n + col_parts - 1) / col_parts, kCols);
  row_parts = (pr.m + row_step - 1) / row_step;
  col_parts = (pr.n + col_step - 1) / col_step;
  const int64_t tasks = row_parts * col_parts;
  // Dense's column sums of A: each task that computes C's first columns sums its own rows; the
  // partial sums are combined in task order (the same value whichever thread ran a task).
  std::vector<float> partial(pr.sums ? tasks * pr.k : 0, 0.0f);
  // The gate's column sums of C: each task its own columns of its own rows, combined likewise.
  std::vector<float> gated(pr.gate_y ? tasks * pr.n : 0, 0.0f);
  ParallelFor(pool, tasks, [&](int64_t task) {
    const int64_t m0 = (task / col_parts) * row_step, n0 = (task % col_parts) * col_step;
    const int64_t m1 = std::min(pr.m, m0 + row_step), n1 = std::min(pr.n, n0 + col_step);
    if (pr.sums && pr.a.bf16 && n0 == 0)  // A bfloat16 A's column sums: its rows, read once more.
      AddRows(pr.a.Bf16(m0 * pr.a.ld), pr.a.ld, m1 - m0, pr.k, partial.data() + task * pr.k);
#if defined(FTJAX_AMX)
    if (variant == Variant::kAmx) return BlockAmx(pr, m0, m1, n0, n1);
#endif
#if defined(__AVX512BF16__)  // elsewhere the `dot` variant runs as `fma`
    if (variant != Variant::kFma) return Block<true>(pr, m0, m1, n0, n1);
#endif
#if defined(__AVX512F__)
    if (!pr.a.bf16 && !pr.c_bf16)
      return BlockDirect(pr, m0, m1, n0, n1,
                         pr.sums && n0 == 0 ? partial.data() + task * pr.k : nullptr,
                         pr.gate_y ? gated.data() + task * pr.n : nullptr);
#endif
    Block<false>(pr, m0, m1, n0, n1);
  });
#if !defined(__AVX512F__)  // Block, the portable path, leaves Dense's extras to these loops.
  ApplyExtras(pr, partial.data(), gated.data());
#endif
  if (pr.sums) SumTasks(partial.data(), tasks, pr.k, pr.k, pr.sums);
  if (pr.gate_y) SumTasks(gated.data(), tasks, pr.n, pr.n, pr.gate_sums);
}

bool Supported(ffi::DataType t) { return t == ffi::F32 || t == ffi::BF16; }

// The variant that runs a product (Matmul's and Dense's `variant` attribute): float32 operands
// always `fma`; for bfloat16 the one asked, `amx` as `dot` where the CPU has no AMX tiles (and
// `dot` as `fma` where it lacks vdpbf16ps, in Run). False for an unknown one.
bool Resolve(int32_t variant, bool bf16, Variant* v) {
  if (variant < 0 || variant > 2) return false;
  *v = bf16 ? static_cast<Variant>(variant) : Variant::kFma;
  if (*v == Variant::kAmx && !AmxAvailable()) *v = Variant::kDot;
  return true;
}

// `variant` (Variant) applies to bfloat16 operands: `amx` where the CPU has AMX (elsewhere it
// runs as `dot`), `dot` where it has vdpbf16ps (elsewhere as `fma`). All give the same values up
// to float32 rounding; float32 operands always run on `fma`.
ffi::Error Matmul(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, bool transpose_a,
                  bool transpose_b, int32_t variant, ffi::Result<ffi::AnyBuffer> c) {
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
  Variant v;
  if (!Resolve(variant, bf16, &v)) return ffi::Error::InvalidArgument("matmul: unknown variant");
  Run(pool, pr, v);
  return ffi::Error::Success();
}

// C = a op(b) + a2 op(b2) (+ bias): a [m, k] and b [k, n] (or [n, k] with transpose_b) both
// float32 or both bfloat16, C in their dtype; a2 [m, rank], b2 [rank, n] (or [n, rank] with
// transpose_b2) and bias [n] or [0] (none) float32. A LoRA layer's output x W + b + (s x A) B,
// and its input gradient g W^T + (s g B^T) A^T, in one pass over C: float32 on the direct path
// (BlockDirect adds a2 b2 to each block of rows while it is in cache); bfloat16 multiplied by
// `variant` (as in Matmul), a2 b2 added to each complete float32 row before its one rounding.
ffi::Error MatmulPlus(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                      ffi::Buffer<ffi::F32> a2, ffi::Buffer<ffi::F32> b2,
                      ffi::Buffer<ffi::F32> bias, bool transpose_a, bool transpose_b,
                      bool transpose_b2, int32_t variant, ffi::Result<ffi::AnyBuffer> c) {
  const auto da = a.dimensions(), db = b.dimensions(), da2 = a2.dimensions(),
             db2 = b2.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || da2.size() != 2 || db2.size() != 2 || dc.size() != 2 ||
      bias.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("matmul_plus operands and result must be matrices");
  const bool bf16 = a.element_type() == ffi::BF16;
  if (!Supported(a.element_type()) || b.element_type() != a.element_type() ||
      c->element_type() != a.element_type())
    return ffi::Error::InvalidArgument(
        "matmul_plus: a, b and c must share a dtype, float32 or bfloat16");
  const int64_t m = transpose_a ? da[1] : da[0], k = transpose_a ? da[0] : da[1];
  const int64_t kb = transpose_b ? db[1] : db[0], n = transpose_b ? db[0] : db[1];
  const int64_t rank = da2[1];
  const int64_t rb = transpose_b2 ? db2[1] : db2[0], n2 = transpose_b2 ? db2[0] : db2[1];
  const int64_t bias_n = bias.dimensions()[0];
  if (k != kb || dc[0] != m || dc[1] != n || da2[0] != m || rb != rank || n2 != n ||
      (bias_n != 0 && bias_n != n))
    return ffi::Error::InvalidArgument("matmul_plus shapes do not match");
  Variant v;
  if (!Resolve(variant, bf16, &v))
    return ffi::Error::InvalidArgument("matmul_plus: unknown variant");
  Problem pr{{a.untyped_data(), da[1], transpose_a, bf16},
             {b.untyped_data(), db[1], transpose_b, bf16},
             m, n, k, c->untyped_data(), bf16, a2.typed_data(),
             {b2.typed_data(), db2[1], transpose_b2, false}, rank};
  pr.bias = bias_n ? bias.typed_data() : nullptr;
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (bf16) {
    // b2's rows, row-major, for RoundRow (rank x n values, a few kilobytes for LoRA).
    std::vector<float> rows(rank * n);
    for (int64_t t = 0; t < rank; ++t)
      for (int64_t j = 0; j < n; ++j) rows[t * n + j] = pr.b2.At(t, j);
    pr.low_b = rows.data();
    if (k > 0) {
      Run(pool, pr, v);
      return ffi::Error::Success();
    }
    // No first product: each row is the bias plus the low-rank term, rounded.
    const std::vector<float> zeros(n, 0.0f);
    for (int64_t i = 0; i < m; ++i)
      RoundRow(zeros.data(), n, static_cast<uint16_t*>(pr.c) + i * n, pr.bias, LowTerm(pr, i, 0));
    return ffi::Error::Success();
  }
  float* out = static_cast<float*>(pr.c);
  if (k == 0) {  // No first product: C = bias (or 0), then the second product below.
    std::fill(out, out + m * n, 0.0f);
    ApplyExtras(pr, nullptr, nullptr);
  }
#if defined(__AVX512F__)
  // BlockDirect adds the second product itself.
  if (k > 0) {
    Run(pool, pr, Variant::kFma);
    return ffi::Error::Success();
  }
#else
  if (k > 0) Run(pool, pr, Variant::kFma);
#endif
  // The second product on its own (a build without AVX-512, or an empty first product).
  const Operand x{pr.a2, rank, false, false};
  for (int64_t i = 0; i < m; ++i)
    for (int64_t t = 0; t < rank; ++t) {
      const float xv = x.At(i, t);
      for (int64_t j = 0; j < n; ++j) out[i * n + j] += xv * pr.b2.At(t, j);
    }
  return ffi::Error::Success();
}

// A dense layer's products with their bias terms: C = A op(B) + bias (the forward, with the
// bias as the accumulators' start, or added to a bfloat16 C's float32 rows before their one
// rounding, instead of a pass of its own) and, with `sums` set, also the column sums of A (the
// backward's input gradient g W^T, whose g's column sums are the bias gradient). With a gate
// (gate_b not empty; float32 only), C is the input gradient of a layer whose input was
// gelu(gate_y + gate_b): each complete value times gelu'(gate_y + gate_b), and gate_sums its
// column sums (gate_b's gradient), so that the gradient g W^T is never written as such. A [m, k]
// row-major; B [k, n] or, transposed, [n, k]; A, B and C float32, or all bfloat16 (multiplied
// by `variant`, as in Matmul); bias [n] or [0] (none); sums [k] or [0] (not asked for); gate_y
// [m, n], gate_b and gate_sums [n], or [0] each; all of these float32.
ffi::Error Dense(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                 ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> gate_y,
                 ffi::Buffer<ffi::F32> gate_b, bool transpose_b, int32_t variant,
                 ffi::Result<ffi::AnyBuffer> c, ffi::Result<ffi::Buffer<ffi::F32>> sums,
                 ffi::Result<ffi::Buffer<ffi::F32>> gate_sums) {
  const auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2 || bias.dimensions().size() != 1 ||
      sums->dimensions().size() != 1 || gate_b.dimensions().size() != 1 ||
      gate_sums->dimensions().size() != 1)
    return ffi::Error::InvalidArgument("dense: operands must be matrices, bias and sums vectors");
  const bool bf16 = a.element_type() == ffi::BF16;
  if (!Supported(a.element_type()) || b.element_type() != a.element_type() ||
      c->element_type() != a.element_type())
    return ffi::Error::InvalidArgument(
        "dense: a, b and c must share a dtype, float32 or bfloat16");
  const int64_t m = da[0], k = da[1];
  const int64_t kb = transpose_b ? db[1] : db[0], n = transpose_b ? db[0] : db[1];
  const int64_t bias_n = bias.dimensions()[0], sums_k = sums->dimensions()[0];
  const bool gated = gate_b.dimensions()[0] != 0;
  if (k != kb || dc[0] != m || dc[1] != n || (bias_n != 0 && bias_n != n) ||
      (sums_k != 0 && sums_k != k) ||
      (gated && (bf16 || gate_b.dimensions()[0] != n ||
                 static_cast<int64_t>(gate_y.element_count()) != m * n ||
                 gate_sums->dimensions()[0] != n)))
    return ffi::Error::InvalidArgument("dense shapes do not match (or a bfloat16 gate)");
  Variant v;
  if (!Resolve(variant, bf16, &v)) return ffi::Error::InvalidArgument("dense: unknown variant");
  Problem pr{{a.untyped_data(), k, false, bf16}, {b.untyped_data(), db[1], transpose_b, bf16},
             m, n, k, c->untyped_data(), bf16};
  pr.bias = bias_n ? bias.typed_data() : nullptr;
  pr.sums = sums_k ? sums->typed_data() : nullptr;
  if (gated) {
    pr.gate_y = gate_y.typed_data();
    pr.gate_b = gate_b.typed_data();
    pr.gate_sums = gate_sums->typed_data();
  }
  if (m == 0 || n == 0 || k == 0) {  // No product to run: C = 0, then the extras.
    std::fill(sums->typed_data(), sums->typed_data() + sums_k, 0.0f);
    std::fill(gate_sums->typed_data(), gate_sums->typed_data() + (gated ? n : 0), 0.0f);
    if (!bf16) {
      std::fill(static_cast<float*>(pr.c), static_cast<float*>(pr.c) + m * n, 0.0f);
      ApplyExtras(pr, pr.sums, pr.gate_sums);
      return ffi::Error::Success();
    }
    uint16_t* out = static_cast<uint16_t*>(pr.c);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) out[i * n + j] = F32ToBf16(pr.bias ? pr.bias[j] : 0.0f);
    if (pr.sums) AddRows(pr.a.Bf16(0), k, m, k, pr.sums);
    return ffi::Error::Success();
  }
  Run(pool, pr, v);
  return ffi::Error::Success();
}

}  // namespace

// For the Python side (ctypes): whether the amx variant runs here (1) or falls back (0).
extern "C" int FtjaxMatmulHasAmx() { return AmxAvailable() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b")
                                  .Attr<int32_t>("variant")  // 0 fma, 1 dot, 2 amx
                                  .Ret<ffi::AnyBuffer>());  // c

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxMatmulPlus, MatmulPlus,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias, [n] or [0]
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b")
                                  .Attr<bool>("transpose_b2")
                                  .Attr<int32_t>("variant")  // bfloat16: 0 fma, 1 dot, 2 amx
                                  .Ret<ffi::AnyBuffer>());  // c

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxDense, Dense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias, [n] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate_y, [m, n] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate_b, [n] or [0] (none)
                                  .Attr<bool>("transpose_b")
                                  .Attr<int32_t>("variant")  // bfloat16: 0 fma, 1 dot, 2 amx
                                  .Ret<ffi::AnyBuffer>()   // c
                                  .Ret<ffi::Buffer<ffi::F32>>()   // sums, [k] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // gate_sums, [n] or [0]
