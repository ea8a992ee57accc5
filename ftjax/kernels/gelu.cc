// A dense layer's bias and exact GELU (BERT's FFN activation) for XLA:CPU, as two XLA FFI custom
// calls: the forward gelu(y + b) and the backward, which returns d(y + b) and the bias gradient.
//
// Why: XLA:CPU runs the bias add and GELU after the FFN's first product as one loop fusion and
// its backward as another plus a reduction for the bias gradient, each on one thread: at MiniLM's
// 4096 x 1536 float32 they took ~2.1, ~4.3 and ~1.5 ms a layer while the other core idled. Here
// both threads share the rows, and the backward sums the bias gradient as it writes d(y + b),
// without another pass over it.
//
// Semantics are those of ftjax.models.layers.gelu on z = y + b (float32):
//   forward   out = 0.5 z (1 + erf(z / sqrt 2))
//   backward  d = g (Phi(z) + z phi(z)),  Phi(z) = 0.5 (1 + erf(z / sqrt 2)),
//             phi(z) = exp(-z^2 / 2) / sqrt(2 pi);  db = sum of d over the rows (float32)
// erf is a rational approximation x P(x^2) / Q(x^2) on |x| < 3.8325 (common.h: from there on
// erf(x) is +-1, as it rounds in float32), its coefficients fitted for the least maximum
// absolute error: at most 3.7e-7 against the exact erf, XLA:CPU's own float32 erf 3.1e-7
// (GELU: 1.0e-6 and 1.1e-6).
//
// Layouts: y, g, out, d [M, N] row-major, float32 or (all four) bfloat16, computed in float32
// and rounded once; b, db [N] float32.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

namespace {

using namespace ftjax;  // NOLINT: the shared helpers of common.h

// Rows per task: 256 rows of a 1536-wide FFN are 1.5 MiB of each operand, a 16-way split of
// MiniLM's 4096 tokens. The bias gradient sums each task's rows, then the tasks in order, so
// its value does not depend on which thread ran what.
constexpr int64_t kRows = 256;

// y and out (forward), y, g and d (backward) share one dtype, float32 or bfloat16 (T: float or
// uint16_t); b and db are float32. A bfloat16 y + b and GELU are computed in float32 and
// rounded once.
ffi::Error Check(const ffi::AnyBuffer& y, const ffi::Buffer<ffi::F32>& b) {
  if (y.dimensions().size() != 2 || b.dimensions().size() != 1 ||
      b.dimensions()[0] != y.dimensions()[1])
    return ffi::Error::InvalidArgument("bias_gelu takes y [M, N] and b [N]");
  if (y.element_type() != ffi::F32 && y.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument("bias_gelu takes float32 or bfloat16 y");
  return ffi::Error::Success();
}

template <typename T>
void ForwardRows(ffi::ThreadPool& pool, const T* ys, const float* bs, T* os, int64_t m,
                 int64_t n) {
  ParallelFor(pool, (m + kRows - 1) / kRows, [&](int64_t task) {
    for (int64_t r = task * kRows; r < std::min(m, (task + 1) * kRows); ++r) {
      const T* yr = ys + r * n;
      T* o = os + r * n;
      int64_t c = 0;
#if defined(__AVX512F__)
      for (; c + 16 <= n; c += 16) {
        const __m512 z = _mm512_add_ps(LoadV(yr + c, 0xffff), _mm512_loadu_ps(bs + c));
        StoreV(o + c, 0xffff, _mm512_mul_ps(z, CdfV(z)));
      }
#endif
      for (; c < n; ++c) {
        const float z = Load(yr, c) + bs[c];
        Store(o, c, z * Cdf(z));
      }
    }
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer y, ffi::Buffer<ffi::F32> b,
                   ffi::Result<ffi::AnyBuffer> out) {
  if (ffi::Error e = Check(y, b); e.failure()) return e;
  if (out->element_type() != y.element_type())
    return ffi::Error::InvalidArgument("bias_gelu's output must have y's dtype");
  const int64_t m = y.dimensions()[0], n = y.dimensions()[1];
  if (y.element_type() == ffi::BF16)
    ForwardRows(pool, In<uint16_t>(y), b.typed_data(), Out<uint16_t>(out), m, n);
  else
    ForwardRows(pool, In<float>(y), b.typed_data(), Out<float>(out), m, n);
  return ffi::Error::Success();
}

// d = g gelu'(y + b), stored as T, and db = the column sums of d before rounding.
template <typename T>
void BackwardRows(ffi::ThreadPool& pool, const T* ys, const float* bs, const T* gs, T* ds,
                  float* db, int64_t m, int64_t n) {
  const int64_t tasks = (m + kRows - 1) / kRows;
  std::vector<float> partial(tasks * n, 0.0f);  // Each task's column sums.
  ParallelFor(pool, tasks, [&](int64_t task) {
    float* sum = partial.data() + task * n;
    for (int64_t r = task * kRows; r < std::min(m, (task + 1) * kRows); ++r) {
      const T *yr = ys + r * n, *gr = gs + r * n;
      T* dr = ds + r * n;
      int64_t c = 0;
#if defined(__AVX512F__)
      for (; c + 16 <= n; c += 16) {
        const __m512 z = _mm512_add_ps(LoadV(yr + c, 0xffff), _mm512_loadu_ps(bs + c));
        const __m512 dz = _mm512_mul_ps(LoadV(gr + c, 0xffff), SlopeV(z));
        StoreV(dr + c, 0xffff, dz);
        _mm512_storeu_ps(sum + c, _mm512_add_ps(_mm512_loadu_ps(sum + c), dz));
      }
#endif
      for (; c < n; ++c) {
        const float dz = Load(gr, c) * Slope(Load(yr, c) + bs[c]);
        Store(dr, c, dz);
        sum[c] += dz;
      }
    }
  });
  SumTasks(partial.data(), tasks, n, n, db);
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer y, ffi::Buffer<ffi::F32> b,
                    ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> d,
                    ffi::Result<ffi::Buffer<ffi::F32>> db) {
  if (ffi::Error e = Check(y, b); e.failure()) return e;
  if (g.element_count() != y.element_count() || g.element_type() != y.element_type() ||
      d->element_type() != y.element_type())
    return ffi::Error::InvalidArgument("bias_gelu's cotangent and d must have y's shape and dtype");
  const int64_t m = y.dimensions()[0], n = y.dimensions()[1];
  if (y.element_type() == ffi::BF16)
    BackwardRows(pool, In<uint16_t>(y), b.typed_data(), In<uint16_t>(g), Out<uint16_t>(d),
                 db->typed_data(), m, n);
  else
    BackwardRows(pool, In<float>(y), b.typed_data(), In<float>(g), Out<float>(d),
                 db->typed_data(), m, n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxBiasGelu, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // y
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Ret<ffi::AnyBuffer>());        // gelu(y + b)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxBiasGeluGrad, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // y
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::AnyBuffer>()          // g, the output's cotangent
                                  .Ret<ffi::AnyBuffer>()          // d(y + b)
                                  .Ret<ffi::Buffer<ffi::F32>>()); // db
