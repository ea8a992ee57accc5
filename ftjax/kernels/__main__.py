"""`python -m ftjax.kernels`: builds the native kernels and the large-block cache for this
machine (what `make setup` runs).

Exits 0 either way: without a compiler ftjax runs on its XLA path, and the line says why.
"""

from ftjax import kernels, launch

try:
  print(f'ftjax kernels: {kernels.build()}')
except kernels.KernelUnavailable as e:
  print(f'ftjax kernels: not built ({e}); attention runs on the XLA path')
if launch.block_cache_wanted():
  print(f'ftjax block cache: {launch.block_cache_library() or "not built; runs without it"}')
