"""`python -m ftjax.kernels`: builds the native kernels and the large-block cache for this
machine, and measures which matmul path its dense layers take (what `make setup` runs).

Exits 0 either way: without a compiler ftjax runs on its XLA path, and the line says why.
"""

from ftjax import kernels, launch

try:
  print(f'ftjax kernels: {kernels.build()}')
except kernels.KernelUnavailable as e:
  print(f'ftjax kernels: not built ({e}); attention runs on the XLA path')
else:
  # The per-machine choice of matmul path, made now while nothing else runs (the first run
  # would make it otherwise, e.g. inside a test suite whose workers share the cores, and
  # keep a verdict skewed by them).
  try:
    f32, bf16 = kernels.f32_matmul_plan(), kernels.bf16_matmul_plan()
    print('ftjax matmul plan: float32 dense layers on the '
          f'{"kernel" if f32["use_kernel"] else "XLA dot"}, bfloat16 on the '
          f'{"kernel (" + bf16["variant"] + ")" if bf16["use_kernel"] else "XLA dot"}')
  except Exception as e:  # pylint: disable=broad-except  # Setup never fails on it.
    print(f'ftjax matmul plan: not measured ({type(e).__name__}: {e}); the first run measures it')
if launch.block_cache_wanted():
  print(f'ftjax block cache: {launch.block_cache_library() or "not built; runs without it"}')
