// Softmax cross-entropy with integer labels over a language model's vocabulary, for XLA:CPU, as
// two XLA FFI custom calls: the forward (each row's loss, log-sum-exp and first maximum) and
// the backward (the logits' gradient).
//
// Why: a causal LM's loss reads [tokens, vocabulary] logits, 2048 x 32000 for the 100M Llama at
// 8 x 256 tokens (131 MB in bfloat16). XLA:CPU ran it as ~9 single-threaded passes over them
// (a float32 copy of the logits, a shifted copy without the last position, the maximum, the
// exponentials and their sum, the gradient, and the blocks of the argmax that the accuracy
// metric takes): ~74 ms of that model's 1.03 s bfloat16 LoRA step on a 2-core AMD EPYC. Here
// the forward reads each row once from memory (twice from cache: its maximum, then the sum of
// exponentials) and the backward reads it once and writes its gradient once, on both threads.
//
// Semantics, per row x of n logits (float32, or bfloat16 computed in float32) and label y:
//   forward   m = max x (the first index where x == m is the prediction),
//             lse = m + log(sum exp(x - m)),  loss = lse - x[y]
//   backward  d = g (exp(x - lse) - [j == y]),  stored in x's dtype (rounded once)
// A label outside [0, n) gives a NaN loss (the caller maps ignored positions to a valid label
// and weights them 0); a row with g = 0 gets zeros without its exponentials. In a row that
// holds a NaN the loss is NaN and the prediction is the largest other value's index.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

namespace {

using namespace ftjax;  // NOLINT: the shared helpers of common.h

// Rows per task: a 32000-token row is 64-128 KB, so a task's row stays in the core's L2 cache
// between the forward's two passes; 2048 rows make 256 tasks.
constexpr int64_t kRows = 8;

// The row's maximum and the first index that holds it.
template <typename T>
void RowMax(const T* x, int64_t n, float* best, int64_t* at) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0, c = 0;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 vmax = _mm512_set1_ps(m);
    __m512i vidx = _mm512_setzero_si512();
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (; c + 16 <= n; c += 16) {
      const __m512 v = LoadV(x + c, 0xffff);
      const __mmask16 more = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);  // each lane's first max
      vmax = _mm512_mask_mov_ps(vmax, more, v);
      vidx = _mm512_mask_mov_epi32(vidx, more, idx);
      idx = _mm512_add_epi32(idx, step);
    }
    m = _mm512_reduce_max_ps(vmax);
    // The lowest index among the lanes that hold the maximum: the first in the row.
    const __mmask16 at_max = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(m), _CMP_EQ_OQ);
    i = at_max ? _mm512_mask_reduce_min_epi32(at_max, vidx) : 0;
  }
#endif
  for (; c < n; ++c) {
    const float v = Load(x, c);
    if (v > m) {
      m = v;
      i = c;
    }
  }
  *best = m;
  *at = i;
}

// sum exp(x - shift) over the row.
template <typename T>
float SumExp(const T* x, int64_t n, float shift) {
  float total = 0.0f;
  int64_t c = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 s = _mm512_set1_ps(shift);
  for (; c + 16 <= n; c += 16) acc = _mm512_add_ps(acc, ExpV(_mm512_sub_ps(LoadV(x + c, 0xffff), s)));
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; c < n; ++c) total += std::exp(Load(x, c) - shift);
  return total;
}

template <typename T>
void ForwardRows(ffi::ThreadPool& pool, const T* xs, const int32_t* labels, float* loss,
                 float* lse, int32_t* prediction, int64_t m, int64_t n) {
  ParallelFor(pool, (m + kRows - 1) / kRows, [&](int64_t task) {
    for (int64_t r = task * kRows; r < std::min(m, (task + 1) * kRows); ++r) {
      const T* x = xs + r * n;
      float best;
      int64_t at;
      RowMax(x, n, &best, &at);
      const float total = best + std::log(SumExp(x, n, best));
      const int32_t y = labels[r];
      lse[r] = total;
      loss[r] = y >= 0 && y < n ? total - Load(x, y) : std::numeric_limits<float>::quiet_NaN();
      prediction[r] = static_cast<int32_t>(at);
    }
  });
}

template <typename T>
void BackwardRows(ffi::ThreadPool& pool, const T* xs, const int32_t* labels, const float* lse,
                  const float* gs, T* ds, int64_t m, int64_t n) {
  ParallelFor(pool, (m + kRows - 1) / kRows, [&](int64_t task) {
    for (int64_t r = task * kRows; r < std::min(m, (task + 1) * kRows); ++r) {
      const T* x = xs + r * n;
      T* d = ds + r * n;
      const float g = gs[r], shift = lse[r];
      if (g == 0.0f) {  // an ignored position: no exponentials
        std::fill(d, d + n, T{});
        continue;
      }
      int64_t c = 0;
#if defined(__AVX512F__)
      const __m512 s = _mm512_set1_ps(shift), gv = _mm512_set1_ps(g);
      for (; c + 16 <= n; c += 16)
        StoreV(d + c, 0xffff, _mm512_mul_ps(ExpV(_mm512_sub_ps(LoadV(x + c, 0xffff), s)), gv));
#endif
      for (; c < n; ++c) Store(d, c, std::exp(Load(x, c) - shift) * g);
      const int32_t y = labels[r];
      if (y >= 0 && y < n) Store(d, y, (std::exp(Load(x, y) - shift) - 1.0f) * g);
    }
  });
}

ffi::Error Check(const ffi::AnyBuffer& logits, const ffi::Buffer<ffi::S32>& labels) {
  if (logits.dimensions().size() != 2 || labels.dimensions().size() != 1 ||
      labels.dimensions()[0] != logits.dimensions()[0])
    return ffi::Error::InvalidArgument("cross_entropy takes logits [N, V] and labels [N]");
  if (logits.element_type() != ffi::F32 && logits.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument("cross_entropy takes float32 or bfloat16 logits");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer logits, ffi::Buffer<ffi::S32> labels,
                   ffi::Result<ffi::Buffer<ffi::F32>> loss, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                   ffi::Result<ffi::Buffer<ffi::S32>> prediction) {
  if (ffi::Error e = Check(logits, labels); e.failure()) return e;
  const int64_t m = logits.dimensions()[0], n = logits.dimensions()[1];
  if (logits.element_type() == ffi::BF16)
    ForwardRows(pool, In<uint16_t>(logits), labels.typed_data(), loss->typed_data(),
                lse->typed_data(), prediction->typed_data(), m, n);
  else
    ForwardRows(pool, In<float>(logits), labels.typed_data(), loss->typed_data(),
                lse->typed_data(), prediction->typed_data(), m, n);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer logits, ffi::Buffer<ffi::S32> labels,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> g,
                    ffi::Result<ffi::AnyBuffer> d) {
  if (ffi::Error e = Check(logits, labels); e.failure()) return e;
  const int64_t m = logits.dimensions()[0], n = logits.dimensions()[1];
  if (static_cast<int64_t>(lse.element_count()) != m ||
      static_cast<int64_t>(g.element_count()) != m || d->element_type() != logits.element_type())
    return ffi::Error::InvalidArgument(
        "cross_entropy_grad takes lse and g [N] and returns the logits' shape and dtype");
  if (logits.element_type() == ffi::BF16)
    BackwardRows(pool, In<uint16_t>(logits), labels.typed_data(), lse.typed_data(),
                 g.typed_data(), Out<uint16_t>(d), m, n);
  else
    BackwardRows(pool, In<float>(logits), labels.typed_data(), lse.typed_data(), g.typed_data(),
                 Out<float>(d), m, n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxCrossEntropy, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // logits [N, V]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // labels [N]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // loss [N]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // log-sum-exp [N]
                                  .Ret<ffi::Buffer<ffi::S32>>()); // first maximum [N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxCrossEntropyGrad, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // logits [N, V]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // labels [N]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // log-sum-exp [N]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g, the loss's cotangent [N]
                                  .Ret<ffi::AnyBuffer>());        // d logits
