// LayerNorm over the last axis for XLA:CPU, as two XLA FFI custom calls: the forward, which also
// returns each row's mean and 1 / std for the backward pass, and the backward, which returns the
// input gradient and the scale and bias gradients.
//
// Why: XLA:CPU runs a LayerNorm's forward as ~4 and its backward as ~6 passes over the
// [tokens, D] stream (row reductions on YNNPACK, loop fusions, the scale and bias gradients as
// reductions over the tokens), most of them on one thread: in MiniLM's float32 step at 32 x 128
// tokens, ~1.2 ms forward and ~4.3 ms backward per LayerNorm, two per layer. Here each pass
// reads its rows once, on both threads, and sums the parameters' gradients as it goes.
//
// Semantics are those of ftjax.models.layers._normalize (float32 throughout):
//   mean = sum(x) / D,  rstd = 1 / sqrt(sum((x - mean)^2) / D + eps)   (two-pass, as torch)
//   y = (x - mean) * (rstd * scale) + bias
//   xhat = (x - mean) rstd,  gs = g scale
//   dx = rstd (gs - mean(gs) - xhat mean(gs xhat)),  d_scale = sum_rows g xhat,  d_bias = sum g
//
// Layouts: x, y, g, dx [M, D] row-major float32; mean, rstd [M]; scale, bias and their
// gradients [D].

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

// Rows per task; the parameter gradients sum each task's rows, then the tasks in order, so
// their values do not depend on which thread ran what.
constexpr int64_t kRows = 128;

// sum(x) and sum((x - shift)^2) of one row (n values; nothing past them is read).
inline float RowSum(const float* x, int64_t n) {
#if defined(__AVX512F__)
  __m512 s = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16)
    s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(Live(n, c), x + c));
  return _mm512_reduce_add_ps(s);
#else
  float s = 0.0f;
  for (int64_t c = 0; c < n; ++c) s += x[c];
  return s;
#endif
}

inline float RowSquares(const float* x, int64_t n, float shift) {
#if defined(__AVX512F__)
  __m512 s = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(shift);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 live = Live(n, c);
    const __m512 d = _mm512_maskz_sub_ps(live, _mm512_maskz_loadu_ps(live, x + c), m);
    s = _mm512_fmadd_ps(d, d, s);
  }
  return _mm512_reduce_add_ps(s);
#else
  float s = 0.0f;
  for (int64_t c = 0; c < n; ++c) s += (x[c] - shift) * (x[c] - shift);
  return s;
#endif
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, float eps, ffi::Result<ffi::Buffer<ffi::F32>> y,
                   ffi::Result<ffi::Buffer<ffi::F32>> mean,
                   ffi::Result<ffi::Buffer<ffi::F32>> rstd) {
  if (x.dimensions().size() != 2 || scale.element_count() != x.dimensions()[1] ||
      bias.element_count() != x.dimensions()[1])
    return ffi::Error::InvalidArgument("layer_norm takes x [M, D], scale [D] and bias [D]");
  const int64_t m = x.dimensions()[0], n = x.dimensions()[1];
  const float *xs = x.typed_data(), *sc = scale.typed_data(), *bs = bias.typed_data();
  float *ys = y->typed_data(), *means = mean->typed_data(), *rstds = rstd->typed_data();
  ParallelFor(pool, (m + kRows - 1) / kRows, [&](int64_t task) {
    for (int64_t r = task * kRows; r < std::min(m, (task + 1) * kRows); ++r) {
      const float* xr = xs + r * n;
      float* yr = ys + r * n;
      const float mu = RowSum(xr, n) / static_cast<float>(n);
      const float rs = 1.0f / std::sqrt(RowSquares(xr, n, mu) / static_cast<float>(n) + eps);
      means[r] = mu;
      rstds[r] = rs;
      int64_t c = 0;
#if defined(__AVX512F__)
      for (; c + 16 <= n; c += 16) {
        const __m512 factor = _mm512_mul_ps(_mm512_set1_ps(rs), _mm512_loadu_ps(sc + c));
        _mm512_storeu_ps(yr + c, _mm512_fmadd_ps(
            _mm512_sub_ps(_mm512_loadu_ps(xr + c), _mm512_set1_ps(mu)), factor,
            _mm512_loadu_ps(bs + c)));
      }
#endif
      for (; c < n; ++c) yr[c] = (xr[c] - mu) * (rs * sc[c]) + bs[c];
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> g, ffi::Result<ffi::Buffer<ffi::F32>> dx,
                    ffi::Result<ffi::Buffer<ffi::F32>> d_scale,
                    ffi::Result<ffi::Buffer<ffi::F32>> d_bias) {
  if (x.dimensions().size() != 2 || g.element_count() != x.element_count() ||
      mean.element_count() != x.dimensions()[0] || rstd.element_count() != x.dimensions()[0] ||
      scale.element_count() != x.dimensions()[1])
    return ffi::Error::InvalidArgument("layer_norm_grad: operands do not match x [M, D]");
  const int64_t m = x.dimensions()[0], n = x.dimensions()[1];
  const int64_t tasks = (m + kRows - 1) / kRows;
  const float *xs = x.typed_data(), *means = mean.typed_data(), *rstds = rstd.typed_data(),
              *sc = scale.typed_data(), *gs = g.typed_data();
  float* dxs = dx->typed_data();
  // Each task's sums of g xhat and of g, [tasks][2][D].
  std::vector<float> partial(tasks * 2 * n, 0.0f);
  ParallelFor(pool, tasks, [&](int64_t task) {
    float* sum_gx = partial.data() + task * 2 * n;
    float* sum_g = sum_gx + n;
    for (int64_t r = task * kRows; r < std::min(m, (task + 1) * kRows); ++r) {
      const float *xr = xs + r * n, *gr = gs + r * n;
      float* dr = dxs + r * n;
      const float mu = means[r], rs = rstds[r];
      // Pass 1: the row's mean(gs) and mean(gs xhat), and the parameters' sums.
      float a = 0.0f, b = 0.0f;
      int64_t c = 0;
#if defined(__AVX512F__)
      __m512 va = _mm512_setzero_ps(), vb = _mm512_setzero_ps();
      for (; c < n; c += 16) {
        const __mmask16 live = Live(n, c);
        const __m512 xhat = _mm512_mul_ps(
            _mm512_maskz_sub_ps(live, _mm512_maskz_loadu_ps(live, xr + c), _mm512_set1_ps(mu)),
            _mm512_set1_ps(rs));
        const __m512 gv = _mm512_maskz_loadu_ps(live, gr + c);
        const __m512 gsv = _mm512_mul_ps(gv, _mm512_maskz_loadu_ps(live, sc + c));
        va = _mm512_add_ps(va, gsv);
        vb = _mm512_fmadd_ps(gsv, xhat, vb);
        _mm512_mask_storeu_ps(sum_gx + c, live, _mm512_fmadd_ps(
            gv, xhat, _mm512_maskz_loadu_ps(live, sum_gx + c)));
        _mm512_mask_storeu_ps(sum_g + c, live,
                              _mm512_add_ps(gv, _mm512_maskz_loadu_ps(live, sum_g + c)));
      }
      a = _mm512_reduce_add_ps(va);
      b = _mm512_reduce_add_ps(vb);
#else
      for (; c < n; ++c) {
        const float xhat = (xr[c] - mu) * rs, gsv = gr[c] * sc[c];
        a += gsv;
        b += gsv * xhat;
        sum_gx[c] += gr[c] * xhat;
        sum_g[c] += gr[c];
      }
#endif
      a /= static_cast<float>(n);
      b /= static_cast<float>(n);
      // Pass 2 (the row is in L1): dx.
      c = 0;
#if defined(__AVX512F__)
      for (; c + 16 <= n; c += 16) {
        const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + c),
                                                        _mm512_set1_ps(mu)), _mm512_set1_ps(rs));
        const __m512 gsv = _mm512_mul_ps(_mm512_loadu_ps(gr + c), _mm512_loadu_ps(sc + c));
        const __m512 inner = _mm512_fnmadd_ps(xhat, _mm512_set1_ps(b),
                                              _mm512_sub_ps(gsv, _mm512_set1_ps(a)));
        _mm512_storeu_ps(dr + c, _mm512_mul_ps(_mm512_set1_ps(rs), inner));
      }
#endif
      for (; c < n; ++c) {
        const float xhat = (xr[c] - mu) * rs;
        dr[c] = rs * (gr[c] * sc[c] - a - xhat * b);
      }
    }
  });
  SumTasks(partial.data(), tasks, 2 * n, n, d_scale->typed_data());
  SumTasks(partial.data() + n, tasks, 2 * n, n, d_bias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxLayerNorm, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()); // rstd

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxLayerNormGrad, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()   // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d_scale
                                  .Ret<ffi::Buffer<ffi::F32>>()); // d_bias
