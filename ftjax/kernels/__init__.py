"""Native CPU kernels, built from source on first use with the machine's C++ compiler.

`attention.cc` is a fused scaled dot-product attention (forward and backward) for XLA:CPU,
registered with jax as two XLA FFI custom calls. It is compiled once per machine, source and
jaxlib (`-O3 -march=native`, against the FFI headers that jaxlib ships) into
`$FTJAX_KERNEL_CACHE` (default `~/.cache/ftjax/kernels`); `make setup` builds it ahead of
the first run. Where no compiler is found or the build fails, `available()` says False once,
with the reason in the log, and ftjax's attention stays on the XLA path, which is the
reference the kernel is tested against.

`FTJAX_ATTENTION` chooses: `auto` (the default: the kernel on a single CPU device where it
builds), `xla` (never the kernel) or `fused` (the kernel wherever it applies; an error if it
cannot be built).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import launch
from ftjax.errors import FtjaxError

_SOURCE = pathlib.Path(__file__).with_name('attention.cc')
_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
_TARGETS = {'ftjax_attention_forward': 'FtjaxAttentionForward',
            'ftjax_attention_backward': 'FtjaxAttentionBackward'}
CHOICES = ('auto', 'xla', 'fused')


class KernelUnavailable(FtjaxError):
  """The native kernel cannot be built or loaded on this machine."""


def choice() -> str:
  """`FTJAX_ATTENTION`, checked: one of CHOICES."""
  value = os.environ.get('FTJAX_ATTENTION', 'auto').strip().lower() or 'auto'
  if value not in CHOICES:
    raise FtjaxError(f'FTJAX_ATTENTION={value!r}: expected one of {", ".join(CHOICES)} '
                     '(or unset, for auto)')
  return value


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('FTJAX_KERNEL_CACHE')
                      or pathlib.Path.home() / '.cache' / 'ftjax' / 'kernels')


def _compiler() -> str:
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and (path := shutil.which(name)):
      return path
  raise KernelUnavailable('no C++ compiler found (set CXX, or install g++)')


def library_path(compiler: str) -> pathlib.Path:
  """Where the build for this source, compiler, flags, jaxlib and CPU lives."""
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), compiler.encode(), ' '.join(_FLAGS).encode(),
               jax.__version__.encode(), jax.ffi.include_dir().encode(),
               (launch.cpuinfo('flags') or launch.cpuinfo('Features')).encode()):
    key.update(part)
    key.update(b'\0')
  return cache_dir() / f'attention-{key.hexdigest()[:16]}.so'


def build() -> pathlib.Path:
  """Compiles attention.cc unless this machine already has the build; returns the library."""
  compiler = _compiler()
  path = library_path(compiler)
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed: concurrent builds never load a half-written file.
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = pathlib.Path(tmp) / path.name
    cmd = [compiler, *_FLAGS, '-I', jax.ffi.include_dir(), str(_SOURCE), '-o', str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
      lines = (done.stderr or done.stdout).strip().splitlines()
      reason = lines[-1] if lines else done.returncode
      raise KernelUnavailable(f'{" ".join(cmd[:2])} ... failed: {reason}')
    os.replace(out, path)
  return path


@functools.cache
def _load() -> str:
  """Builds and registers the kernels once per process; '' on success, else the reason."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform='cpu')
  except (KernelUnavailable, OSError, AttributeError) as e:
    return str(e) or type(e).__name__
  return ''


def available() -> bool:
  """Whether the fused attention kernel is built and registered (building it if needed)."""
  reason = _load()
  if reason:
    if choice() == 'fused':
      raise KernelUnavailable(f'FTJAX_ATTENTION=fused, but the attention kernel is unavailable: '
                              f'{reason}')
    _warn_once(reason)
  return not reason


@functools.cache
def _warn_once(reason: str) -> None:
  logging.warning('ftjax: fused CPU attention unavailable (%s); using the XLA path', reason)


def fused_attention_applies(q: jax.Array, k: jax.Array, v: jax.Array, dtype) -> bool:
  """Whether attention on these heads-major operands should run on the fused kernel.

  Only on a single CPU device: the custom call has no partitioning rule, so under a multi-device
  mesh XLA would gather its operands onto every device. The kernel takes float32 or bfloat16
  operands of one dtype.
  """
  mode = choice()
  if mode == 'xla' or jax.default_backend() != 'cpu' or jax.device_count() != 1:
    return False
  dtypes = {jnp.dtype(q.dtype), jnp.dtype(k.dtype), jnp.dtype(v.dtype), jnp.dtype(dtype)}
  if len(dtypes) != 1 or dtypes.pop() not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    return False
  return available()


def _attrs(scale: float, rate: float) -> dict:
  threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
  return {'scale': np.float32(scale), 'rate': np.float32(rate),
          'keep_scale': np.float32(1.0 / (1.0 - rate)), 'threshold': np.int64(threshold)}


def attention_forward(q, k, v, bias, seeds, scale: float, rate: float):
  """(out, maximum, normaliser, keep) of the fused kernel: see attention.cc for the layouts.

  `keep` holds the dropout keep-mask as uint16 words ([B, G, Q, ceil(S / 16)]; one word when
  `rate` is 0), hashed once here and read back by the backward pass.
  """
  rows = jax.ShapeDtypeStruct((*q.shape[:3], 1), jnp.float32)
  words = (*q.shape[:3], -(-k.shape[2] // 16)) if rate else (1,)
  call = jax.ffi.ffi_call('ftjax_attention_forward',
                          (jax.ShapeDtypeStruct(q.shape, q.dtype), rows, rows,
                           jax.ShapeDtypeStruct(words, jnp.uint16)),
                          vmap_method='sequential')
  return call(q, k, v, bias, seeds, **_attrs(scale, rate))


def attention_backward(q, k, v, bias, seeds, maximum, normaliser, keep, out, d_out,
                       scale: float, rate: float):
  """(d_q, d_k, d_v) of the fused kernel, d_out in q's dtype."""
  call = jax.ffi.ffi_call('ftjax_attention_backward',
                          tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)),
                          vmap_method='sequential')
  return call(q, k, v, bias, seeds, maximum, normaliser, keep, out, d_out,
              **_attrs(scale, rate))
