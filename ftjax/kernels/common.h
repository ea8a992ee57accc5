// Pieces shared by ftjax's XLA FFI kernels: bfloat16 conversion (and loads and stores of a
// float32 or bfloat16 stream as float32, scalar and 16 lanes at a time), a parallel loop over
// XLA's intra-op thread pool and the sum of its tasks' partial column sums, typed views of FFI
// buffers, lane masks for a row's tail, a vector exp, dropout's keep-mask hash, a 16 x 16
// register transpose and the set-up of Intel AMX's tiles. Each kernel source includes it inside
// its own anonymous namespace.
#ifndef FTJAX_KERNELS_COMMON_H_
#define FTJAX_KERNELS_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FTJAX_AMX 1  // Intel AMX's bfloat16 tiles (the `amx` variants)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ftjax {

namespace ffi = xla::ffi;

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// bfloat16 <-> float32, round to nearest even (as XLA converts).
inline float Bf16ToF32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float RoundBf16(float f) { return Bf16ToF32(F32ToBf16(f)); }

// Element i of a stream stored as T (float, or uint16_t holding bfloat16 bits), as float32; and
// a float32 value stored there (rounded to nearest even for bfloat16).
template <typename T> float Load(const T* p, int64_t i);
template <> inline float Load<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float Load<uint16_t>(const uint16_t* p, int64_t i) { return Bf16ToF32(p[i]); }

template <typename T> void Store(T* p, int64_t i, float x);
template <> inline void Store<float>(float* p, int64_t i, float x) { p[i] = x; }
template <> inline void Store<uint16_t>(uint16_t* p, int64_t i, float x) { p[i] = F32ToBf16(x); }

#if defined(__AVX512F__)
// The vector forms: the `live` lanes of 16 consecutive elements from p (the others zero, and
// not read or written).
template <typename T> __m512 LoadV(const T* p, __mmask16 live);
template <> inline __m512 LoadV<float>(const float* p, __mmask16 live) {
  return _mm512_maskz_loadu_ps(live, p);
}
template <> inline __m512 LoadV<uint16_t>(const uint16_t* p, __mmask16 live) {
  const __m256i h = _mm256_maskz_loadu_epi16(live, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename T> void StoreV(T* p, __mmask16 live, __m512 x);
template <> inline void StoreV<float>(float* p, __mmask16 live, __m512 x) {
  _mm512_mask_storeu_ps(p, live, x);
}
template <> inline void StoreV<uint16_t>(uint16_t* p, __mmask16 live, __m512 x) {
#if defined(__AVX512BF16__)
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
#else  // F32ToBf16's rounding, 16 lanes at a time.
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
  r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), bits,
                           _mm512_set1_epi32(0x400000));  // NaN: quiet, not rounded
  const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
  _mm256_mask_storeu_epi16(p, live, h);
}
#endif

// Runs body(i) for i in [0, count) on the caller and up to `helpers` tasks of XLA's intra-op
// thread pool, and returns when all are done. The caller works too, and a helper that starts
// after the work is gone returns at once, so a busy pool only delays the call, never
// deadlocks it.
inline void ParallelFor(ffi::ThreadPool& pool, int64_t count,
                        const std::function<void(int64_t)>& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
    std::atomic<bool> closed{false};
    std::mutex mu;
    std::condition_variable done;
    const std::function<void(int64_t)>* body = nullptr;
    int64_t count = 0;
  };
  auto state = std::make_shared<State>();
  state->body = &body;
  state->count = count;
  auto drain = [](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.count;) (*s.body)(i);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, count - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([state, drain]() {
      state->active.fetch_add(1);
      if (!state->closed.load()) drain(*state);
      if (state->active.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->done.notify_all();
      }
    });
  }
  drain(*state);
  state->closed.store(true);
  std::unique_lock<std::mutex> lock(state->mu);
  state->done.wait(lock, [&] { return state->active.load() == 0; });
}

// Typed views of the buffers: T is float, or uint16_t holding bfloat16 bits.
template <typename T> const T* In(const ffi::AnyBuffer& x) {
  return reinterpret_cast<const T*>(x.untyped_data());
}
template <typename T> T* Out(ffi::Result<ffi::AnyBuffer>& x) {
  return reinterpret_cast<T*>(x->untyped_data());
}

// out[c] = the sum over t < tasks of partial[t * stride + c], for c < n, in task order: the
// column sums that the row-parallel kernels (gelu.cc, layer_norm.cc) collect per task,
// combined so that their value does not depend on which thread ran which task.
inline void SumTasks(const float* partial, int64_t tasks, int64_t stride, int64_t n, float* out) {
  std::fill(out, out + n, 0.0f);
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t c = 0; c < n; ++c) out[c] += partial[t * stride + c];
}

#if defined(__AVX512F__)
// The lanes of the 16 values from `c` on that a row of `cols` values has (0 from its end on).
inline __mmask16 Live(int64_t cols, int64_t c) {
  return cols - c >= 16 ? 0xffff : cols <= c ? 0 : static_cast<__mmask16>((1u << (cols - c)) - 1);
}

// exp(v) for 16 float32 values: 2^k exp(r), k = round(v / ln 2), |r| <= ln 2 / 2, a degree-6
// polynomial for exp(r) (Cephes' expf coefficients), then scalef. Inputs below -104 underflow
// to 0 (and -inf, a masked logit, gives 0 instead of a NaN).
inline __m512 ExpV(__m512 v) {
  v = _mm512_max_ps(v, _mm512_set1_ps(-104.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}

#endif

// Exact GELU's pieces (gelu.cc, and the matmul kernel's gated input gradient): erf as a
// rational approximation x P(x^2) / Q(x^2) on |x| < 3.8325 (from there on erf(x) is +-1, as it
// rounds in float32), its coefficients fitted for the least maximum absolute error: at most
// 3.7e-7 against the exact erf, XLA:CPU's own float32 erf 3.1e-7.
constexpr float kErfLimit = 3.832506856900711f;
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kP[6] = {1.128379063e+00f, 1.892956712e-01f, 5.267338105e-02f,
                         3.737137046e-03f, 2.876875934e-04f, 2.104928151e-06f};
constexpr float kQ[6] = {1.0f, 5.010910404e-01f, 1.137154851e-01f,
                         1.490967620e-02f, 1.162000175e-03f, 3.880304258e-05f};

#if defined(__AVX512F__)
inline __m512 Horner(const float (&c)[6], __m512 t) {
  __m512 r = _mm512_set1_ps(c[5]);
  for (int i = 4; i >= 0; --i) r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(c[i]));
  return r;
}

// Phi(z) = 0.5 (1 + erf(z / sqrt 2)) for 16 values.
inline __m512 CdfV(__m512 z) {
  const __m512 limit = _mm512_set1_ps(kErfLimit);
  const __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(z, _mm512_set1_ps(kSqrtHalf)),
                                               _mm512_sub_ps(_mm512_setzero_ps(), limit)),
                                 limit);
  const __m512 t = _mm512_mul_ps(x, x);
  const __m512 q = Horner(kQ, t);  // >= 1: every coefficient is positive.
  // 1 / q: the 14-bit estimate and one Newton step (relative error ~2^-28), no vdivps.
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
  __m512 erf = _mm512_mul_ps(_mm512_mul_ps(x, Horner(kP, t)), r);
  // Clamped inputs give exactly +-1 (the fraction leaves ~1e-7 off, which z Phi(z) scales up).
  const __m512 sign = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x),
                                                           _mm512_set1_epi32(0x80000000u)));
  erf = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(x), limit, _CMP_GE_OQ), erf,
                             _mm512_or_ps(sign, _mm512_set1_ps(1.0f)));
  return _mm512_fmadd_ps(erf, _mm512_set1_ps(0.5f), _mm512_set1_ps(0.5f));
}
#endif

inline float Cdf(float z) {
  const float x = std::min(std::max(z * kSqrtHalf, -kErfLimit), kErfLimit);
  if (std::fabs(x) >= kErfLimit) return x > 0.0f ? 1.0f : 0.0f;
  const float t = x * x;
  float p = kP[5], q = kQ[5];
  for (int i = 4; i >= 0; --i) {
    p = p * t + kP[i];
    q = q * t + kQ[i];
  }
  return 0.5f * (x * p / q) + 0.5f;
}

// d/dz gelu(z) = Phi(z) + z phi(z).
inline float Slope(float z) { return Cdf(z) + z * std::exp(-0.5f * z * z) * kInvSqrt2Pi; }

#if defined(__AVX512F__)
inline __m512 SlopeV(__m512 z) {
  const __m512 pdf = _mm512_mul_ps(ExpV(_mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-0.5f))),
                                   _mm512_set1_ps(kInvSqrt2Pi));
  return _mm512_fmadd_ps(z, pdf, CdfV(z));
}
#endif

// Dropout's keep-mask, as layers._keep hashes it: the element at flat index i is kept when
// Mix32(Mix32(i * 0x9E3779B1 + seed0) ^ seed1) >= threshold (MurmurHash3's finaliser, as
// layers._mix32), from the dropout key's two seeds.
inline uint32_t Mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

inline bool Keep(uint32_t index, uint32_t seed0, uint32_t seed1, uint32_t threshold) {
  return Mix32(Mix32(index * 0x9E3779B1u + seed0) ^ seed1) >= threshold;
}

struct Dropout {
  float rate;        // 0: no dropout.
  float keep_scale;  // float32(1 / (1 - rate)), as the reference rounds it.
  uint32_t seed0, seed1, threshold;
};

inline Dropout MakeDropout(float rate, float keep_scale, const ffi::Buffer<ffi::U32>& seeds,
                           int64_t threshold) {
  const uint32_t* sd = seeds.typed_data();
  return {rate, keep_scale, sd[0], sd[1], static_cast<uint32_t>(threshold)};
}

#if defined(__AVX512F__)
inline __m512i Mix32V(__m512i h) {
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x85EBCA6Bu));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0xC2B2AE35u));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

inline __mmask16 KeepV(uint32_t index, uint32_t seed0, uint32_t seed1, uint32_t threshold) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i h = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(index)), lanes);
  h = _mm512_add_epi32(_mm512_mullo_epi32(h, _mm512_set1_epi32(0x9E3779B1u)),
                       _mm512_set1_epi32(static_cast<int>(seed0)));
  h = Mix32V(_mm512_xor_si512(Mix32V(h), _mm512_set1_epi32(static_cast<int>(seed1))));
  return _mm512_cmpge_epu32_mask(h, _mm512_set1_epi32(static_cast<int>(threshold)));
}
#endif

// The keep-mask word of 16 elements from flat index `index` on (bit i: element index + i).
inline uint16_t KeepWord(uint32_t index, const Dropout& drop) {
#if defined(__AVX512F__)
  return KeepV(index, drop.seed0, drop.seed1, drop.threshold);
#else
  uint16_t word = 0;
  for (uint32_t i = 0; i < 16; ++i)
    word |= static_cast<uint16_t>(Keep(index + i, drop.seed0, drop.seed1, drop.threshold)) << i;
  return word;
#endif
}

#if defined(__AVX512F__)
// In-register transpose of 16 x 16 32-bit words: r[i] lane j -> r[j] lane i.
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
#endif

#if defined(FTJAX_AMX)
// Linux gives a process AMX's tile data only on request (arch_prctl); asked once per process.
inline bool AmxPermitted() {
  static const bool ok = [] {
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// While in scope, the calling thread's tiles 0-7 are configured as 16 rows x 64 bytes.
class Tiles {
 public:
  Tiles() {
    TileConfig config;
    for (int i = 0; i < 8; ++i) {
      config.colsb[i] = 64;
      config.rows[i] = 16;
    }
    _tile_loadconfig(&config);
  }
  ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};
#endif

// Whether the `amx` variants run on this CPU (built with AMX and granted its tiles); elsewhere
// they run as `dot`.
inline bool AmxAvailable() {
#if defined(FTJAX_AMX)
  return AmxPermitted();
#else
  return false;
#endif
}

}  // namespace ftjax

#endif  // FTJAX_KERNELS_COMMON_H_
