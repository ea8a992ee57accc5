"""Process-level settings that make training fast, applied by ftjax itself rather than by the user.

Two things cannot be chosen from inside a running training loop:

* **Huge pages for XLA's buffers** (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`). XLA:CPU allocates
  each step's scratch memory afresh (a MiniLM step at 32 x 128 tokens: ~1.6 GiB, ~350,000 page
  faults per step with 4 KiB pages). With this tunable glibc's malloc asks for transparent huge
  pages (`madvise`), which cuts the faults to ~1,000. What that buys depends on the machine: a
  MiniLM step ran 1.37x faster with it on a 2-core AMD EPYC (Zen 5) VM (measured when issue 6
  was filed), and made no consistent difference on a 2-core Intel Xeon VM (same faults saved;
  between 15% slower and 6% faster over A/B runs of the step in two sessions; `speed.py --env`
  compares the two). So it is on by default on AMD CPUs only; `FTJAX_HUGEPAGES=1` or `0`
  forces it on or off. glibc reads tunables only at process start, so the command-line entry
  point re-executes itself once with the variable set (`ensure_process_env`).
* **The persistent compilation cache**: the compiled train and eval steps are written to
  `$FTJAX_COMPILATION_CACHE` (default `~/.cache/ftjax/xla`; `0` or an empty value turns it off),
  so a rerun, a resume or a sweep over learning rates skips XLA compilation, most of the time to
  the first step (MiniLM, 32 x 128 tokens: 10.7 s -> 6.5 s measured here).
  `enable_compilation_cache` is called by `train_and_evaluate`.
"""

import ctypes
import os
import pathlib
import platform
import sys

_HUGETLB = 'glibc.malloc.hugetlb=1'
# Set in the re-executed process so that a failed or ignored tunable can never loop.
_REEXECUTED = 'FTJAX_REEXECUTED'


def _glibc_supports_hugetlb() -> bool:
  """glibc >= 2.35 has the `glibc.malloc.hugetlb` tunable; older ones ignore it harmlessly."""
  if sys.platform != 'linux':
    return False
  name, version = platform.libc_ver()
  if name != 'glibc' or not version:
    return False
  major, minor = (int(part) for part in version.split('.')[:2])
  return (major, minor) >= (2, 35)


def release_freed_host_memory() -> None:
  """Gives freed host memory back to the OS (glibc's `malloc_trim`); a no-op off glibc.

  glibc keeps the pages of freed heap blocks, and XLA:CPU's later allocations do not reuse them,
  so replacing arrays by smaller copies (`params.hold_frozen_in_compute_dtype`) would not lower
  the resident memory without this.
  """
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc':
    return
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def cpuinfo(field: str) -> str:
  """The first value of `field` in /proc/cpuinfo ('' where there is none)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.split(':', 1)[0].strip() == field:
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''


def _cpu_vendor() -> str:
  return cpuinfo('vendor_id')


def describe_cpu() -> str:
  """'model name, N cores': how benchmarks name the machine they measured."""
  return f'{cpuinfo("model name") or platform.machine()}, {os.cpu_count()} cores'


def hugepages_wanted(env: dict[str, str] | None = None) -> bool:
  """Whether malloc should ask for huge pages: `FTJAX_HUGEPAGES` if set, else on AMD CPUs."""
  env = os.environ if env is None else env
  choice = env.get('FTJAX_HUGEPAGES')
  if choice is not None:
    return choice != '0'
  return _cpu_vendor() == 'AuthenticAMD'


def process_env(env: dict[str, str] | None = None) -> dict[str, str]:
  """`env` (default: this process's) with the settings ftjax wants at process start added.

  Benchmarks pass the result to every child process, ftjax's and its baselines', so that both
  run under the same environment.
  """
  env = dict(os.environ if env is None else env)
  if hugepages_wanted(env) and _glibc_supports_hugetlb():
    tunables = env.get('GLIBC_TUNABLES', '')
    if 'glibc.malloc.hugetlb' not in tunables:
      env['GLIBC_TUNABLES'] = f'{tunables}:{_HUGETLB}' if tunables else _HUGETLB
  return env


def ensure_process_env() -> None:
  """Re-executes this Python process once if `process_env` would change its environment.

  Call it first thing in a command-line entry point, before jax is imported (the re-executed
  process starts from scratch, so nothing done before the call survives). Does nothing when
  the environment already has the settings, after one re-execution, or when the interpreter
  cannot be found again.
  """
  env = process_env()
  if env == dict(os.environ) or os.environ.get(_REEXECUTED) or not sys.executable:
    return
  env[_REEXECUTED] = '1'
  sys.stdout.flush()
  sys.stderr.flush()
  # The interpreter's own command line (flags, -m module or script, arguments) again.
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def compilation_cache_dir() -> str | None:
  """Where compiled steps are cached, or None when `FTJAX_COMPILATION_CACHE` turns it off."""
  value = os.environ.get('FTJAX_COMPILATION_CACHE')
  if value is None:
    return str(pathlib.Path.home() / '.cache' / 'ftjax' / 'xla')
  return None if value in ('', '0') else value


def enable_compilation_cache() -> str | None:
  """Points jax's persistent compilation cache at `compilation_cache_dir()`; returns the dir.

  A directory the user already gave jax (`JAX_COMPILATION_CACHE_DIR`) wins. Only programs that
  took over a second to compile are stored, so the cache holds the train and eval steps, not
  every small helper computation.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  path = compilation_cache_dir()
  if path is None:
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  # Least recently used entries go first beyond 2 GiB (a MiniLM step is ~1 MB).
  jax.config.update('jax_compilation_cache_max_size', 2 * 1024**3)
  return path
