// The gated feed-forward layer's activation silu(a) * b (SwiGLU: Llama, Mistral, Qwen2) for
// XLA:CPU, as two XLA FFI custom calls: the forward and the backward (both inputs' gradients).
//
// Why: XLA:CPU ran silu(gate) as one single-threaded loop fusion, its product with up as
// another, and the backward as two more, each rounding its bfloat16 pieces: ~4.5 ms a layer at
// the 100M Llama's [2048, 2048] (8 x 256 tokens) in bfloat16, ~36 ms of its 0.9 s LoRA step on
// a 2-core AMD EPYC. Here each is one pass on both threads, computed in float32 and rounded
// once.
//
// Semantics, with s = sigmoid(a) = 1 / (1 + exp(-a)) (float32):
//   forward   h = a s b
//   backward  da = g b s (1 + a (1 - s)),  db = g a s
// Layouts: a, b, g, h, da, db [M, N] row-major, all float32 or all bfloat16.

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

namespace {

using namespace ftjax;  // NOLINT: the shared helpers of common.h

// Elements per task: 64K values are 256 KB of each float32 operand, a 64-way split of the
// 100M Llama's [2048, 2048].
constexpr int64_t kChunk = 1 << 16;

inline float Sigmoid(float a) { return 1.0f / (1.0f + std::exp(-a)); }

#if defined(__AVX512F__)
inline __m512 SigmoidV(__m512 a) {
  const __m512 one = _mm512_set1_ps(1.0f);
  // For a below ~-88.7, exp(-a) overflows to +inf (ExpV's scalef) and 1 / (1 + inf) = 0,
  // sigmoid's limit; above 104 it is exp(-104) (ExpV's clamp), and s rounds to 1.
  return _mm512_div_ps(one, _mm512_add_ps(one, ExpV(_mm512_sub_ps(_mm512_setzero_ps(), a))));
}
#endif

template <typename T>
void ForwardChunks(ffi::ThreadPool& pool, const T* as, const T* bs, T* hs, int64_t total) {
  ParallelFor(pool, (total + kChunk - 1) / kChunk, [&](int64_t task) {
    const int64_t end = std::min(total, (task + 1) * kChunk);
    int64_t i = task * kChunk;
#if defined(__AVX512F__)
    for (; i + 16 <= end; i += 16) {
      const __m512 a = LoadV(as + i, 0xffff), b = LoadV(bs + i, 0xffff);
      StoreV(hs + i, 0xffff, _mm512_mul_ps(_mm512_mul_ps(a, SigmoidV(a)), b));
    }
#endif
    for (; i < end; ++i) {
      const float a = Load(as, i);
      Store(hs, i, a * Sigmoid(a) * Load(bs, i));
    }
  });
}

template <typename T>
void BackwardChunks(ffi::ThreadPool& pool, const T* as, const T* bs, const T* gs, T* das, T* dbs,
                    int64_t total) {
  ParallelFor(pool, (total + kChunk - 1) / kChunk, [&](int64_t task) {
    const int64_t end = std::min(total, (task + 1) * kChunk);
    int64_t i = task * kChunk;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= end; i += 16) {
      const __m512 a = LoadV(as + i, 0xffff), b = LoadV(bs + i, 0xffff);
      const __m512 g = LoadV(gs + i, 0xffff), s = SigmoidV(a);
      const __m512 sg = _mm512_mul_ps(g, s);
      // da = g s b (1 + a (1 - s)); db = g s a
      const __m512 slope = _mm512_fmadd_ps(a, _mm512_sub_ps(one, s), one);
      StoreV(das + i, 0xffff, _mm512_mul_ps(_mm512_mul_ps(sg, b), slope));
      StoreV(dbs + i, 0xffff, _mm512_mul_ps(sg, a));
    }
#endif
    for (; i < end; ++i) {
      const float a = Load(as, i), b = Load(bs, i), g = Load(gs, i), s = Sigmoid(a);
      Store(das, i, g * s * b * (1.0f + a * (1.0f - s)));
      Store(dbs, i, g * s * a);
    }
  });
}

bool SameShape(const ffi::AnyBuffer& x, const ffi::AnyBuffer& y) {
  return x.element_type() == y.element_type() && x.element_count() == y.element_count();
}

bool Streams(const ffi::AnyBuffer& x) {
  return x.element_type() == ffi::F32 || x.element_type() == ffi::BF16;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                   ffi::Result<ffi::AnyBuffer> h) {
  if (!Streams(a) || !SameShape(a, b) || !SameShape(a, *h))
    return ffi::Error::InvalidArgument(
        "swiglu takes a, b and h of one shape and dtype, float32 or bfloat16");
  const int64_t total = static_cast<int64_t>(a.element_count());
  if (a.element_type() == ffi::BF16)
    ForwardChunks(pool, In<uint16_t>(a), In<uint16_t>(b), Out<uint16_t>(h), total);
  else
    ForwardChunks(pool, In<float>(a), In<float>(b), Out<float>(h), total);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer g,
                    ffi::Result<ffi::AnyBuffer> da, ffi::Result<ffi::AnyBuffer> db) {
  if (!Streams(a) || !SameShape(a, b) || !SameShape(a, g) || !SameShape(a, *da) ||
      !SameShape(a, *db))
    return ffi::Error::InvalidArgument(
        "swiglu_grad takes a, b, g, da and db of one shape and dtype, float32 or bfloat16");
  const int64_t total = static_cast<int64_t>(a.element_count());
  if (a.element_type() == ffi::BF16)
    BackwardChunks(pool, In<uint16_t>(a), In<uint16_t>(b), In<uint16_t>(g), Out<uint16_t>(da),
                   Out<uint16_t>(db), total);
  else
    BackwardChunks(pool, In<float>(a), In<float>(b), In<float>(g), Out<float>(da),
                   Out<float>(db), total);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxSwiglu, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()    // a, the gate
                                  .Arg<ffi::AnyBuffer>()    // b, the up projection
                                  .Ret<ffi::AnyBuffer>());  // silu(a) * b

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxSwigluGrad, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()    // a
                                  .Arg<ffi::AnyBuffer>()    // b
                                  .Arg<ffi::AnyBuffer>()    // g, the output's cotangent
                                  .Ret<ffi::AnyBuffer>()    // da
                                  .Ret<ffi::AnyBuffer>());  // db
