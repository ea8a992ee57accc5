"""`python -m ftjax.kernels`: builds the native kernels for this machine (what `make setup` runs).

Exits 0 either way: without a compiler ftjax runs on its XLA path, and the line says why.
"""

from ftjax import kernels

try:
  print(f'ftjax kernels: {kernels.build()}')
except kernels.KernelUnavailable as e:
  print(f'ftjax kernels: not built ({e}); attention runs on the XLA path')
