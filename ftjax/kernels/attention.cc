// Fused scaled dot-product attention for XLA:CPU, as two XLA FFI custom calls (forward and
// backward) that ftjax.kernels builds with the machine's C++ compiler and registers with jax.
//
// Why: XLA:CPU lowers attention to batched matmuls of tiny per-head products (e.g. 128 x 32 x
// 128 for MiniLM) that run at a fraction of the machine's matmul speed, plus a materialised
// [B, G, Q, S] logits tensor per layer that travels through memory several times. Here each
// (batch, kv head) pair is one task that keeps its keys, values and a block of logits in
// cache-sized scratch, in float32, the way a fused CPU attention kernel (e.g. PyTorch's) does.
// The products multiply with float32 FMAs (`fma`), or, for bfloat16 operands where the custom
// call's `dot` attribute asks and the CPU has the instruction, with vdpbf16ps on pairs of
// bfloat16 packed from that scratch (`dot`; the values there are bfloat16 values exactly), or,
// where `amx` asks and the CPU has AMX, on its tiles over the same pairs (`amx`; products whose
// sizes are not whole tiles run as `dot`).
//
// Semantics are those of ftjax.models.layers._attention (the XLA path, kept as the reference):
//   logits = q k^T * scale + bias (float32), probs = exp(logits - max) / sum,
//   dropped = round(probs) to the value dtype, then the hash-based dropout of layers._keep,
//   out = dropped v (float32 accumulation), rounded to the output dtype;
// the backward pass recomputes logits and probabilities from the saved row maximum and
// normaliser, as that path does, and rounds d_logits to q's dtype before the dq and dk products.
//
// Layouts (row-major), token-major as the model's projections produce them, so that no
// transposing copy runs before or after the kernel: q [B, L, H, K] with H = G * R query heads,
// R of them per key/value head; k, v [B, S, G, K]; out [B, L, H, K]. Each (batch, kv head) pair
// sees its Q = R * L query rows stacked along one axis: row r is head g * R + r / L at token
// r % L. The row statistics are [B, G, Q, 1] in that order; the bias is float32
// [Bb, Gb, Qb, Sb] with Bb in {1, B}, Gb in {1, G}, Sb in {1, S} and Q % Qb == 0 (query row r
// reads bias row r % Qb: the R heads of a kv head share their bias rows without tiling it).
// q, k, v share one dtype, float32 or bfloat16.
// The forward pass also returns the dropout keep-mask as uint16 words [B, G, Q, ceil(S / 16)]
// (bit i of word w: key 16 w + i; a single unused word without dropout), which the backward
// pass reads instead of hashing again.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

namespace {

using namespace ftjax;  // NOLINT: the shared helpers of common.h

constexpr int64_t kLanes = 16;     // float32 lanes of one AVX-512 register: padding unit.
constexpr int64_t kRowTile = 8;    // rows padding unit: a multiple of every register tile's.
constexpr int64_t kRowBlock = 64;  // query rows per block of logits kept in scratch.
#if defined(__AVX512BF16__)
constexpr bool kHasDot = true;     // the `dot` variant: bfloat16 products on vdpbf16ps
#else
constexpr bool kHasDot = false;    // elsewhere the `dot` variant runs as `fma`
#endif

inline uint32_t Bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return bits;
}



// Rounds a float32 value to what the dtype T holds (bfloat16 or float32 itself).
template <typename T> inline float Round(float x) { return x; }
template <> inline float Round<uint16_t>(float x) { return RoundBf16(x); }

#if defined(__AVX512F__)
// The vector form of Round<T> for 16 consecutive columns.
template <typename T> inline __m512 RoundV(__m512 x) { return x; }
template <> inline __m512 RoundV<uint16_t>(__m512 x) {
  // Round to nearest even on the bits (the operands here are finite).
  __m512i bits = _mm512_castps_si512(x);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
  return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(0xffff0000u)));
}

#endif

// Words of the contracted dimension per element of a Gemm operand: float32 values (fma), or
// pairs of bfloat16 values packed into one 32-bit word (dot; see ColumnPairs and RowPairs).
template <bool kDot> constexpr int64_t kUnit = kDot ? 2 : 1;

#if defined(__AVX512F__)
// One MR x (NV * kLanes) register tile of Gemm below.
template <int MR, int NV, bool kDot>
inline void Tile(int64_t reduce, const float* a, int64_t a_row, int64_t a_red, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      acc[i][v] = accumulate ? _mm512_loadu_ps(c + i * ldc + v * kLanes) : _mm512_setzero_ps();
  for (int64_t t = 0; t < reduce; ++t) {
    __m512 bt[NV];
    for (int v = 0; v < NV; ++v) bt[v] = _mm512_loadu_ps(b + t * ldb + v * kLanes);
    for (int i = 0; i < MR; ++i) {
      const __m512 x = _mm512_set1_ps(a[i * a_row + t * a_red]);  // a value, or a pair's bits
      for (int v = 0; v < NV; ++v) {
#if defined(__AVX512BF16__)
        if constexpr (kDot) {
          acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)x, (__m512bh)bt[v]);
          continue;
        }
#endif
        static_assert(!kDot || kHasDot, "the dot variant needs AVX512_BF16");
        acc[i][v] = _mm512_fmadd_ps(x, bt[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + v * kLanes, acc[i][v]);
}
#endif

#if defined(FTJAX_AMX)
// The `amx` variant: the `dot` variant's products on Intel AMX's tiles, where their sizes are
// whole tiles (rows in 16s, contracted words in 16s; the columns always are): the pairs layouts
// of ColumnPairs and RowPairs are what the tiles read (an A tile row: 16 words of one row of a;
// a B tile row: one word of 16 columns of b). Set per task (AmxTask) on the running thread.
thread_local bool amx_on = false;

// While in scope, Gemm<true> runs on the thread's tiles where `wanted` and the CPU allows it.
class AmxTask {
 public:
  explicit AmxTask(bool wanted) {
    if (wanted && AmxAvailable()) {
      tiles_.emplace();
      amx_on = true;
    }
  }
  ~AmxTask() { amx_on = false; }
  AmxTask(const AmxTask&) = delete;
  AmxTask& operator=(const AmxTask&) = delete;

 private:
  std::optional<Tiles> tiles_;
};

// An R x C block of 16 x 16 tiles of C (R, C in {1, 2}: tiles 0-3 by row and column), over
// `reduce` words: A's row tiles in 4 and 5, B's column tiles in 6 and 7.
template <int R, int C>
inline void AmxBlock(int64_t reduce, const float* a, int64_t a_row, const float* b, int64_t ldb,
                     float* c, int64_t ldc, bool accumulate) {
  const int64_t sc = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, c, sc);
    if constexpr (C > 1) _tile_loadd(1, c + 16, sc);
    if constexpr (R > 1) _tile_loadd(2, c + 16 * ldc, sc);
    if constexpr (R > 1 && C > 1) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (C > 1) _tile_zero(1);
    if constexpr (R > 1) _tile_zero(2);
    if constexpr (R > 1 && C > 1) _tile_zero(3);
  }
  for (int64_t t0 = 0; t0 < reduce; t0 += 16) {
    _tile_loadd(4, a + t0, a_row * 4);
    if constexpr (R > 1) _tile_loadd(5, a + 16 * a_row + t0, a_row * 4);
    _tile_loadd(6, b + t0 * ldb, ldb * 4);
    if constexpr (C > 1) _tile_loadd(7, b + t0 * ldb + 16, ldb * 4);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (C > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (R > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (R > 1 && C > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc);
  if constexpr (C > 1) _tile_stored(1, c + 16, sc);
  if constexpr (R > 1) _tile_stored(2, c + 16 * ldc, sc);
  if constexpr (R > 1 && C > 1) _tile_stored(3, c + 16 * ldc + 16, sc);
}

// Gemm<true> on tiles: m a multiple of 16, reduce of 16 words, n of kLanes. An `a` read down
// its columns (a_row 1) is first transposed into rows of words.
void GemmAmx(int64_t m, int64_t n, int64_t reduce, const float* a, int64_t a_row,
             int64_t a_red, const float* b, int64_t ldb, float* c, int64_t ldc,
             bool accumulate) {
  thread_local std::vector<float> rows;
  if (a_red != 1) {
    rows.resize(m * reduce);
    for (int64_t r0 = 0; r0 < m; r0 += 16)
      for (int64_t t0 = 0; t0 < reduce; t0 += 16) {
        __m512 x[16];
        for (int t = 0; t < 16; ++t) x[t] = _mm512_loadu_ps(a + r0 * a_row + (t0 + t) * a_red);
        Transpose16(x);
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(rows.data() + (r0 + i) * reduce + t0, x[i]);
      }
    a = rows.data();
    a_row = reduce;
  }
  for (int64_t i = 0; i < m; i += 32) {
    const bool two_rows = m - i >= 32;
    const float* ai = a + i * a_row;
    for (int64_t j = 0; j < n; j += 32) {
      float* cij = c + i * ldc + j;
      if (n - j >= 32) {
        if (two_rows) AmxBlock<2, 2>(reduce, ai, a_row, b + j, ldb, cij, ldc, accumulate);
        else AmxBlock<1, 2>(reduce, ai, a_row, b + j, ldb, cij, ldc, accumulate);
      } else {
        if (two_rows) AmxBlock<2, 1>(reduce, ai, a_row, b + j, ldb, cij, ldc, accumulate);
        else AmxBlock<1, 1>(reduce, ai, a_row, b + j, ldb, cij, ldc, accumulate);
      }
    }
  }
}
#else
class AmxTask {
 public:
  explicit AmxTask(bool) {}
};
#endif

// C[r][j] (+)= sum_t a[r * a_row + t * a_red] * b[t * ldb + j] for r < m (a multiple of
// kRowTile), j < n (a multiple of kLanes), t < reduce words. One kernel serves the products of
// attention: q k^T (a = q rows, b = k^T), p v and ds k (a = a block of [rows, S], b = v or k),
// and the transposed ds^T q and p^T g (a read down its columns). Register tiles of 4 x 64 where
// n allows, else 8 x 32 or 8 x 16 (a head size of 32 or 16): about 16 accumulators each. With
// kDot, a and b hold bfloat16 pairs along the contracted dimension and each word is one
// vdpbf16ps step (two products).
template <bool kDot>
void Gemm(int64_t m, int64_t n, int64_t reduce, const float* a, int64_t a_row, int64_t a_red,
          const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
#if defined(FTJAX_AMX)
  if constexpr (kDot) {
    // The rows that fill tiles on AMX; a tail of 8 rows (kRowTile) as below.
    if (amx_on && reduce % 16 == 0 && m >= 16) {
      const int64_t whole = m / 16 * 16;
      GemmAmx(whole, n, reduce, a, a_row, a_red, b, ldb, c, ldc, accumulate);
      if (whole == m) return;
      a += whole * a_row;
      c += whole * ldc;
      m -= whole;
    }
  }
#endif
#if defined(__AVX512F__)
  for (int64_t j = 0; j < n;) {
    if (n - j >= 4 * kLanes) {
      for (int64_t r = 0; r < m; r += 4)
        Tile<4, 4, kDot>(reduce, a + r * a_row, a_row, a_red, b + j, ldb, c + r * ldc + j, ldc,
                         accumulate);
      j += 4 * kLanes;
    } else if (n - j >= 2 * kLanes) {
      for (int64_t r = 0; r < m; r += 8)
        Tile<8, 2, kDot>(reduce, a + r * a_row, a_row, a_red, b + j, ldb, c + r * ldc + j, ldc,
                         accumulate);
      j += 2 * kLanes;
    } else {
      for (int64_t r = 0; r < m; r += 8)
        Tile<8, 1, kDot>(reduce, a + r * a_row, a_row, a_red, b + j, ldb, c + r * ldc + j, ldc,
                         accumulate);
      j += kLanes;
    }
  }
#else
  static_assert(!kDot, "the dot variant needs AVX512_BF16");
  for (int64_t r = 0; r < m; ++r) {
    float* cr = c + r * ldc;
    if (!accumulate) std::fill(cr, cr + n, 0.0f);
    for (int64_t t = 0; t < reduce; ++t) {
      const float x = a[r * a_row + t * a_red];
      const float* bt = b + t * ldb;
      for (int64_t j = 0; j < n; ++j) cr[j] += x * bt[j];
    }
  }
#endif
}

// The operand x [rows][cols] (row-major, float32 values that bfloat16 holds exactly) of a
// product that contracts its columns: x itself (fma), or (dot) its pairs of adjacent columns,
// [rows][cols / 2] words, written to `pairs`. cols is a multiple of kLanes.
template <bool kDot>
const float* ColumnPairs(const float* x, int64_t rows, int64_t cols, std::vector<float>& pairs) {
  if constexpr (!kDot) return x;
  pairs.resize(rows * cols / 2);
  uint32_t* out = reinterpret_cast<uint32_t*>(pairs.data());
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    uint32_t* dst = out + r * cols / 2;
    int64_t c = 0;
#if defined(__AVX512BW__)
    // The high halves (the bfloat16 bits) of 32 values, in order: 16 words.
    static const __m512i kHigh = [] {
      alignas(64) int16_t index[32];
      for (int i = 0; i < 32; ++i) index[i] = static_cast<int16_t>(2 * i + 1);
      return _mm512_load_si512(index);
    }();
    for (; c + 2 * kLanes <= cols; c += 2 * kLanes)
      _mm512_storeu_si512(dst + c / 2, _mm512_permutex2var_epi16(
          _mm512_castps_si512(_mm512_loadu_ps(row + c)), kHigh,
          _mm512_castps_si512(_mm512_loadu_ps(row + c + kLanes))));
#endif
    for (; c < cols; c += 2) dst[c / 2] = (Bits(row[c]) >> 16) | (Bits(row[c + 1]) & 0xffff0000u);
  }
  return pairs.data();
}

// The operand x [rows][cols] of a product that contracts its rows: x itself (fma), or (dot) its
// pairs of adjacent rows, [rows / 2][cols] words, written to `pairs`. rows is even; cols is a
// multiple of kLanes.
template <bool kDot>
const float* RowPairs(const float* x, int64_t rows, int64_t cols, std::vector<float>& pairs) {
  if constexpr (!kDot) return x;
  pairs.resize(rows / 2 * cols);
  uint32_t* out = reinterpret_cast<uint32_t*>(pairs.data());
  for (int64_t r = 0; r < rows; r += 2) {
    const float *even = x + r * cols, *odd = even + cols;
    uint32_t* dst = out + r / 2 * cols;
    int64_t c = 0;
#if defined(__AVX512F__)
    for (; c < cols; c += kLanes)
      _mm512_storeu_si512(dst + c, _mm512_or_si512(
          _mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(even + c)), 16),
          _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(odd + c)),
                           _mm512_set1_epi32(0xffff0000u))));
#endif
    for (; c < cols; ++c) dst[c] = (Bits(even[c]) >> 16) | (Bits(odd[c]) & 0xffff0000u);
  }
  return pairs.data();
}

// exp(x - shift) over a float32 row in place, returning the row's sum (the softmax normaliser).
float ExpRowAndSum(float* x, int64_t n, float shift) {
  float total = 0.0f;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  for (; j + kLanes <= n; j += kLanes) {
    const __m512 p = ExpV(_mm512_sub_ps(_mm512_loadu_ps(x + j), _mm512_set1_ps(shift)));
    _mm512_storeu_ps(x + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    total += x[j];
  }
  return total;
}

float RowMax(const float* x, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 v = _mm512_set1_ps(top);
  for (; j + kLanes <= n; j += kLanes) v = _mm512_max_ps(v, _mm512_loadu_ps(x + j));
  top = _mm512_reduce_max_ps(v);
#endif
  for (; j < n; ++j) top = std::max(top, x[j]);
  return top;
}


struct Shape {
  int64_t batch, groups, queries, keys, head_dim;
  int64_t repeats, length;  // query heads per kv head and tokens: queries = repeats * length
  // Bias strides (0 where it broadcasts) and its number of query rows.
  int64_t bias_b, bias_g, bias_q, bias_s, bias_rows;

  // Element offsets, in q [B, L, H, K], of (batch b, kv head g)'s query row r; in k or v
  // [B, S, G, K], of its key row s (rows of one pair are groups * head_dim apart).
  int64_t QueryRow(int64_t b, int64_t g, int64_t r) const {
    return ((b * length + r % length) * groups * repeats + g * repeats + r / length) * head_dim;
  }
  int64_t KeyRow(int64_t b, int64_t g, int64_t s) const {
    return ((b * keys + s) * groups + g) * head_dim;
  }
};

ffi::Error ReadShape(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                     const ffi::Buffer<ffi::F32>& bias, Shape* shape) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), bd = bias.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || bd.size() != 4)
    return ffi::Error::InvalidArgument("attention operands and bias must be 4-D");
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("q, k and v must share one dtype");
  if (q.element_type() != ffi::F32 && q.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument("attention supports float32 and bfloat16");
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("k and v shapes differ");
  if (qd[0] != kd[0] || qd[3] != kd[3] || kd[2] == 0 || qd[2] % kd[2] != 0)
    return ffi::Error::InvalidArgument("q and k shapes do not match");
  const int64_t repeats = qd[2] / kd[2];
  *shape = {qd[0], kd[2], repeats * qd[1], kd[1], qd[3], repeats, qd[1], 0, 0, 0, 0, bd[2]};
  const int64_t want[4] = {qd[0], kd[2], repeats * qd[1], kd[1]};
  for (int i = 0; i < 4; ++i)
    if (bd[i] != 1 && bd[i] != want[i] && !(i == 2 && want[2] % bd[2] == 0))
      return ffi::Error::InvalidArgument("bias does not broadcast to the logits");
  shape->bias_s = bd[3] == 1 ? 0 : 1;
  shape->bias_q = bd[2] == 1 ? 0 : bd[3];
  shape->bias_g = bd[1] == 1 ? 0 : bd[2] * bd[3];
  shape->bias_b = bd[0] == 1 ? 0 : bd[1] * bd[2] * bd[3];
  return ffi::Error::Success();
}

// Scratch of one task, reused across the tasks a thread runs.
struct Scratch {
  std::vector<float> k_t, v, k, v_t, q, g, o, logits, probs, d_probs, d_k, d_v;
  // The dot variant's bfloat16 pairs (ColumnPairs, RowPairs) of k_t, v, k, v_t and of a block's
  // q, g and probabilities (or d_logits).
  std::vector<float> k_t2, v2, k2, v_t2, q_cols, q_rows, g_cols, g_rows, p_cols, p_rows;
  static Scratch& Get() {
    thread_local Scratch s;
    return s;
  }
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr bool kMaskedLanes = true;  // LoadLanes and StoreRow's masked stores of bfloat16
// The `live` lanes of 16 values of T from p as float32, 0 elsewhere (nothing else is read).
template <typename T>
inline __m512 LoadLanes(const T* p, __mmask16 live) {
  if constexpr (sizeof(T) == 2) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16));
  } else {
    return _mm512_maskz_loadu_ps(live, p);
  }
}
#else
constexpr bool kMaskedLanes = false;
#endif

// One row of `cols` values of T into float32 dst[0, width) (width a multiple of kLanes, at least
// cols; zero past cols), and back, times `scale` and rounded to T.
template <typename T>
inline void LoadRow(const T* src, int64_t cols, int64_t width, float* dst) {
  if constexpr (kMaskedLanes) {
#if defined(__AVX512F__)
    for (int64_t c = 0; c < width; c += kLanes)
      _mm512_storeu_ps(dst + c, LoadLanes(src + c, Live(cols, c)));
    return;
#endif
  }
  for (int64_t c = 0; c < width; ++c) dst[c] = c < cols ? Load(src, c) : 0.0f;
}

template <typename T>
inline void StoreRow(const float* src, int64_t cols, float scale, T* dst) {
  int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  for (; c < cols; c += kLanes) {
    const __mmask16 live = Live(cols, c);
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(src + c), _mm512_set1_ps(scale));
    if constexpr (sizeof(T) == 2) {
      __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(RoundV<T>(x)), 16);
      _mm256_mask_storeu_epi16(dst + c, live, _mm512_cvtepi32_epi16(bits));
    } else {
      _mm512_mask_storeu_ps(dst + c, live, x);
    }
  }
#endif
  for (; c < cols; ++c) Store(dst, c, src[c] * scale);
}

// One (batch, kv head) pair's padded sizes; sizes the thread's scratch for either pass (the
// backward pass's accumulators zeroed).
struct Task {
  int64_t kp, sp, block, b, g;
  Task(const Shape& sh, int64_t n, bool backward, Scratch& s)
      : kp(RoundUp(sh.head_dim, kLanes)), sp(RoundUp(sh.keys, kLanes)),
        block(std::min(kRowBlock, RoundUp(sh.queries, kRowTile))), b(n / sh.groups),
        g(n % sh.groups) {
    for (auto* kv : {&s.k_t, &s.v, &s.k, &s.v_t}) kv->resize(kp * sp);
    for (auto* rows : {&s.q, &s.g, &s.o}) rows->resize(block * kp);
    for (auto* scores : {&s.logits, &s.probs, &s.d_probs}) scores->resize(block * sp);
    if (backward) {
      s.d_k.assign(sp * kp, 0.0f);
      s.d_v.assign(sp * kp, 0.0f);
    }
  }
};

// The rows of a pair lie a row of all heads apart (e.g. 1.5 KiB for 12 heads of 32 floats), a
// stride that the hardware prefetchers follow poorly: each row is fetched this many rows ahead.
constexpr int64_t kRowsAhead = 8;

// Prefetches row r (cols values of T from p) into the cache, for writing where `write`.
template <typename T>
inline void PrefetchRow(const T* p, int64_t cols, bool write = false) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < cols * static_cast<int64_t>(sizeof(T)); i += 64) {
    if (write) __builtin_prefetch(bytes + i, 1);
    else __builtin_prefetch(bytes + i, 0);
  }
}

// rows x cols of the rows at(r) (r < rows; T values) into dst [rows_pad][ld_dst], float32,
// zero-padded (ld_dst a multiple of kLanes).
template <typename T, typename At>
void LoadRows(At at, int64_t rows, int64_t cols, int64_t rows_pad, float* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < std::min(rows, kRowsAhead); ++r) PrefetchRow(at(r), cols);
  for (int64_t r = 0; r < rows; ++r) {
    if (r + kRowsAhead < rows) PrefetchRow(at(r + kRowsAhead), cols);
    LoadRow<T>(at(r), cols, ld_dst, dst + r * ld_dst);
  }
  std::fill(dst + rows * ld_dst, dst + rows_pad * ld_dst, 0.0f);
}

// rows x cols of src [rows][ld_src] (float32) times `scale` into the rows at(r) as T.
template <typename T, typename At>
void StoreRows(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float scale, At at) {
  for (int64_t r = 0; r < std::min(rows, kRowsAhead); ++r) PrefetchRow(at(r), cols, true);
  for (int64_t r = 0; r < rows; ++r) {
    if (r + kRowsAhead < rows) PrefetchRow(at(r + kRowsAhead), cols, true);
    StoreRow<T>(src + r * ld_src, cols, scale, at(r));
  }
}

// The transpose of rows x cols of the rows at(r) into dst [cols_pad][ld_dst], float32,
// zero-padded to rows_pad columns (rows_pad and cols_pad multiples of kLanes).
template <typename T, typename At>
void LoadTransposed(At at, int64_t rows, int64_t cols, int64_t rows_pad, int64_t cols_pad,
                    float* dst, int64_t ld_dst) {
  if constexpr (kMaskedLanes) {
#if defined(__AVX512F__)
    // 16 x 16 blocks, transposed in registers; the next 16 rows prefetched.
    for (int64_t r = 0; r < std::min(rows, kLanes); ++r) PrefetchRow(at(r), cols);
    for (int64_t r0 = 0; r0 < rows_pad; r0 += kLanes) {
      for (int64_t r = r0 + kLanes; r < std::min(rows, r0 + 2 * kLanes); ++r)
        PrefetchRow(at(r), cols);
      for (int64_t c0 = 0; c0 < cols_pad; c0 += kLanes) {
        __m512 x[kLanes];
        const __mmask16 live = Live(cols, c0);
        for (int64_t i = 0; i < kLanes; ++i)
          x[i] = r0 + i < rows ? LoadLanes(at(r0 + i) + c0, live) : _mm512_setzero_ps();
        Transpose16(x);
        for (int64_t j = 0; j < kLanes; ++j) _mm512_storeu_ps(dst + (c0 + j) * ld_dst + r0, x[j]);
      }
    }
    return;
#endif
  }
  for (int64_t c = 0; c < cols_pad; ++c)
    for (int64_t r = 0; r < rows_pad; ++r)
      dst[c * ld_dst + r] = r < rows && c < cols ? Load(at(r), c) : 0.0f;
}

// The scaled, biased logits of `rows` query rows from `row0` on, into s.logits [rows][Sp];
// padded key columns are -inf. k_t: s.k_t, or its RowPairs (dot).
template <bool kDot>
void Logits(const Shape& sh, int64_t b, int64_t g, int64_t row0, int64_t rows, int64_t rows_pad,
            int64_t kp, int64_t sp, float scale, const float* bias, const float* k_t,
            Scratch& s) {
  constexpr int64_t u = kUnit<kDot>;
  const float* q = ColumnPairs<kDot>(s.q.data(), rows_pad, kp, s.q_cols);
  Gemm<kDot>(rows_pad, sp, kp / u, q, kp / u, 1, k_t, sp, s.logits.data(), sp, false);
  const float* bias_bg = bias + b * sh.bias_b + g * sh.bias_g;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s.logits.data() + r * sp;
    const float* bias_row = bias_bg + ((row0 + r) % sh.bias_rows) * sh.bias_q;
    if (sh.bias_s) {
      for (int64_t j = 0; j < sh.keys; ++j) row[j] = row[j] * scale + bias_row[j];
    } else {
      for (int64_t j = 0; j < sh.keys; ++j) row[j] = row[j] * scale + bias_row[0];
    }
    for (int64_t j = sh.keys; j < sp; ++j) row[j] = -std::numeric_limits<float>::infinity();
  }
}

// One row's probabilities p = e / l (e: its exponentials, replaced by p) and their dropped
// copy: round(p) to T, then dropout. The forward pass hashes the keep-mask (index: the row's
// first element in the [B, G, Q, S] probabilities) and writes its words to `words_out`; the
// backward pass reads them from `words`. Padded columns have e = 0 and stay 0.
template <typename T>
void DropRow(float* p, float l, float* dropped, int64_t sp, uint32_t index, const Dropout& drop,
             const uint16_t* words, uint16_t* words_out) {
  const float kept = Round<T>(drop.keep_scale);
#if defined(__AVX512F__)
  // The quotient correctly rounded, as a division gives it, without vdivps (a quarter of the
  // forward task's own time): q = e * (1 / l), then one correction by its exact residual
  // e - q l (Markstein's theorem: 1 / l correctly rounded makes q + residual / l so).
  const __m512 divisor = _mm512_set1_ps(l), reciprocal = _mm512_set1_ps(1.0f / l);
#endif
  for (int64_t j = 0; j < sp; j += kLanes) {
    uint16_t word = 0xffff;
    if (drop.rate > 0.0f) {
      word = words_out ? (words_out[j / kLanes] = KeepWord(index + static_cast<uint32_t>(j), drop))
                       : words[j / kLanes];
    }
#if defined(__AVX512F__)
    const __m512 e = _mm512_loadu_ps(p + j);
    const __m512 q = _mm512_mul_ps(e, reciprocal);
    const __m512 quotient = _mm512_fmadd_ps(_mm512_fnmadd_ps(q, divisor, e), reciprocal, q);
    _mm512_storeu_ps(p + j, quotient);
    __m512 d = RoundV<T>(quotient);
    if (drop.rate > 0.0f)
      d = _mm512_maskz_mov_ps(word, RoundV<T>(_mm512_mul_ps(d, _mm512_set1_ps(kept))));
    _mm512_storeu_ps(dropped + j, d);
#else
    for (int64_t i = 0; i < kLanes; ++i) {
      p[j + i] /= l;
      float d = Round<T>(p[j + i]);
      if (drop.rate > 0.0f) d = (word >> i) & 1 ? Round<T>(d * kept) : 0.0f;
      dropped[j + i] = d;
    }
#endif
  }
}

// d_logits of one row, rounded to T: p * (dropout'(d_probs) - row_sum), with the row's
// keep-mask words.
template <typename T>
void DLogitsRow(const float* p, const float* d_probs, float* d_logits, int64_t sp,
                float row_sum, const Dropout& drop, const uint16_t* words) {
  for (int64_t j = 0; j < sp; j += kLanes) {
    const uint16_t word = drop.rate > 0.0f ? words[j / kLanes] : 0xffff;
#if defined(__AVX512F__)
    __m512 d = _mm512_loadu_ps(d_probs + j);
    if (drop.rate > 0.0f)
      d = _mm512_maskz_mov_ps(word, _mm512_mul_ps(d, _mm512_set1_ps(drop.keep_scale)));
    d = _mm512_mul_ps(_mm512_loadu_ps(p + j), _mm512_sub_ps(d, _mm512_set1_ps(row_sum)));
    _mm512_storeu_ps(d_logits + j, RoundV<T>(d));
#else
    for (int64_t i = 0; i < kLanes; ++i) {
      float d = d_probs[j + i];
      if (drop.rate > 0.0f) d = (word >> i) & 1 ? d * drop.keep_scale : 0.0f;
      d_logits[j + i] = Round<T>(p[j + i] * (d - row_sum));
    }
#endif
  }
}

// probs (float32, in s.logits) and the dropped probabilities in the value dtype (s.probs) of
// rows already holding logits; padded rows and columns of s.probs are 0. The forward pass
// passes `maximum_out` and `normaliser_out` to have each row's maximum and normaliser computed
// and written there, and the keep-mask words to `words` ([rows][Sp / 16]); the backward pass
// reads all three instead.
template <typename T>
void Probabilities(const Shape& sh, int64_t n, int64_t row0, int64_t rows, int64_t rows_pad,
                   int64_t sp, const float* maximum, const float* normaliser,
                   float* maximum_out, float* normaliser_out, const Dropout& drop,
                   const uint16_t* words, uint16_t* words_out, Scratch& s) {
  const bool fill = maximum_out != nullptr;
  const int64_t row_words = sp / kLanes;
  std::fill(s.probs.begin() + rows * sp, s.probs.begin() + rows_pad * sp, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* logit = s.logits.data() + r * sp;
    float* dropped = s.probs.data() + r * sp;
    const float m = fill ? (maximum_out[r] = RowMax(logit, sp)) : maximum[r];
    const float total = ExpRowAndSum(logit, sp, m);  // Padded columns: exp(-inf) = 0.
    const float l = fill ? (normaliser_out[r] = total) : normaliser[r];
    DropRow<T>(logit, l, dropped, sp, static_cast<uint32_t>((n * sh.queries + row0 + r) * sh.keys),
               drop, fill ? nullptr : words + r * row_words,
               fill ? words_out + r * row_words : nullptr);
  }
}

// kDot: the products on bfloat16 pairs (T is bfloat16); else on float32 FMAs.
template <typename T, bool kDot>
void ForwardTask(const Shape& sh, int64_t n, const T* q, const T* k, const T* v,
                 const float* bias, float scale, const Dropout& drop, T* out, float* maximum,
                 float* normaliser, uint16_t* keep) {
  constexpr int64_t u = kUnit<kDot>;
  Scratch& s = Scratch::Get();
  const Task t(sh, n, false, s);
  const int64_t kp = t.kp, sp = t.sp, block = t.block, b = t.b, g = t.g;
  const auto key = [&](int64_t j) { return k + sh.KeyRow(b, g, j); };
  const auto value = [&](int64_t j) { return v + sh.KeyRow(b, g, j); };
  LoadTransposed<T>(key, sh.keys, sh.head_dim, sp, kp, s.k_t.data(), sp);
  LoadRows<T>(value, sh.keys, sh.head_dim, sp, s.v.data(), kp);
  const float* k_t = RowPairs<kDot>(s.k_t.data(), kp, sp, s.k_t2);
  const float* v_rows = RowPairs<kDot>(s.v.data(), sp, kp, s.v2);
  for (int64_t row0 = 0; row0 < sh.queries; row0 += block) {
    const int64_t rows = std::min(block, sh.queries - row0);
    const int64_t rows_pad = RoundUp(rows, kRowTile);
    const int64_t first = n * sh.queries + row0;  // The block's first row of all B * G * Q.
    const auto query = [&](int64_t r) { return sh.QueryRow(b, g, row0 + r); };
    LoadRows<T>([&](int64_t r) { return q + query(r); }, rows, sh.head_dim, rows_pad, s.q.data(),
                kp);
    Logits<kDot>(sh, b, g, row0, rows, rows_pad, kp, sp, scale, bias, k_t, s);
    Probabilities<T>(sh, n, row0, rows, rows_pad, sp, nullptr, nullptr, maximum + first,
                     normaliser + first, drop, nullptr, keep + first * (sp / kLanes), s);
    const float* p = ColumnPairs<kDot>(s.probs.data(), rows_pad, sp, s.p_cols);
    Gemm<kDot>(rows_pad, kp, sp / u, p, sp / u, 1, v_rows, kp, s.o.data(), kp, false);
    StoreRows<T>(s.o.data(), kp, rows, sh.head_dim, 1.0f,
                 [&](int64_t r) { return out + query(r); });
  }
}

template <typename T, bool kDot>
void BackwardTask(const Shape& sh, int64_t n, const T* q, const T* k, const T* v,
                  const float* bias, const float* maximum, const float* normaliser,
                  const uint16_t* keep, const T* out, const T* d_out, float scale,
                  const Dropout& drop, T* d_q, T* d_k, T* d_v) {
  constexpr int64_t u = kUnit<kDot>;
  Scratch& s = Scratch::Get();
  const Task t(sh, n, true, s);
  const int64_t kp = t.kp, sp = t.sp, block = t.block, b = t.b, g = t.g;
  const auto key_row = [&](int64_t j) { return sh.KeyRow(b, g, j); };
  const auto key = [&](int64_t j) { return k + key_row(j); };
  LoadTransposed<T>(key, sh.keys, sh.head_dim, sp, kp, s.k_t.data(), sp);
  LoadRows<T>(key, sh.keys, sh.head_dim, sp, s.k.data(), kp);
  LoadTransposed<T>([&](int64_t j) { return v + key_row(j); }, sh.keys, sh.head_dim, sp, kp,
                    s.v_t.data(), sp);
  const float* k_t = RowPairs<kDot>(s.k_t.data(), kp, sp, s.k_t2);
  const float* k_rows = RowPairs<kDot>(s.k.data(), sp, kp, s.k2);
  const float* v_t = RowPairs<kDot>(s.v_t.data(), kp, sp, s.v_t2);
  for (int64_t row0 = 0; row0 < sh.queries; row0 += block) {
    const int64_t rows = std::min(block, sh.queries - row0);
    const int64_t rows_pad = RoundUp(rows, kRowTile);
    const int64_t first = n * sh.queries + row0;
    const uint16_t* words = keep + first * (sp / kLanes);
    const auto query = [&](int64_t r) { return sh.QueryRow(b, g, row0 + r); };
    LoadRows<T>([&](int64_t r) { return q + query(r); }, rows, sh.head_dim, rows_pad, s.q.data(),
                kp);
    LoadRows<T>([&](int64_t r) { return d_out + query(r); }, rows, sh.head_dim, rows_pad,
                s.g.data(), kp);
    LoadRows<T>([&](int64_t r) { return out + query(r); }, rows, sh.head_dim, rows_pad,
                s.o.data(), kp);
    Logits<kDot>(sh, b, g, row0, rows, rows_pad, kp, sp, scale, bias, k_t, s);
    Probabilities<T>(sh, n, row0, rows, rows_pad, sp, maximum + first, normaliser + first,
                     nullptr, nullptr, drop, words, nullptr, s);
    // d_v += dropped^T g (before s.probs is reused for d_logits); d_probs = g v^T.
    const float* p = RowPairs<kDot>(s.probs.data(), rows_pad, sp, s.p_rows);
    const float* g_rows = RowPairs<kDot>(s.g.data(), rows_pad, kp, s.g_rows);
    Gemm<kDot>(sp, kp, rows_pad / u, p, 1, sp, g_rows, kp, s.d_v.data(), kp, true);
    const float* g_cols = ColumnPairs<kDot>(s.g.data(), rows_pad, kp, s.g_cols);
    Gemm<kDot>(rows_pad, sp, kp / u, g_cols, kp / u, 1, v_t, sp, s.d_probs.data(), sp, false);
    std::fill(s.probs.begin() + rows * sp, s.probs.begin() + rows_pad * sp, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      // sum_s probs * d_probs of the row, as sum_k g * out (the reference's form).
      float row_sum = 0.0f;
      for (int64_t c = 0; c < kp; ++c) row_sum += s.g[r * kp + c] * s.o[r * kp + c];
      DLogitsRow<T>(s.logits.data() + r * sp, s.d_probs.data() + r * sp, s.probs.data() + r * sp,
                    sp, row_sum, drop, words + r * (sp / kLanes));
    }
    // d_q = d_logits k * scale; d_k += d_logits^T q.
    const float* d_logits = ColumnPairs<kDot>(s.probs.data(), rows_pad, sp, s.p_cols);
    Gemm<kDot>(rows_pad, kp, sp / u, d_logits, sp / u, 1, k_rows, kp, s.o.data(), kp, false);
    StoreRows<T>(s.o.data(), kp, rows, sh.head_dim, scale,
                 [&](int64_t r) { return d_q + query(r); });
    const float* d_logits_t = RowPairs<kDot>(s.probs.data(), rows_pad, sp, s.p_rows);
    const float* q_rows = RowPairs<kDot>(s.q.data(), rows_pad, kp, s.q_rows);
    Gemm<kDot>(sp, kp, rows_pad / u, d_logits_t, 1, sp, q_rows, kp, s.d_k.data(), kp, true);
  }
  StoreRows<T>(s.d_k.data(), kp, sh.keys, sh.head_dim, scale,
               [&](int64_t j) { return d_k + key_row(j); });
  StoreRows<T>(s.d_v.data(), kp, sh.keys, sh.head_dim, 1.0f,
               [&](int64_t j) { return d_v + key_row(j); });
}


ffi::Error CheckKeep(const Shape& sh, float rate, size_t words) {
  const int64_t rows = sh.batch * sh.groups * sh.queries;
  const size_t want = rate > 0.0f ? rows * (RoundUp(sh.keys, kLanes) / kLanes) : 1;
  return words == want ? ffi::Error::Success()
                       : ffi::Error::InvalidArgument("keep-mask words have the wrong size");
}

// Runs run(T{}, std::bool_constant<kDot>{}) for q's dtype: kDot for bfloat16 operands where
// `dot` (or `amx`, whose tiles take the same pairs) asks for the vdpbf16ps variant and the CPU
// has it (elsewhere it runs as fma).
template <typename Run>
void Dispatch(const ffi::AnyBuffer& q, bool dot, Run&& run) {
  if (q.element_type() == ffi::F32) return run(0.0f, std::false_type{});
#if defined(__AVX512BF16__)
  if (dot) return run(uint16_t{0}, std::true_type{});
#endif
  run(uint16_t{0}, std::false_type{});
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::U32> seeds, float scale,
                   float rate, float keep_scale, int64_t threshold, bool dot, bool amx,
                   ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::Buffer<ffi::F32>> maximum,
                   ffi::Result<ffi::Buffer<ffi::F32>> normaliser,
                   ffi::Result<ffi::Buffer<ffi::U16>> keep) {
  Shape sh;
  if (ffi::Error e = ReadShape(q, k, v, bias, &sh); e.failure()) return e;
  if (seeds.element_count() != 2) return ffi::Error::InvalidArgument("seeds must be uint32[2]");
  if (ffi::Error e = CheckKeep(sh, rate, keep->element_count()); e.failure()) return e;
  const Dropout drop = MakeDropout(rate, keep_scale, seeds, threshold);
  auto run = [&](auto zero, auto on_dot) {
    using T = decltype(zero);
    ParallelFor(pool, sh.batch * sh.groups, [&](int64_t n) {
      const AmxTask tiles(amx && on_dot.value);
      ForwardTask<T, on_dot.value>(sh, n, In<T>(q), In<T>(k), In<T>(v), bias.typed_data(), scale, drop,
                     Out<T>(out), maximum->typed_data(), normaliser->typed_data(),
                     keep->typed_data());
    });
  };
  Dispatch(q, dot || amx, run);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::U32> seeds,
                    ffi::Buffer<ffi::F32> maximum, ffi::Buffer<ffi::F32> normaliser,
                    ffi::Buffer<ffi::U16> keep, ffi::AnyBuffer out, ffi::AnyBuffer d_out,
                    float scale, float rate, float keep_scale, int64_t threshold, bool dot,
                    bool amx, ffi::Result<ffi::AnyBuffer> d_q, ffi::Result<ffi::AnyBuffer> d_k,
                    ffi::Result<ffi::AnyBuffer> d_v) {
  Shape sh;
  if (ffi::Error e = ReadShape(q, k, v, bias, &sh); e.failure()) return e;
  if (out.element_type() != q.element_type() || d_out.element_type() != q.element_type())
    return ffi::Error::InvalidArgument("out and its cotangent must have q's dtype");
  if (seeds.element_count() != 2) return ffi::Error::InvalidArgument("seeds must be uint32[2]");
  if (ffi::Error e = CheckKeep(sh, rate, keep.element_count()); e.failure()) return e;
  const Dropout drop = MakeDropout(rate, keep_scale, seeds, threshold);
  auto run = [&](auto zero, auto on_dot) {
    using T = decltype(zero);
    ParallelFor(pool, sh.batch * sh.groups, [&](int64_t n) {
      const AmxTask tiles(amx && on_dot.value);
      BackwardTask<T, on_dot.value>(sh, n, In<T>(q), In<T>(k), In<T>(v), bias.typed_data(),
                      maximum.typed_data(), normaliser.typed_data(), keep.typed_data(),
                      In<T>(out), In<T>(d_out), scale, drop, Out<T>(d_q), Out<T>(d_k),
                      Out<T>(d_v));
    });
  };
  Dispatch(q, dot || amx, run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // q
                                  .Arg<ffi::AnyBuffer>()          // k
                                  .Arg<ffi::AnyBuffer>()          // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Arg<ffi::Buffer<ffi::U32>>()   // dropout seeds
                                  .Attr<float>("scale")
                                  .Attr<float>("rate")
                                  .Attr<float>("keep_scale")
                                  .Attr<int64_t>("threshold")
                                  .Attr<bool>("dot")
                                  .Attr<bool>("amx")
                                  .Ret<ffi::AnyBuffer>()          // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // row maximum
                                  .Ret<ffi::Buffer<ffi::F32>>()   // row normaliser
                                  .Ret<ffi::Buffer<ffi::U16>>()); // keep-mask words

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // q
                                  .Arg<ffi::AnyBuffer>()          // k
                                  .Arg<ffi::AnyBuffer>()          // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Arg<ffi::Buffer<ffi::U32>>()   // dropout seeds
                                  .Arg<ffi::Buffer<ffi::F32>>()   // row maximum
                                  .Arg<ffi::Buffer<ffi::F32>>()   // row normaliser
                                  .Arg<ffi::Buffer<ffi::U16>>()   // keep-mask words
                                  .Arg<ffi::AnyBuffer>()          // out
                                  .Arg<ffi::AnyBuffer>()          // d_out
                                  .Attr<float>("scale")
                                  .Attr<float>("rate")
                                  .Attr<float>("keep_scale")
                                  .Attr<int64_t>("threshold")
                                  .Attr<bool>("dot")
                                  .Attr<bool>("amx")
                                  .Ret<ffi::AnyBuffer>()          // d_q
                                  .Ret<ffi::AnyBuffer>()          // d_k
                                  .Ret<ffi::AnyBuffer>());        // d_v
