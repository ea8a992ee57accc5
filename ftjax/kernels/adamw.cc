// AdamW's whole update for XLA:CPU as one XLA FFI custom call: every parameter of a group, its
// gradient and both moments read once, the parameter and moments written back in place.
//
// Why: XLA:CPU runs optax-style AdamW as three loop fusions per parameter (the first moment,
// the second moment, the update) plus the addition of the update to the parameter. The
// gradient and the moments are read by more than one of them, so a step makes ten passes over
// memory for each parameter: on the default job's 10.8M trained parameters the update took
// 12.0-12.5 ms of a ~72 ms step, memory-bound. Here it takes seven passes (reads of p, g, m, v;
// writes of p, m, v), with the writes aliased to the donated inputs: the step 73.7 -> 69.5 ms.
//
// Operands: `scalars` (float32[4]: learning rate, gradient scale, 1 - b1^t, 1 - b2^t: values
// traced in the step), then N parameters, N gradients, N first moments, N second moments
// (float32, each group of four of one shape). Results: N parameters, N first moments, N second
// moments, aliased to the operands by the Python side. The arithmetic is `ftjax.optim.adamw`'s
// in float32, bit for bit as XLA:CPU compiles it (see Update):
//   m' = b1 m + c1 g,  v' = b2 v + (c2 g) g,  with c1 = (1 - b1) s, c2 = (1 - b2) s s
//   p' = p - lr ((m' / bc1) / (sqrt(v' / bc2) + eps) + wd p)
// where s is the gradient scale (global-norm clipping folded in).

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

// Elements per task: big enough that a task's set-up is noise, small enough that the two
// threads of a small machine split the biggest parameters evenly.
constexpr int64_t kChunk = 1 << 15;

struct Coefficients {
  float b1, b2, c1, c2, r1, r2, eps, neg_lr, wd;
};

// The operations are those XLA:CPU compiles `optim.adamw` to, so that both give the same bits
// (tests/test_optim.py): it contracts a product and a sum into one fused multiply-add, and
// divides by a scalar as a product with its reciprocal.
void Update(const Coefficients& k, const float* g, float* p, float* m, float* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 b1 = _mm512_set1_ps(k.b1), b2 = _mm512_set1_ps(k.b2), c1 = _mm512_set1_ps(k.c1),
               c2 = _mm512_set1_ps(k.c2), r1 = _mm512_set1_ps(k.r1), r2 = _mm512_set1_ps(k.r2),
               eps = _mm512_set1_ps(k.eps), neg_lr = _mm512_set1_ps(k.neg_lr),
               wd = _mm512_set1_ps(k.wd);
  for (; i + 16 <= n; i += 16) {
    const __m512 gi = _mm512_loadu_ps(g + i), pi = _mm512_loadu_ps(p + i);
    const __m512 mi = _mm512_fmadd_ps(b1, _mm512_loadu_ps(m + i), _mm512_mul_ps(c1, gi));
    const __m512 vi = _mm512_fmadd_ps(b2, _mm512_loadu_ps(v + i),
                                      _mm512_mul_ps(_mm512_mul_ps(c2, gi), gi));
    const __m512 root = _mm512_add_ps(_mm512_sqrt_ps(_mm512_mul_ps(vi, r2)), eps);
    __m512 step = _mm512_div_ps(_mm512_mul_ps(mi, r1), root);
    if (k.wd != 0.0f) step = _mm512_fmadd_ps(wd, pi, step);
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
    _mm512_storeu_ps(p + i, _mm512_fmadd_ps(neg_lr, step, pi));
  }
#endif
  for (; i < n; ++i) {
    const float mi = std::fma(k.b1, m[i], k.c1 * g[i]);
    const float vi = std::fma(k.b2, v[i], (k.c2 * g[i]) * g[i]);
    float step = (mi * k.r1) / (std::sqrt(vi * k.r2) + k.eps);
    if (k.wd != 0.0f) step = std::fma(k.wd, p[i], step);
    m[i] = mi;
    v[i] = vi;
    p[i] = std::fma(k.neg_lr, step, p[i]);
  }
}

ffi::Error AdamW(ffi::ThreadPool pool, ffi::AnyBuffer scalars, ffi::RemainingArgs args,
                 ffi::RemainingRets rets, float b1, float b2, float one_minus_b1,
                 float one_minus_b2, float eps, float weight_decay) {
  if (scalars.element_type() != ffi::F32 || scalars.element_count() != 4)
    return ffi::Error::InvalidArgument("adamw: scalars must be float32[4]");
  const int64_t n = static_cast<int64_t>(args.size()) / 4;
  if (static_cast<int64_t>(args.size()) != 4 * n || static_cast<int64_t>(rets.size()) != 3 * n)
    return ffi::Error::InvalidArgument("adamw: expected 4 N operands and 3 N results");
  struct Leaf {
    const float* g;
    float *p, *m, *v;
    int64_t size;
  };
  std::vector<Leaf> leaves(n);
  for (int64_t j = 0; j < n; ++j) {
    float* out[3];
    for (int r = 0; r < 3; ++r) {
      auto ret = rets.get<ffi::AnyBuffer>(r * n + j);
      if (ret.has_error()) return ret.error();
      out[r] = reinterpret_cast<float*>((*ret)->untyped_data());
    }
    const float* in[4];
    int64_t size = -1;
    for (int a = 0; a < 4; ++a) {
      auto arg = args.get<ffi::AnyBuffer>(a * n + j);
      if (arg.has_error()) return arg.error();
      if (arg->element_type() != ffi::F32)
        return ffi::Error::InvalidArgument("adamw: parameters, gradients and moments must be "
                                           "float32");
      if (size >= 0 && static_cast<int64_t>(arg->element_count()) != size)
        return ffi::Error::InvalidArgument("adamw: a parameter's gradient or moments differ in "
                                           "size");
      size = static_cast<int64_t>(arg->element_count());
      in[a] = reinterpret_cast<const float*>(arg->untyped_data());
    }
    // Results alias the operands (the Python side asks XLA for that); where XLA gave separate
    // buffers, the old values are copied over first and updated there.
    const float* sources[3] = {in[0], in[2], in[3]};
    for (int r = 0; r < 3; ++r)
      if (out[r] != sources[r]) std::copy(sources[r], sources[r] + size, out[r]);
    leaves[j] = {in[1], out[0], out[1], out[2], size};
  }
  const float* s = reinterpret_cast<const float*>(scalars.untyped_data());
  const float lr = s[0], scale = s[1];
  // 1 - b1 and 1 - b2 come rounded from the Python side's double precision, as XLA's do (1 - b2
  // in float32 differs from them by 1e-5 relative at b2 = 0.999).
  const Coefficients k{b1, b2, one_minus_b1 * scale, one_minus_b2 * scale * scale,
                       1.0f / s[2], 1.0f / s[3], eps, -lr, weight_decay};
  // Tasks: each leaf cut into chunks, so big and small parameters spread over the threads.
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (leaf, first element)
  for (int64_t j = 0; j < n; ++j)
    for (int64_t start = 0; start < leaves[j].size; start += kChunk) tasks.push_back({j, start});
  ParallelFor(pool, static_cast<int64_t>(tasks.size()), [&](int64_t t) {
    const auto [j, start] = tasks[t];
    const Leaf& leaf = leaves[j];
    const int64_t count = std::min(kChunk, leaf.size - start);
    Update(k, leaf.g + start, leaf.p + start, leaf.m + start, leaf.v + start, count);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // scalars
                                  .RemainingArgs()  // parameters, gradients, moments
                                  .RemainingRets()  // parameters, moments
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay"));
