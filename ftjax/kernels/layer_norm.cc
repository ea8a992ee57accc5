// LayerNorm over the last axis for XLA:CPU, as two XLA FFI custom calls: the forward, which also
// returns each row's mean and 1 / std for the backward pass, and the backward, which returns the
// input gradient and the scale and bias gradients. Two more take a post-LayerNorm block's
// residual add and the dropout on its branch with them (AddLayerNorm, AddLayerNormGrad):
//   s = x + dropout(y),  out = LayerNorm(s)
// where the forward writes s (the backward's input), out, and the keep-mask's bits, and the
// backward returns ds (the residual's gradient) and dy = dropout's backward of ds.
//
// Why: XLA:CPU runs a LayerNorm's forward as ~4 and its backward as ~6 passes over the
// [tokens, D] stream (row reductions on YNNPACK, loop fusions, the scale and bias gradients as
// reductions over the tokens), most of them on one thread: in MiniLM's float32 step at 32 x 128
// tokens, ~1.2 ms forward and ~4.3 ms backward per LayerNorm, two per layer. Here each pass
// reads its rows once, on both threads, and sums the parameters' gradients as it goes.
//
// Semantics are those of ftjax.models.layers._normalize (in float32; bfloat16 streams are read as
// float32 and rounded once where written, s before its statistics):
//   mean = sum(x) / D,  rstd = 1 / sqrt(sum((x - mean)^2) / D + eps)   (two-pass, as torch)
//   y = (x - mean) * (rstd * scale) + bias
//   xhat = (x - mean) rstd,  gs = g scale
//   dx = rstd (gs - mean(gs) - xhat mean(gs xhat)),  d_scale = sum_rows g xhat,  d_bias = sum g
//
// Layouts: x, y, s, out, g, dx, ds, dy [M, D] row-major, float32 or (all of a call's) bfloat16;
// mean, rstd [M], scale, bias and their gradients [D] float32.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
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

// The streams (x, y, s, out, g, dx, ds, dy) share one dtype, float32 or bfloat16 (T: float or
// uint16_t), read as float32 and rounded once where written; the statistics and the parameters
// and their gradients are float32.

// sum(x) and sum((x - shift)^2) of one row (n values; nothing past them is read).
template <typename T>
inline float RowSum(const T* x, int64_t n) {
#if defined(__AVX512F__)
  __m512 s = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) s = _mm512_add_ps(s, LoadV(x + c, Live(n, c)));
  return _mm512_reduce_add_ps(s);
#else
  float s = 0.0f;
  for (int64_t c = 0; c < n; ++c) s += Load(x, c);
  return s;
#endif
}

template <typename T>
inline float RowSquares(const T* x, int64_t n, float shift) {
#if defined(__AVX512F__)
  __m512 s = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(shift);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 live = Live(n, c);
    const __m512 d = _mm512_maskz_sub_ps(live, LoadV(x + c, live), m);
    s = _mm512_fmadd_ps(d, d, s);
  }
  return _mm512_reduce_add_ps(s);
#else
  float s = 0.0f;
  for (int64_t c = 0; c < n; ++c) s += (Load(x, c) - shift) * (Load(x, c) - shift);
  return s;
#endif
}

// One row of the forward: yr = LayerNorm(xr), and the row's mean and 1 / std.
template <typename T>
inline void NormalizeRow(const T* xr, int64_t n, const float* sc, const float* bs, float eps,
                         T* yr, float* mean, float* rstd) {
  const float mu = RowSum(xr, n) / static_cast<float>(n);
  const float rs = 1.0f / std::sqrt(RowSquares(xr, n, mu) / static_cast<float>(n) + eps);
  *mean = mu;
  *rstd = rs;
  int64_t c = 0;
#if defined(__AVX512F__)
  for (; c + 16 <= n; c += 16) {
    const __m512 factor = _mm512_mul_ps(_mm512_set1_ps(rs), _mm512_loadu_ps(sc + c));
    StoreV(yr + c, 0xffff, _mm512_fmadd_ps(
        _mm512_sub_ps(LoadV(xr + c, 0xffff), _mm512_set1_ps(mu)), factor,
        _mm512_loadu_ps(bs + c)));
  }
#endif
  for (; c < n; ++c) Store(yr, c, (Load(xr, c) - mu) * (rs * sc[c]) + bs[c]);
}

bool Matches(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::F32>& scale,
             const ffi::Buffer<ffi::F32>& bias) {
  return x.dimensions().size() == 2 &&
         static_cast<int64_t>(scale.element_count()) == x.dimensions()[1] &&
         static_cast<int64_t>(bias.element_count()) == x.dimensions()[1];
}

// Whether every stream is float32, or every one bfloat16.
bool OneDtype(std::initializer_list<ffi::DataType> types) {
  const ffi::DataType first = *types.begin();
  if (first != ffi::F32 && first != ffi::BF16) return false;
  for (ffi::DataType t : types)
    if (t != first) return false;
  return true;
}

template <typename T>
void ForwardRows(ffi::ThreadPool& pool, const T* xs, const float* sc, const float* bs,
                 float eps, int64_t m, int64_t n, T* ys, float* means, float* rstds) {
  ParallelFor(pool, (m + kRows - 1) / kRows, [&](int64_t task) {
    for (int64_t r = task * kRows; r < std::min(m, (task + 1) * kRows); ++r)
      NormalizeRow(xs + r * n, n, sc, bs, eps, ys + r * n, means + r, rstds + r);
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, float eps, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::Buffer<ffi::F32>> mean,
                   ffi::Result<ffi::Buffer<ffi::F32>> rstd) {
  if (!Matches(x, scale, bias) || !OneDtype({x.element_type(), y->element_type()}))
    return ffi::Error::InvalidArgument(
        "layer_norm takes x [M, D] (float32 or bfloat16, y likewise), scale [D] and bias [D]");
  const int64_t m = x.dimensions()[0], n = x.dimensions()[1];
  const float *sc = scale.typed_data(), *bs = bias.typed_data();
  float *means = mean->typed_data(), *rstds = rstd->typed_data();
  if (x.element_type() == ffi::BF16)
    ForwardRows(pool, In<uint16_t>(x), sc, bs, eps, m, n, Out<uint16_t>(y), means, rstds);
  else
    ForwardRows(pool, In<float>(x), sc, bs, eps, m, n, Out<float>(y), means, rstds);
  return ffi::Error::Success();
}

// Keep-mask words per row of n values (one bit per value, 16 a word).
inline int64_t Words(int64_t n) { return (n + 15) / 16; }

template <typename T>
void AddNormRows(ffi::ThreadPool& pool, const T* xs, const T* ys, const float* sc, const float* bs,
             float eps, const Dropout& drop, int64_t m, int64_t n, T* outs, T* ss,
             float* means, float* rstds, uint16_t* bits) {
  const int64_t words = Words(n);
  const bool dropout = drop.rate > 0.0f;
  ParallelFor(pool, (m + kRows - 1) / kRows, [&](int64_t task) {
    for (int64_t r = task * kRows; r < std::min(m, (task + 1) * kRows); ++r) {
      const T *xr = xs + r * n, *yr = ys + r * n;
      T* sr = ss + r * n;
      for (int64_t w = 0; w < words; ++w) {
        const int64_t c = 16 * w;
        // The flat index wraps at 2^32, as the reference's uint32 iota does.
        const uint16_t word =
            dropout ? KeepWord(static_cast<uint32_t>(r * n + c), drop) : uint16_t{0xffff};
        if (dropout) bits[r * words + w] = word;
#if defined(__AVX512F__)
        const __mmask16 live = Live(n, c);
        __m512 yv = LoadV(yr + c, live);
        if (dropout) yv = _mm512_maskz_mul_ps(word, yv, _mm512_set1_ps(drop.keep_scale));
        StoreV(sr + c, live, _mm512_add_ps(LoadV(xr + c, live), yv));
#else
        for (int64_t i = 0; i < std::min<int64_t>(16, n - c); ++i) {
          const float kept = !dropout ? Load(yr, c + i)
                             : (word >> i) & 1 ? Load(yr, c + i) * drop.keep_scale : 0.0f;
          Store(sr, c + i, Load(xr, c + i) + kept);
        }
#endif
      }
      // s as stored (rounded, for bfloat16): what the backward pass reads.
      NormalizeRow(sr, n, sc, bs, eps, outs + r * n, means + r, rstds + r);
    }
  });
}

// s = x + dropout(y) (dropout as layers.Dropout: y * keep_scale where kept, else 0; the mask
// hashed from the element's flat index, its bits written to `keep`, [M, Words(D)] uint16, or
// nothing when rate is 0), then out = LayerNorm(s) with each row's mean and 1 / std.
ffi::Error AddForward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer y,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                      ffi::Buffer<ffi::U32> seeds, float eps, float rate, float keep_scale,
                      int64_t threshold, ffi::Result<ffi::AnyBuffer> out,
                      ffi::Result<ffi::AnyBuffer> s,
                      ffi::Result<ffi::Buffer<ffi::F32>> mean,
                      ffi::Result<ffi::Buffer<ffi::F32>> rstd,
                      ffi::Result<ffi::Buffer<ffi::U16>> keep) {
  if (!Matches(x, scale, bias) || y.element_count() != x.element_count() ||
      seeds.element_count() != 2 ||
      !OneDtype({x.element_type(), y.element_type(), out->element_type(), s->element_type()}))
    return ffi::Error::InvalidArgument(
        "add_layer_norm takes x and y [M, D] (float32 or bfloat16, out and s likewise), "
        "scale [D], bias [D] and two seeds");
  const int64_t m = x.dimensions()[0], n = x.dimensions()[1];
  if (rate > 0.0f && static_cast<int64_t>(keep->element_count()) != m * Words(n))
    return ffi::Error::InvalidArgument("add_layer_norm: the keep-mask must be [M, ceil(D / 16)]");
  const Dropout drop = MakeDropout(rate, keep_scale, seeds, threshold);
  const float *sc = scale.typed_data(), *bs = bias.typed_data();
  float *means = mean->typed_data(), *rstds = rstd->typed_data();
  uint16_t* bits = keep->typed_data();
  if (x.element_type() == ffi::BF16)
    AddNormRows(pool, In<uint16_t>(x), In<uint16_t>(y), sc, bs, eps, drop, m, n, Out<uint16_t>(out),
            Out<uint16_t>(s), means, rstds, bits);
  else
    AddNormRows(pool, In<float>(x), In<float>(y), sc, bs, eps, drop, m, n, Out<float>(out),
            Out<float>(s), means, rstds, bits);
  return ffi::Error::Success();
}

// LayerNorm's backward (dx, d_scale, d_bias) from x (the forward's input), its rows' mean and
// rstd, scale and the output's cotangent g; with `bits` (AddBackward), also dy = dropout's
// backward of dx (as stored): dx * keep_scale where the mask kept the element, else 0.
template <typename T>
void GradRows(ffi::ThreadPool& pool, const T* xs, const float* means, const float* rstds,
              const float* sc, const T* gs, int64_t m, int64_t n, T* dxs, float* d_scale,
              float* d_bias, const uint16_t* bits, float keep_scale, T* dys) {
  const int64_t tasks = (m + kRows - 1) / kRows, words = Words(n);
  // Each task's sums of g xhat and of g, [tasks][2][D].
  std::vector<float> partial(tasks * 2 * n, 0.0f);
  ParallelFor(pool, tasks, [&](int64_t task) {
    float* sum_gx = partial.data() + task * 2 * n;
    float* sum_g = sum_gx + n;
    for (int64_t r = task * kRows; r < std::min(m, (task + 1) * kRows); ++r) {
      const T *xr = xs + r * n, *gr = gs + r * n;
      T* dr = dxs + r * n;
      const float mu = means[r], rs = rstds[r];
      // Pass 1: the row's mean(gs) and mean(gs xhat), and the parameters' sums.
      float a = 0.0f, b = 0.0f;
      int64_t c = 0;
#if defined(__AVX512F__)
      __m512 va = _mm512_setzero_ps(), vb = _mm512_setzero_ps();
      for (; c < n; c += 16) {
        const __mmask16 live = Live(n, c);
        const __m512 xhat = _mm512_mul_ps(
            _mm512_maskz_sub_ps(live, LoadV(xr + c, live), _mm512_set1_ps(mu)),
            _mm512_set1_ps(rs));
        const __m512 gv = LoadV(gr + c, live);
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
        const float xhat = (Load(xr, c) - mu) * rs, gv = Load(gr, c), gsv = gv * sc[c];
        a += gsv;
        b += gsv * xhat;
        sum_gx[c] += gv * xhat;
        sum_g[c] += gv;
      }
#endif
      a /= static_cast<float>(n);
      b /= static_cast<float>(n);
      // Pass 2 (the row is in L1): dx.
      c = 0;
#if defined(__AVX512F__)
      for (; c + 16 <= n; c += 16) {
        const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(LoadV(xr + c, 0xffff),
                                                        _mm512_set1_ps(mu)), _mm512_set1_ps(rs));
        const __m512 gsv = _mm512_mul_ps(LoadV(gr + c, 0xffff), _mm512_loadu_ps(sc + c));
        const __m512 inner = _mm512_fnmadd_ps(xhat, _mm512_set1_ps(b),
                                              _mm512_sub_ps(gsv, _mm512_set1_ps(a)));
        StoreV(dr + c, 0xffff, _mm512_mul_ps(_mm512_set1_ps(rs), inner));
      }
#endif
      for (; c < n; ++c) {
        const float xhat = (Load(xr, c) - mu) * rs;
        Store(dr, c, rs * (Load(gr, c) * sc[c] - a - xhat * b));
      }
      if (!bits) continue;
      // Pass 3 (dx's row is in L1): dropout's backward.
      T* dyr = dys + r * n;
      for (int64_t w = 0; w < words; ++w) {
        const uint16_t word = bits[r * words + w];
        c = 16 * w;
#if defined(__AVX512F__)
        const __mmask16 live = Live(n, c);
        StoreV(dyr + c, live, _mm512_maskz_mul_ps(word, LoadV(dr + c, live),
                                                  _mm512_set1_ps(keep_scale)));
#else
        for (int64_t i = 0; i < std::min<int64_t>(16, n - c); ++i)
          Store(dyr, c + i, (word >> i) & 1 ? Load(dr, c + i) * keep_scale : 0.0f);
#endif
      }
    }
  });
  SumTasks(partial.data(), tasks, 2 * n, n, d_scale);
  SumTasks(partial.data() + n, tasks, 2 * n, n, d_bias);
}

ffi::Error Grad(ffi::ThreadPool& pool, const ffi::AnyBuffer& x,
                const ffi::Buffer<ffi::F32>& mean, const ffi::Buffer<ffi::F32>& rstd,
                const ffi::Buffer<ffi::F32>& scale, const ffi::AnyBuffer& g,
                ffi::Result<ffi::AnyBuffer>& dx, float* d_scale, float* d_bias,
                const uint16_t* bits, float keep_scale, ffi::Result<ffi::AnyBuffer>* dy) {
  const int64_t m = x.dimensions().size() == 2 ? x.dimensions()[0] : -1;
  const int64_t n = x.dimensions().size() == 2 ? x.dimensions()[1] : -1;
  if (m < 0 || g.element_count() != x.element_count() ||
      static_cast<int64_t>(mean.element_count()) != m ||
      static_cast<int64_t>(rstd.element_count()) != m ||
      static_cast<int64_t>(scale.element_count()) != n ||
      !OneDtype({x.element_type(), g.element_type(), dx->element_type(),
                 dy ? (*dy)->element_type() : x.element_type()}))
    return ffi::Error::InvalidArgument(
        "layer_norm_grad: operands do not match x [M, D] (float32 or bfloat16, g and dx too)");
  const float *means = mean.typed_data(), *rstds = rstd.typed_data(), *sc = scale.typed_data();
  if (x.element_type() == ffi::BF16)
    GradRows(pool, In<uint16_t>(x), means, rstds, sc, In<uint16_t>(g), m, n, Out<uint16_t>(dx),
             d_scale, d_bias, bits, keep_scale, dy ? Out<uint16_t>(*dy) : nullptr);
  else
    GradRows(pool, In<float>(x), means, rstds, sc, In<float>(g), m, n, Out<float>(dx), d_scale,
             d_bias, bits, keep_scale, dy ? Out<float>(*dy) : nullptr);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> scale,
                    ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::Buffer<ffi::F32>> d_scale,
                    ffi::Result<ffi::Buffer<ffi::F32>> d_bias) {
  return Grad(pool, x, mean, rstd, scale, g, dx, d_scale->typed_data(), d_bias->typed_data(),
              nullptr, 1.0f, nullptr);
}

// AddForward's backward with dropout (rate > 0): from s, its rows' statistics, scale, the
// output's cotangent g and the keep-mask's bits, (ds, dy, d_scale, d_bias). Without dropout,
// dy is ds and Backward serves.
ffi::Error AddBackward(ffi::ThreadPool pool, ffi::AnyBuffer s, ffi::Buffer<ffi::F32> mean,
                       ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> scale,
                       ffi::AnyBuffer g, ffi::Buffer<ffi::U16> keep, float keep_scale,
                       ffi::Result<ffi::AnyBuffer> ds, ffi::Result<ffi::AnyBuffer> dy,
                       ffi::Result<ffi::Buffer<ffi::F32>> d_scale,
                       ffi::Result<ffi::Buffer<ffi::F32>> d_bias) {
  if (s.dimensions().size() != 2 || dy->element_count() != s.element_count() ||
      static_cast<int64_t>(keep.element_count()) != s.dimensions()[0] * Words(s.dimensions()[1]))
    return ffi::Error::InvalidArgument(
        "add_layer_norm_grad: the keep-mask must be [M, ceil(D / 16)], dy like s");
  return Grad(pool, s, mean, rstd, scale, g, ds, d_scale->typed_data(), d_bias->typed_data(),
              keep.typed_data(), keep_scale, &dy);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxLayerNorm, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Attr<float>("eps")
                                  .Ret<ffi::AnyBuffer>()          // y
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()); // rstd

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxLayerNormGrad, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()   // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::AnyBuffer>()          // g
                                  .Ret<ffi::AnyBuffer>()          // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d_scale
                                  .Ret<ffi::Buffer<ffi::F32>>()); // d_bias

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxAddLayerNorm, AddForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x (the residual)
                                  .Arg<ffi::AnyBuffer>()          // y (the branch)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Arg<ffi::Buffer<ffi::U32>>()   // seeds
                                  .Attr<float>("eps")
                                  .Attr<float>("rate")
                                  .Attr<float>("keep_scale")
                                  .Attr<int64_t>("threshold")
                                  .Ret<ffi::AnyBuffer>()          // out
                                  .Ret<ffi::AnyBuffer>()          // s
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()   // rstd
                                  .Ret<ffi::Buffer<ffi::U16>>()); // keep

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxAddLayerNormGrad, AddBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // s
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()   // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::AnyBuffer>()          // g
                                  .Arg<ffi::Buffer<ffi::U16>>()   // keep
                                  .Attr<float>("keep_scale")
                                  .Ret<ffi::AnyBuffer>()          // ds
                                  .Ret<ffi::AnyBuffer>()          // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d_scale
                                  .Ret<ffi::Buffer<ffi::F32>>()); // d_bias
