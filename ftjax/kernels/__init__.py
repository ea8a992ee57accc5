"""Native CPU kernels, built from source on first use with the machine's C++ compiler.

- `attention.cc`: a fused scaled dot-product attention (forward and backward) for XLA:CPU,
  its bfloat16 products in the matmul kernel's fastest variant (below) on the machine.
- `matmul.cc`: a dense matrix product for dense layers (with their bias folded in: the forward
  product starts from it, or for bfloat16 adds it before the one rounding, and the input
  gradient returns its gradient), in three variants:
  `fma` multiplies with float32 FMAs (float32 layers; and bfloat16 ones on CPUs whose bfloat16 dot
  instruction is slow, converting their operands to float32 as it packs them), `dot` packs pairs
  of bfloat16 and multiplies with that instruction (for CPUs where it is fast and XLA's dot leaves
  part of it unused), `amx` multiplies the same packed pairs on Intel AMX's tile registers
  (Sapphire Rapids and later).
- `adamw.cc`: AdamW's whole update of a parameter group in one call, each parameter, gradient
  and moment read once and the parameter and moments written back in place (`optim.adamw`).
- `gelu.cc`: a dense layer's bias add and exact GELU (BERT's FFN), forward and backward (with
  the bias gradient), on all threads (`layers.bias_gelu`); where the next float32 layer's input
  gradient runs on the matmul kernel, GELU's backward runs inside it instead
  (`matmul_gelu_grad`, `layers.feed_forward`).
- `layer_norm.cc`: LayerNorm over the last axis, forward and backward (with the scale and bias
  gradients), each one pass over its rows on all threads (`layers.LayerNorm`); and with a
  post-LayerNorm block's residual add and branch dropout folded in (`layers.residual_norm`).
  These two take float32 or bfloat16 streams (float32 inside, rounded once where written).
- `cross_entropy.cc`: softmax cross-entropy with integer labels over a language model's
  vocabulary, forward (each row's loss, log-sum-exp and first maximum, the prediction) and
  backward (the logits' gradient), each one pass over the logits on all threads
  (`tasks.softmax_cross_entropy`).
- `swiglu.cc`: the gated feed-forward layer's silu(gate) * up (Llama, Mistral, Qwen2), forward
  and backward, each one pass on all threads (`layers.silu_gate`).

All are registered with jax as XLA FFI custom calls, from one library compiled once per
machine, source and jaxlib (`-O3 -march=native`, against the FFI headers that jaxlib ships) into
`$FTJAX_KERNEL_CACHE` (default `~/.cache/ftjax/kernels`); `make setup` builds it ahead of the
first run. Where no compiler is found or the build fails, `available()` says False once, with
the reason in the log, and ftjax stays on XLA's own ops, which are the reference the kernels are
tested against.

`FTJAX_ATTENTION` chooses: `auto` (the default: the attention kernel on a single CPU device
where it builds), `xla` (never the kernel) or `fused` (the kernel wherever it applies; an error
if it cannot be built). `FTJAX_MATMUL` likewise: `auto` (bfloat16 dense layers on the matmul
kernel where it measured faster than XLA's bfloat16 dot on this machine, and float32 ones where
it measured faster than XLA's float32 dots), `xla` or `kernel`; `xla` also keeps GELU layers'
bias and activation, and LayerNorms, on XLA.
`FTJAX_ADAMW`: `auto` (float32 AdamW updates on the kernel on a single CPU device), `xla` or
`kernel`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import pathlib
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import launch
from ftjax.errors import FtjaxError

_HERE = pathlib.Path(__file__).parent
_SOURCES = tuple(_HERE / f'{name}.cc'
                 for name in ('attention', 'matmul', 'adamw', 'gelu', 'layer_norm',
                              'cross_entropy', 'swiglu'))
_HEADERS = (_HERE / 'common.h',)
_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
_TARGETS = {'ftjax_attention_forward': 'FtjaxAttentionForward',
            'ftjax_attention_backward': 'FtjaxAttentionBackward',
            'ftjax_matmul': 'FtjaxMatmul',
            'ftjax_matmul_plus': 'FtjaxMatmulPlus',
            'ftjax_dense': 'FtjaxDense',
            'ftjax_adamw': 'FtjaxAdamW',
            'ftjax_bias_gelu': 'FtjaxBiasGelu',
            'ftjax_bias_gelu_grad': 'FtjaxBiasGeluGrad',
            'ftjax_layer_norm': 'FtjaxLayerNorm',
            'ftjax_layer_norm_grad': 'FtjaxLayerNormGrad',
            'ftjax_add_layer_norm': 'FtjaxAddLayerNorm',
            'ftjax_add_layer_norm_grad': 'FtjaxAddLayerNormGrad',
            'ftjax_cross_entropy': 'FtjaxCrossEntropy',
            'ftjax_cross_entropy_grad': 'FtjaxCrossEntropyGrad',
            'ftjax_swiglu': 'FtjaxSwiglu',
            'ftjax_swiglu_grad': 'FtjaxSwigluGrad'}
CHOICES = ('auto', 'xla', 'fused')
MATMUL_CHOICES = ('auto', 'xla', 'kernel')
ADAMW_CHOICES = ('auto', 'xla', 'kernel')


class KernelUnavailable(FtjaxError):
  """The native kernel cannot be built or loaded on this machine."""


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
  value = os.environ.get(name, 'auto').strip().lower() or 'auto'
  if value not in choices:
    raise FtjaxError(f'{name}={value!r}: expected one of {", ".join(choices)} '
                     '(or unset, for auto)')
  return value


def choice() -> str:
  """`FTJAX_ATTENTION`, checked: one of CHOICES."""
  return _env_choice('FTJAX_ATTENTION', CHOICES)


def matmul_choice() -> str:
  """`FTJAX_MATMUL`, checked: one of MATMUL_CHOICES."""
  return _env_choice('FTJAX_MATMUL', MATMUL_CHOICES)


def adamw_choice() -> str:
  """`FTJAX_ADAMW`, checked: one of ADAMW_CHOICES."""
  return _env_choice('FTJAX_ADAMW', ADAMW_CHOICES)


def check_choices() -> None:
  """Raises FtjaxError now for a bad FTJAX_ATTENTION, FTJAX_MATMUL or FTJAX_ADAMW (not at a
  first trace)."""
  choice()
  matmul_choice()
  adamw_choice()


def cache_dir() -> pathlib.Path:
  return launch.native_cache_dir()


def _compiler() -> str:
  if path := launch.compiler():
    return path
  raise KernelUnavailable('no C++ compiler found (set CXX, or install g++)')


def library_path(compiler: str) -> pathlib.Path:
  """Where the build for these sources, compiler, flags, jaxlib and CPU lives."""
  key = hashlib.sha256()
  for part in (*(f.read_bytes() for f in _SOURCES + _HEADERS), compiler.encode(),
               ' '.join(_FLAGS).encode(), jax.__version__.encode(), jax.ffi.include_dir().encode(),
               (launch.cpuinfo('flags') or launch.cpuinfo('Features')).encode()):
    key.update(part)
    key.update(b'\0')
  return cache_dir() / f'kernels-{key.hexdigest()[:16]}.so'


def build() -> pathlib.Path:
  """Compiles the kernels unless this machine already has the build; returns the library."""
  compiler = _compiler()
  path = library_path(compiler)
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed: concurrent builds never load a half-written file.
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = pathlib.Path(tmp) / path.name
    cmd = [compiler, *_FLAGS, '-I', jax.ffi.include_dir(), *map(str, _SOURCES), '-o', str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
      lines = (done.stderr or done.stdout).strip().splitlines()
      reason = lines[-1] if lines else done.returncode
      raise KernelUnavailable(f'{" ".join(cmd[:2])} ... failed: {reason}')
    os.replace(out, path)
  return path


@functools.cache
def _library() -> ctypes.CDLL:
  return ctypes.cdll.LoadLibrary(str(build()))


@functools.cache
def _load() -> str:
  """Builds and registers the kernels once per process; '' on success, else the reason."""
  try:
    library = _library()
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform='cpu')
  except (KernelUnavailable, OSError, AttributeError) as e:
    return str(e) or type(e).__name__
  return ''


def has_amx() -> bool:
  """Whether the matmul kernel's `amx` variant runs here: built for a CPU with AMX, and Linux
  granted the process its tile registers (elsewhere `amx` runs as `dot`)."""
  return not _load() and bool(_library().FtjaxMatmulHasAmx())


def available() -> bool:
  """Whether the fused attention kernel is built and registered (building it if needed)."""
  return _loaded('FTJAX_ATTENTION', choice(), 'fused', 'attention kernel')


def _loaded(setting: str, mode: str, forced: str, what: str) -> bool:
  """Whether the kernels' library is built and registered; an error if `setting` is `forced`
  (the user asked for the kernel), else one warning and False when it cannot be."""
  reason = _load()
  if reason:
    if mode == forced:
      raise KernelUnavailable(f'{setting}={forced}, but the {what} is unavailable: {reason}')
    _warn_once(reason)
  return not reason


def _on_one_cpu(mode: str) -> bool:
  """The kernels run only on a single CPU device: their custom calls have no partitioning rule,
  so under a multi-device mesh XLA would gather their operands onto every device."""
  return mode != 'xla' and jax.default_backend() == 'cpu' and jax.device_count() == 1


@functools.cache
def _warn_once(reason: str) -> None:
  # One library holds all the kernels: whichever asks first, none is there.
  logging.warning('ftjax: CPU kernels (attention, matmul, AdamW, GELU, LayerNorm, '
                  'cross-entropy, SwiGLU) unavailable (%s); using XLA for all', reason)


def fused_attention_applies(q: jax.Array, k: jax.Array, v: jax.Array, dtype) -> bool:
  """Whether attention on these operands (q [B, L, H, K], k and v [B, S, G, K]) should run on
  the fused kernel.

  Only on a single CPU device (`_on_one_cpu`). The kernel takes float32 or bfloat16 operands of
  one dtype.
  """
  if not _on_one_cpu(choice()):
    return False
  dtypes = {jnp.dtype(q.dtype), jnp.dtype(k.dtype), jnp.dtype(v.dtype), jnp.dtype(dtype)}
  if len(dtypes) != 1 or dtypes.pop() not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    return False
  return available()


def _dropout_attrs(rate: float, dtype=jnp.float32) -> dict:
  """A dropout rate's attributes for the kernels' keep-mask (see `layers.keep_mask`); the kept
  values' scale 1 / (1 - rate) rounded to `dtype`, as `layers.Dropout` scales a `dtype` stream."""
  threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
  keep_scale = np.float32(np.asarray(1.0 / (1.0 - rate), jnp.dtype(dtype)))
  return {'rate': np.float32(rate), 'keep_scale': keep_scale, 'threshold': np.int64(threshold)}


def _attrs(scale: float, rate: float, dtype, variant: str | None) -> dict:
  chosen = _variant(dtype, variant)
  return {'scale': np.float32(scale), **_dropout_attrs(rate),
          'dot': chosen == 'dot', 'amx': chosen == 'amx'}


def _variant(dtype, variant: str | None) -> str:
  """Either kernel's variant for `dtype` operands: `fma` for float32; for bfloat16, `variant`
  (None: the fastest as measured on this machine, `bf16_matmul_plan`)."""
  if variant not in (None, *VARIANTS):
    raise ValueError(f'variant={variant!r}: expected one of {VARIANTS} or None')
  if jnp.dtype(dtype) != jnp.bfloat16:
    return 'fma'
  return variant or bf16_matmul_plan()['variant']


def attention_forward(q, k, v, bias, seeds, scale: float, rate: float,
                      variant: str | None = None):
  """(out, maximum, normaliser, keep) of the fused kernel: see attention.cc for the layouts.

  q [B, L, H, K], k and v [B, S, G, K] (H % G == 0), out like q: token-major, as the projections
  produce them. The softmax's row statistics are [B, G, Q, 1] with Q = H / G * L query rows per
  (batch, kv head); `keep` holds the dropout keep-mask as uint16 words ([B, G, Q, ceil(S / 16)];
  one word when `rate` is 0), hashed once here and read back by the backward pass. `variant`,
  for bfloat16 operands, as in `matmul`: its products on float32 FMAs ('fma') or on the CPU's
  bfloat16 dot instruction ('dot') or on Intel AMX's tiles ('amx'); None takes the one that the
  matmul measurement found fastest here (the instructions' speeds decide both).
  """
  (batch, length, heads, _), (keys, groups) = q.shape, k.shape[1:3]
  stats = (batch, groups, heads // groups * length)
  rows = jax.ShapeDtypeStruct((*stats, 1), jnp.float32)
  words = (*stats, -(-keys // 16)) if rate else (1,)
  call = jax.ffi.ffi_call('ftjax_attention_forward',
                          (jax.ShapeDtypeStruct(q.shape, q.dtype), rows, rows,
                           jax.ShapeDtypeStruct(words, jnp.uint16)),
                          vmap_method='sequential')
  return call(q, k, v, bias, seeds, **_attrs(scale, rate, q.dtype, variant))


def attention_backward(q, k, v, bias, seeds, maximum, normaliser, keep, out, d_out,
                       scale: float, rate: float, variant: str | None = None):
  """(d_q, d_k, d_v) of the fused kernel, d_out in q's dtype; `variant` as in the forward."""
  call = jax.ffi.ffi_call('ftjax_attention_backward',
                          tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)),
                          vmap_method='sequential')
  return call(q, k, v, bias, seeds, maximum, normaliser, keep, out, d_out,
              **_attrs(scale, rate, q.dtype, variant))


def _require(what: str) -> None:
  if reason := _load():
    raise KernelUnavailable(f'the {what} kernel is unavailable: {reason}')


def layer_kernel_applies(*operands: jax.Array) -> bool:
  """Whether a layer kernel (bias_gelu, layer_norm, add_layer_norm) should take these
  operands: all float32 or all bfloat16, on a single CPU device, unless FTJAX_MATMUL=xla."""
  mode = matmul_choice()
  return (len({jnp.dtype(x.dtype) for x in operands}) == 1
          and jnp.dtype(operands[0].dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
          and _on_one_cpu(mode) and _loaded('FTJAX_MATMUL', mode, 'kernel', 'layer kernels'))


def float32_kernel_applies(*operands: jax.Array) -> bool:
  """`layer_kernel_applies` for float32 operands only: what the model layers asked before the
  layer kernels took bfloat16 (kept so that `speed.py --ab` can build those layers)."""
  return all(x.dtype == jnp.float32 for x in operands) and layer_kernel_applies(*operands)


def _f32(x: jax.Array) -> jax.Array:
  """A parameter as the layer kernels take it: float32 (exact for a bfloat16 one)."""
  return x.astype(jnp.float32)


# The layer kernels' streams (y, x, g and what is computed from them) are float32 or bfloat16,
# one dtype per call, computed in float32 and rounded once where written; parameters, their
# gradients and the rows' statistics are float32.


def bias_gelu(y: jax.Array, bias: jax.Array) -> jax.Array:
  """gelu(y + bias), exact GELU (see gelu.cc), for y [..., N] and bias [N]; y's dtype."""
  _require('bias_gelu')
  call = jax.ffi.ffi_call('ftjax_bias_gelu', jax.ShapeDtypeStruct(y.shape, y.dtype),
                          vmap_method='sequential')
  return call(y.reshape(-1, y.shape[-1]), _f32(bias)).reshape(y.shape)


def bias_gelu_grad(y: jax.Array, bias: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(d(y + bias), d bias) of `bias_gelu` for the output cotangent g (y's shape and dtype);
  d bias in float32."""
  _require('bias_gelu_grad')
  call = jax.ffi.ffi_call('ftjax_bias_gelu_grad', (jax.ShapeDtypeStruct(y.shape, y.dtype),
                                                   jax.ShapeDtypeStruct(bias.shape, jnp.float32)),
                          vmap_method='sequential')
  flat = (-1, y.shape[-1])
  d, d_bias = call(y.reshape(flat), _f32(bias), g.reshape(flat))
  return d.reshape(y.shape), d_bias


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up (see swiglu.cc) for gate and up of one shape and dtype (float32 or
  bfloat16, computed in float32 and rounded once)."""
  _require('SwiGLU')
  return jax.ffi.ffi_call('ftjax_swiglu', jax.ShapeDtypeStruct(gate.shape, gate.dtype),
                          vmap_method='sequential')(gate, up)


def swiglu_grad(gate: jax.Array, up: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The gradients of silu(gate) * up with respect to gate and up, for its cotangent g."""
  _require('SwiGLU')
  out = (jax.ShapeDtypeStruct(gate.shape, gate.dtype),) * 2
  return jax.ffi.ffi_call('ftjax_swiglu_grad', out, vmap_method='sequential')(gate, up, g)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, mean, rstd) of LayerNorm over the last axis of x [M, D] (see layer_norm.cc), y in x's
  dtype; mean and rstd [M] (float32) are what `layer_norm_grad` takes."""
  _require('layer_norm')
  rows = jax.ShapeDtypeStruct(x.shape[:1], jnp.float32)
  call = jax.ffi.ffi_call('ftjax_layer_norm', (jax.ShapeDtypeStruct(x.shape, x.dtype), rows,
                                               rows), vmap_method='sequential')
  return call(x, _f32(scale), _f32(bias), eps=np.float32(eps))


def layer_norm_grad(x, mean, rstd, scale, g) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dx, d_scale, d_bias) of `layer_norm` for the output cotangent g [M, D] (x's dtype);
  the parameters' gradients in float32."""
  _require('layer_norm_grad')
  params = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
  call = jax.ffi.ffi_call('ftjax_layer_norm_grad', (jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                    params, params), vmap_method='sequential')
  return call(x, mean, rstd, _f32(scale), g)


def add_layer_norm(x: jax.Array, y: jax.Array, scale: jax.Array, bias: jax.Array,
                   seeds: jax.Array, eps: float, rate: float) -> tuple[jax.Array, ...]:
  """(out, s, mean, rstd, keep) for s = x + dropout(y) and out = LayerNorm(s) over the last
  axis, x and y [M, D] (see layer_norm.cc; out and s in their dtype): a post-LayerNorm block's
  residual add, in one pass with its LayerNorm. The dropout (rate > 0) hashes the keep-mask of
  `layers.keep_mask` from the key's two uint32 `seeds` and keeps its bits for the backward
  pass: keep [M, ceil(D / 16)] uint16 (one word when rate is 0)."""
  _require('add_layer_norm')
  rows = jax.ShapeDtypeStruct(x.shape[:1], jnp.float32)
  stream = jax.ShapeDtypeStruct(x.shape, x.dtype)
  words = (x.shape[0], -(-x.shape[1] // 16)) if rate else (1,)
  call = jax.ffi.ffi_call('ftjax_add_layer_norm',
                          (stream, stream, rows, rows, jax.ShapeDtypeStruct(words, jnp.uint16)),
                          vmap_method='sequential')
  attrs = _dropout_attrs(rate, x.dtype)
  return call(x, y, _f32(scale), _f32(bias), seeds.astype(jnp.uint32), eps=np.float32(eps),
              **attrs)


def add_layer_norm_grad(s, mean, rstd, scale, g, keep, rate: float
                        ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(ds, dy, d_scale, d_bias) of `add_layer_norm` with dropout (rate > 0) for the output
  cotangent g [M, D] (s's dtype): ds is the residual's gradient, dy = dropout's backward of ds;
  the parameters' gradients in float32."""
  _require('add_layer_norm_grad')
  stream = jax.ShapeDtypeStruct(s.shape, s.dtype)
  params = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
  call = jax.ffi.ffi_call('ftjax_add_layer_norm_grad', (stream, stream, params, params),
                          vmap_method='sequential')
  return call(s, mean, rstd, _f32(scale), g, keep,
              keep_scale=_dropout_attrs(rate, s.dtype)['keep_scale'])


def matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False,
           out_dtype=None, variant: str | None = None) -> jax.Array:
  """op(a) @ op(b) on the matmul kernel (float32 accumulation, one rounding to `out_dtype`).

  a: [M, K] (or [K, M] with transpose_a), b: [K, N] (or [N, K] with transpose_b), one dtype,
  float32 or bfloat16; `out_dtype` defaults to a's. `variant` ('fma', 'dot' or 'amx', see
  matmul.cc) applies to bfloat16 operands; None takes the fastest as measured on this machine
  (`bf16_matmul_plan`). float32 operands always run on 'fma'. Where the CPU lacks what a
  variant needs, the kernel runs the next one down (amx -> dot -> fma), with the same values.
  """
  _require('matmul')
  m = a.shape[1] if transpose_a else a.shape[0]
  n = b.shape[0] if transpose_b else b.shape[1]
  out = jax.ShapeDtypeStruct((m, n), jnp.dtype(out_dtype or a.dtype))
  call = jax.ffi.ffi_call('ftjax_matmul', out, vmap_method='sequential')
  return call(a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b),
              variant=np.int32(VARIANTS.index(_variant(a.dtype, variant))))


def matmul_plus(a: jax.Array, b: jax.Array, a2: jax.Array, b2: jax.Array,
                bias: jax.Array | None = None, *, transpose_b: bool = False,
                transpose_b2: bool = False, variant: str | None = None) -> jax.Array:
  """a @ op(b) + a2 @ op(b2) (+ bias) in one pass over the result (see matmul, also for
  `variant`).

  a: [M, K], b: [K, N] (or [N, K] with transpose_b), both float32 or both bfloat16, the result
  in their dtype; a2: [M, R], b2: [R, N] (or [N, R] with transpose_b2) and bias [N] (the
  product's starting value, as in `matmul_bias`) float32 (a bfloat16 bias is taken exactly). A
  LoRA layer's output x W + b + (s x A) B and its input gradient g W^T + (s g B^T) A^T: the
  low-rank product is added to each block of the result while it is in cache (bfloat16: to
  each complete float32 row before its one rounding), instead of being written out and added
  in passes of its own.
  """
  _require('matmul')
  if a.dtype != b.dtype or a.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError('matmul_plus takes float32 or bfloat16 a and b of one dtype')
  if a2.dtype != jnp.float32 or b2.dtype != jnp.float32:
    raise ValueError('matmul_plus takes float32 a2 and b2')
  out = jax.ShapeDtypeStruct((a.shape[0], b.shape[0] if transpose_b else b.shape[1]), a.dtype)
  call = jax.ffi.ffi_call('ftjax_matmul_plus', out, vmap_method='sequential')
  return call(a, b, a2, b2, _no_bias() if bias is None else _f32(bias), transpose_a=False,
              transpose_b=bool(transpose_b), transpose_b2=bool(transpose_b2),
              variant=np.int32(VARIANTS.index(_variant(a.dtype, variant))))


def _no_bias() -> jax.Array:
  """The [0] operand that tells the dense kernels there is no bias."""
  return jnp.zeros((0,), jnp.float32)


def _dense(a: jax.Array, b: jax.Array, bias: jax.Array | None, *, transpose_b: bool,
           sums: bool, gate: tuple[jax.Array, jax.Array] | None = None,
           variant: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The dense kernel (matmul.cc's Dense): a and b both float32 or both bfloat16 (the result
  in their dtype; bfloat16 multiplied by `variant`, None: the one `bf16_matmul_plan` measured
  fastest), bias, the sums and the gate float32 (a bfloat16 bias is taken exactly; no
  bfloat16 gate)."""
  _require('matmul')
  if a.dtype != b.dtype or a.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError('the dense kernel takes float32 or bfloat16 a and b of one dtype')
  if any(x.dtype != jnp.float32 for x in gate or ()) or (gate and a.dtype != jnp.float32):
    raise ValueError('the dense kernel gates float32 products only')
  m, k = a.shape
  n = b.shape[0] if transpose_b else b.shape[1]
  out = (jax.ShapeDtypeStruct((m, n), a.dtype),
         jax.ShapeDtypeStruct((k if sums else 0,), jnp.float32),
         jax.ShapeDtypeStruct((0 if gate is None else n,), jnp.float32))
  call = jax.ffi.ffi_call('ftjax_dense', out, vmap_method='sequential')
  gate_y, gate_b = gate or (_no_bias(), _no_bias())
  return call(a, b, _no_bias() if bias is None else _f32(bias), gate_y, gate_b,
              transpose_b=bool(transpose_b),
              variant=np.int32(VARIANTS.index(_variant(a.dtype, variant))))


def matmul_bias(a: jax.Array, b: jax.Array, bias: jax.Array) -> jax.Array:
  """a @ b + bias for a [M, K], b [K, N] (both float32 or both bfloat16) and bias [N]: a dense
  layer's output, the bias the product's starting value (float32: no pass over the result of
  its own; bfloat16: added to each complete row before its one rounding)."""
  return _dense(a, b, bias, transpose_b=False, sums=False)[0]


def matmul_gelu_grad(g: jax.Array, w: jax.Array, y: jax.Array, bias: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The input gradient of a dense layer whose input was gelu(y + bias), through GELU: for
  float32 g [M, N] (the layer's output cotangent), w [K, N] (its kernel), y [M, K] and bias [K],
  (d(y + bias) = (g w^T) * gelu'(y + bias), its column sums (bias's gradient), g's column sums
  (the layer's own bias gradient)). g w^T is multiplied by GELU's slope as each block of it
  completes in the kernel's registers, so it is never written out and read back."""
  d, g_sums, d_bias = _dense(g, w, None, transpose_b=True, sums=True, gate=(y, bias))
  return d, d_bias, g_sums


def matmul_sums(a: jax.Array, b: jax.Array, *, transpose_b: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """(a @ op(b), a's column sums [K], float32) for a [M, K], b [K, N] (or [N, K] with
  transpose_b), both float32 or both bfloat16: a dense layer's input gradient g W^T and its
  bias gradient (float32: g read once; bfloat16: each task's rows of g read once more)."""
  return _dense(a, b, None, transpose_b=transpose_b, sums=True)[:2]


# The smallest vocabulary (the logits' last axis) the cross-entropy kernel takes: below it the
# rows are too short for its vector loops to pay for a custom call (a classifier's few labels).
_MIN_CROSS_ENTROPY_WIDTH = 256


def cross_entropy_applies(logits: jax.Array) -> bool:
  """Whether `cross_entropy` should take these logits: float32 or bfloat16, at least
  _MIN_CROSS_ENTROPY_WIDTH classes, on a single CPU device (as `layer_kernel_applies`)."""
  return logits.shape[-1] >= _MIN_CROSS_ENTROPY_WIDTH and layer_kernel_applies(logits)


def cross_entropy(logits: jax.Array, labels: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax cross-entropy of logits [N, V] (float32 or bfloat16, computed in float32) with
  integer labels [N] in [0, V) (see cross_entropy.cc): (loss [N], log-sum-exp [N], both float32;
  the first maximum's index [N], int32)."""
  _require('cross-entropy')
  n = logits.shape[0]
  out = (jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32),
         jax.ShapeDtypeStruct((n,), jnp.int32))
  return jax.ffi.ffi_call('ftjax_cross_entropy', out, vmap_method='sequential')(
      logits, labels.astype(jnp.int32))


def cross_entropy_grad(logits: jax.Array, labels: jax.Array, lse: jax.Array, g: jax.Array
                       ) -> jax.Array:
  """The logits' gradient g (softmax(logits) - onehot(labels)), in the logits' dtype, for the
  loss's cotangent g [N] and `cross_entropy`'s log-sum-exp."""
  _require('cross-entropy')
  out = jax.ShapeDtypeStruct(logits.shape, logits.dtype)
  return jax.ffi.ffi_call('ftjax_cross_entropy_grad', out, vmap_method='sequential')(
      logits, labels.astype(jnp.int32), _f32(lse), _f32(g))


VARIANTS = ('fma', 'dot', 'amx')
# The smallest contracted and output widths the matmul kernel takes: its register tile is
# 12 x 32, and narrower products (LoRA's rank-r factors, a classifier head) stay on XLA.
_MIN_MATMUL_WIDTH = 64
# The kernel replaces XLA's dot only where it measured at most this fraction of XLA's time.
_KERNEL_MARGIN = 0.9
# float32 layers go to the kernel where it took at most this fraction of XLA's time: its gain
# there is smaller (XLA's float32 dots are closer to the machine's peak than its bfloat16 ones).
_F32_KERNEL_MARGIN = 0.97
# A float32 verdict against the kernel is measured this many more times, a pause apart, each
# side keeping its best time (see `f32_matmul_plan`)...
_F32_REMEASURES = 2
_REMEASURE_PAUSE_S = 1.0
# ...and again by each new process until this many have measured it.
_F32_PROCESSES = 3


def bf16_matmul_on_kernel(m: int, k: int, n: int) -> bool:
  """Whether a bfloat16 [m, k] x [k, n] product (float32 accumulation) runs on the kernel.

  `FTJAX_MATMUL=auto` (the default) uses it on a single CPU device where its faster variant
  measured faster than XLA's bfloat16 dot on this machine (`bf16_matmul_plan`); `kernel`
  wherever it applies; `xla` never. float32 layers: `f32_matmul_on_kernel`.
  """
  return _matmul_on_kernel(m, k, n, bf16_matmul_plan)


def _matmul_on_kernel(m: int, k: int, n: int, plan) -> bool:
  mode = matmul_choice()
  if not _on_one_cpu(mode) or min(k, n) < _MIN_MATMUL_WIDTH or m < 1:
    return False
  if not _loaded('FTJAX_MATMUL', mode, 'kernel', 'matmul kernel'):
    return False
  return mode == 'kernel' or plan()['use_kernel']


def _calibration_path(kind: str = '') -> pathlib.Path:
  return library_path(_compiler()).with_suffix(f'.matmul{kind}.json')


def _measured_once(path: pathlib.Path, valid, measure) -> dict:
  """The plan kept at `path` if `valid(plan)`, else `measure(kept)`'s (`kept`: the plan kept
  there, or None where there is none or it cannot be read), written there for the next process
  (whole and renamed: a concurrent reader never sees half a file)."""
  kept = None
  try:
    kept = json.loads(path.read_text())
    if valid(kept):
      return kept
  except (OSError, ValueError, KeyError, TypeError):
    kept = kept if isinstance(kept, dict) else None
  with jax.ensure_compile_time_eval():
    plan = measure(kept)
  try:
    with tempfile.NamedTemporaryFile('w', dir=path.parent, delete=False) as f:
      json.dump(plan, f)
    os.replace(f.name, path)
  except OSError as e:  # A read-only cache: measured again by the next process.
    logging.warning('ftjax: cannot keep the matmul measurement in %s (%s)', path, e)
  return plan


@functools.cache
def bf16_matmul_plan() -> dict:
  """How bfloat16 products run on this machine: {'use_kernel': bool (the matmul kernel rather
  than XLA's dot), 'variant': 'fma', 'dot' or 'amx' (the kernels' fastest: the attention
  kernel's products take it too), and the measured seconds 'fma_s', 'dot_s', 'xla_s' and, on
  CPUs with AMX, 'amx_s'}.

  Measured once per machine and build (`measure_bf16_matmul`, about 2 s on 2 cores) and kept
  beside the library. Which is fastest depends on the CPU: where the bfloat16 dot instruction
  runs at half the float32 FMA FLOP rate (the Intel Xeons without AMX measured here), `fma` is
  1.2-1.9x XLA's dot; where it runs at twice that rate (AMD Zen 4), `dot` is 1.4x it; on an
  Intel Xeon with AMX, `amx` took 0.40-0.44 of XLA's time (whose dots use AMX too).
  """
  def measure(kept):
    del kept  # A kept bfloat16 plan that is valid is final.
    times = measure_bf16_matmul()
    measured = [v for v in VARIANTS if v in times]
    variant = min(measured, key=times.__getitem__)
    plan = {'use_kernel': times[variant] < _KERNEL_MARGIN * times['xla'], 'variant': variant,
            **{f'{name}_s': t for name, t in times.items()}}
    logging.info('ftjax: bfloat16 matmuls on the %s (%s; %s)',
                 f'kernel ({variant})' if plan['use_kernel'] else 'XLA dot',
                 ', '.join(f'{"XLA" if name == "xla" else "kernel " + name} {t * 1e3:.2f} ms'
                           for name, t in times.items()), _calibration_path())
    return plan

  return _measured_once(
      _calibration_path(),
      lambda plan: isinstance(plan['use_kernel'], bool) and plan['variant'] in VARIANTS, measure)


def f32_matmul_on_kernel(m: int, k: int, n: int) -> bool:
  """Whether a float32 [m, k] x [k, n] dense layer's products (output, input gradient and
  weight gradient) run on the kernel (its `fma` variant, which reads float32 A unpacked and a
  transposed A's panels row by row: see matmul.cc's BlockDirect).

  `FTJAX_MATMUL=auto` (the default) uses it on a single CPU device where it measured faster than
  XLA's float32 dots on this machine (`f32_matmul_plan`); `kernel` wherever it applies; `xla`
  never. (The weight gradient stayed on XLA's dot until its transposed A was copied panel by
  panel down x's rows: then MiniLM's full step took 1.003 and 0.989 of its time with it on the
  kernel, and 0.947 once the copy read each of x's rows in order.)
  """
  return _matmul_on_kernel(m, k, n, f32_matmul_plan)


@functools.cache
def f32_matmul_plan() -> dict:
  """Whether float32 dense layers run on the matmul kernel on this machine: {'use_kernel':
  bool, 'kernel_s', 'xla_s'}, measured once per machine and build (`measure_f32_matmul`, about
  3 s on 2 cores) and kept beside the library, as `bf16_matmul_plan` is.

  The kernel must take at most _F32_KERNEL_MARGIN of XLA's time: on an Intel Xeon with AMX
  (family 6 model 167, 2 cores) the products alone took 0.85-0.95 at MiniLM's shapes (0.96 on a
  slower day, at the margin), and MiniLM's float32 LoRA step 0.96 of its time. The measurement
  times the layer's work as the kernel does it, bias and bias gradient included: 0.78-0.87;
  with the weight gradient too, 0.88-0.92 (XLA runs that measurement's independent dots side by
  side, which flatters it: alone, its weight gradients took 1.19-1.37x the kernel's time).

  A verdict against the kernel is measured again (_F32_REMEASURES times, a pause apart), each
  side keeping its best time, and again (once) by each new process until _F32_PROCESSES have
  measured it (the count is kept in the plan, as 'processes'), each keeping the best times of
  those before it. While something else shares the cores the kernel suffers more than XLA (its
  two equal tasks wait for the slower thread; XLA's many small ones balance): one measurement,
  made right after another process finished, timed the kernel at 0.146 s (0.078-0.084 in three
  measurements minutes later) against XLA's 0.120; the set-up of a fresh checkout on a busy VM
  kept 0.122 against 0.117 as the best of its three measurements (0.06-0.08 against 0.07-0.10
  on an idle one). Either verdict, kept for good, would have sent this build's float32 layers
  to XLA's dots: MiniLM's float32 full step took 1.12x as long on them (`FTJAX_MATMUL=xla`).
  """
  def measure(kept):
    # The best times of the processes before, and their count, where they measured against it.
    best, processes = {}, 0
    try:
      if kept and kept['use_kernel'] is False:
        best = {name: float(kept[f'{name}_s']) for name in ('kernel', 'xla')}
        processes = int(kept.get('processes', 1))
    except (KeyError, TypeError, ValueError):  # A plan this version did not write: ignored.
      best, processes = {}, 0
    times = measure_f32_matmul()
    # The first process measures again at once; later ones once each (their start is timed).
    for _ in range(0 if processes else _F32_REMEASURES):
      if times['kernel'] < _F32_KERNEL_MARGIN * times['xla']:
        break
      time.sleep(_REMEASURE_PAUSE_S)
      again = measure_f32_matmul()
      times = {name: min(t, again[name]) for name, t in times.items()}
    times = {name: min(t, best.get(name, t)) for name, t in times.items()}
    plan = {'use_kernel': times['kernel'] < _F32_KERNEL_MARGIN * times['xla'],
            **{f'{name}_s': t for name, t in times.items()}, 'processes': processes + 1}
    logging.info('ftjax: float32 matmuls on the %s (kernel %.2f ms, XLA %.2f ms; %s)',
                 'kernel' if plan['use_kernel'] else 'XLA dot', times['kernel'] * 1e3,
                 times['xla'] * 1e3, _calibration_path('-f32'))
    return plan

  def valid(plan):
    return isinstance(plan['use_kernel'], bool) and (
        plan['use_kernel'] or int(plan.get('processes', 1)) >= _F32_PROCESSES)

  return _measured_once(_calibration_path('-f32'), valid, measure)


def measure_f32_matmul(m: int = 4096, rounds: int = 7) -> dict:
  """Best seconds of the kernel ('kernel') and of XLA's ops ('xla'), taking turns, for what a
  float32 dense layer hands the kernel: y = x w + b, dx = g w^T with the bias gradient (g's
  column sums) and dw = x^T g, at MiniLM's attention and FFN shapes with m tokens (x [m, 384],
  w [384, 384], [384, 1536] and [1536, 384]).
  """
  rng = np.random.default_rng(0)
  shapes = ((384, 384), (384, 1536), (1536, 384))
  operands = [tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
                    for s in ((m, k), (k, n), (n,), (m, n))) for k, n in shapes]

  @jax.jit
  def on_kernel(operands):
    return [(matmul_bias(x, w, b), matmul_sums(g, w, transpose_b=True),
             matmul(x, g, transpose_a=True)) for x, w, b, g in operands]

  @jax.jit
  def on_xla(operands):
    return [(x @ w + b, g @ w.T, g.sum(0), x.T @ g) for x, w, b, g in operands]

  return _best_of(rounds, {'kernel': on_kernel, 'xla': on_xla}, operands)


def _best_of(rounds: int, runs: dict, *args) -> dict:
  """Best seconds of each of `runs` (jitted functions of `args`), compiled first, then called
  in turns `rounds` times."""
  best = {}
  for name, run in runs.items():
    jax.block_until_ready(run(*args))
    best[name] = float('inf')
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(run(*args))
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def measure_bf16_matmul(m: int = 4096, k: int = 384, n: int = 1536, rounds: int = 7) -> dict:
  """Best seconds of the kernel's variants ('fma', 'dot', and 'amx' where the CPU has AMX) and
  of XLA's bf16 x bf16 -> f32 dots ('xla'), taking turns, for what a bfloat16 dense layer's
  training step hands either, with x [m, k], w [k, n] and a bias b [n]: y = x w + b and
  dx = g w^T rounded to bfloat16, the bias gradient (g's column sums) and dw = x^T g in float32.

  Each side as the layers write it (`layers.Linear`): the kernel adds the bias to each row
  before its one rounding and sums g's columns in the input gradient's tasks (`_dense`); XLA's
  dots keep their fast path only with the lhs contracting its last dimension, so dw reads a
  transposed copy of x, and the bias is an add and a float32 sum of their own (`add_bias`).
  Without the bias work, on an AMD Zen 5 VM the `dot` variant measured 0.96-1.01 of XLA's time
  in two builds of six (XLA's own time is bimodal there, 0.018 or 0.025 s), so those builds
  kept XLA's dots, while MiniLM's bfloat16 full fine-tuning step took 0.91 of its time on the
  kernel (LoRA 0.96; one-off in-process switch).

  4096 tokens (a batch of 32 x 128): where the kernel is faster, the difference grows with the
  token count, and a smaller product decides by noise. On an AMD Zen 4 VM the `dot` variant took
  0.92-0.99 of XLA's time at 1024 tokens, 0.82-0.90 at 2048 and 0.67-0.70 at 4096, and made
  MiniLM's bfloat16 training step (4096 tokens) 0.87-0.92x as long (`speed.py --ab`).
  """
  # The layers' own XLA pieces, so that the measurement follows them (imported here: the layers
  # import this module).
  from ftjax.models import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x, w, b, g = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
                for s in ((m, k), (k, n), (n,), (m, n)))

  def on_kernel(variant):
    def products(x, w, b, g):
      return (_dense(x, w, b, transpose_b=False, sums=False, variant=variant)[0],
              _dense(g, w, None, transpose_b=True, sums=True, variant=variant)[:2],
              matmul(x, g, transpose_a=True, out_dtype=jnp.float32, variant=variant))
    return jax.jit(products)

  @jax.jit
  def on_xla(x, w, b, g):
    dot = layers._dot_f32  # pylint: disable=protected-access
    return (dot(x, w, (1, 0)).astype(x.dtype) + b, dot(g, w, (1, 1)).astype(x.dtype),
            jnp.sum(g.astype(jnp.float32), 0),
            dot(layers._transposed_copy(x), g, (1, 0)))  # pylint: disable=protected-access

  variants = VARIANTS if has_amx() else ('fma', 'dot')
  return _best_of(rounds, {**{v: on_kernel(v) for v in variants}, 'xla': on_xla}, x, w, b, g)


def fused_adamw_applies(*trees) -> bool:
  """Whether AdamW's update of these parameters, gradients and moments runs on the fused
  kernel (`adamw.cc`): `FTJAX_ADAMW=auto` (the default) on a single CPU device where the library
  builds, for float32 leaves only; `kernel` likewise, an error if it cannot be built; `xla`
  never."""
  mode = adamw_choice()
  if not _on_one_cpu(mode):
    return False
  if any(jnp.dtype(leaf.dtype) != jnp.float32 for tree in trees for leaf in jax.tree.leaves(tree)):
    return False
  return _loaded('FTJAX_ADAMW', mode, 'kernel', 'AdamW kernel')


def adamw_update(params: list, grads: list, mu: list, nu: list, *, lr, grad_scale, bc1, bc2,
                 b1: float, b2: float, eps: float, weight_decay: float
                 ) -> tuple[list, list, list]:
  """AdamW's update of float32 parameter lists in one custom call: (params, mu, nu), new.

  The parameters and moments are updated in place (the results alias the operands, so with the
  train state donated XLA allocates nothing). `lr`, `grad_scale` and the bias corrections
  `bc1`, `bc2` (1 - b^t) are scalars traced in the step; the arithmetic is `optim.adamw`'s.
  """
  _require('AdamW')
  n = len(params)
  if not n:
    return [], [], []
  scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in (lr, grad_scale, bc1, bc2)])
  shapes = [jax.ShapeDtypeStruct(p.shape, jnp.float32) for p in params]
  aliases = {1 + i: i for i in range(n)}  # Operands: scalars, params, grads, mu, nu.
  aliases |= {1 + 2 * n + i: n + i for i in range(n)}
  aliases |= {1 + 3 * n + i: 2 * n + i for i in range(n)}
  call = jax.ffi.ffi_call('ftjax_adamw', shapes * 3, input_output_aliases=aliases,
                          vmap_method='sequential')
  out = call(scalars, *params, *grads, *mu, *nu, b1=np.float32(b1), b2=np.float32(b2),
             one_minus_b1=np.float32(1 - b1), one_minus_b2=np.float32(1 - b2),
             eps=np.float32(eps), weight_decay=np.float32(weight_decay))
  return list(out[:n]), list(out[n:2 * n]), list(out[2 * n:])
