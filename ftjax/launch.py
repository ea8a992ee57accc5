"""Process-level settings that make training fast, applied by ftjax itself rather than by the user.

Three settings, each measured on this project's machines:

* **malloc keeps the step's scratch memory** (`reuse_freed_host_memory`, called by
  `train_and_evaluate`). XLA:CPU allocates each step's scratch buffers afresh and frees them at
  the end of the step. By default glibc serves blocks of 32 MiB or more with a fresh `mmap`,
  trims freed memory at the top of a heap beyond 128 KiB, and gives each thread a heap of its
  own that it unmaps whenever it empties, so every step faulted its scratch pages in again and
  the kernel zeroed them (the default job: ~12,000 page faults and ~30 ms of system CPU per
  ~110 ms step). Three malloc settings keep that memory for the next step: mmap threshold
  64 MiB (the largest block a thread's heap can hold), trim threshold 1 GiB, and one heap for
  all threads (`arena_max=1`). The default job's step in its training loop then took 0.82x as
  long, with ~1,000 page faults per step instead of ~13,000 and a lower peak
  (`scripts/bench/malloc.py`: off and on in fresh processes, 3 pairs). Steps whose scratch
  blocks exceed 64 MiB (MiniLM at 32 x 128 tokens) fault as before, at the same speed and peak.
  Set in-process with `mallopt` (no restart needed), first thing in `train_and_evaluate`; in a
  process that already ran jax computations, threads that already have a heap of their own keep
  it. `FTJAX_MALLOC_REUSE=0` turns it off. `process_env` gives child processes the same
  settings as `GLIBC_TUNABLES`, so benchmarks run their baselines under them too.
  Where the large-block cache below is loaded, the one heap is left out: the cache then holds
  every block of 16 MiB or more, so the heaps hold small objects only, and one heap made the
  threads queue on its lock (the default job: 51.4 -> 47.9 s, and no slower steps after its
  first evaluation and checkpoint; RESULTS.md, session 26).

Three more, chosen before the training loop starts:

* **Large freed blocks stay mapped** (`block_cache_library`, preloaded by the command-line entry
  point and given to benchmark children with `LD_PRELOAD`). XLA:CPU allocates a step's scratch
  buffers as one block, 500 MB and more for MiniLM at 32 x 128 tokens, which is above the
  64 MiB mmap threshold of malloc reuse, so glibc still mapped it afresh every step and the
  kernel zeroed its pages. `ftjax/kernels/blockcache.cc`, a small allocator in front of glibc's
  for blocks of 16 MiB or more (64 MiB until session 26), keeps freed ones mapped for the next
  step
  (`scripts/bench/malloc.py --block-cache --rounds=2` on a 2-core Xeon with AMX: MiniLM's
  bfloat16 full fine-tuning step 0.875x as long, its page faults 141,000 -> 12,000 per step
  counting the model's loading, its system CPU 281 -> 164 ms per step; LoRA 0.811x, float32
  full 0.874x). The peak stays where it was: where two steps' blocks are alive at once, the
  second comes from glibc and neither is kept (blockcache.cc says how). Linux with glibc only;
  `FTJAX_BLOCK_CACHE=0` leaves it out, and a user's own `LD_PRELOAD` (another allocator, say)
  is left as it is.

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
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

_HUGETLB = 'glibc.malloc.hugetlb=1'
_BLOCK_CACHE_SOURCE = pathlib.Path(__file__).parent / 'kernels' / 'blockcache.cc'
# malloc keeps freed scratch memory (`reuse_freed_host_memory`): blocks below 64 MiB come from the
# heap, and up to 1 GiB of free memory at the heap's top is kept rather than handed back.
_REUSE_TUNABLES = {'glibc.malloc.mmap_threshold': 64 << 20,
                   'glibc.malloc.trim_threshold': 1 << 30}
# One heap for all threads, only where the block cache is not loaded: without it a step's scratch
# blocks below 64 MiB came from malloc's heaps, and a thread's own heap is unmapped whenever it
# empties. With the cache taking those blocks, the heaps hold small objects only, and a heap per
# thread (glibc's default) spares the threads each other's lock.
_ONE_HEAP = {'glibc.malloc.arena_max': 1}
# mallopt's parameter numbers for the same settings (malloc.h: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD,
# M_ARENA_MAX).
_MALLOPT = {'glibc.malloc.mmap_threshold': -3, 'glibc.malloc.trim_threshold': -1,
            'glibc.malloc.arena_max': -8}
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


def _is_glibc() -> bool:
  return sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'


def malloc_reuse_wanted(env: dict[str, str] | None = None) -> bool:
  """Whether malloc should keep freed scratch memory: unless `FTJAX_MALLOC_REUSE=0`."""
  env = os.environ if env is None else env
  return env.get('FTJAX_MALLOC_REUSE', '1') != '0' and _is_glibc()


def reuse_freed_host_memory() -> bool:
  """Makes glibc's malloc keep the memory XLA frees after each step (see the module docstring).

  A no-op off glibc, with `FTJAX_MALLOC_REUSE=0`, or where the user set any of the three in
  `GLIBC_TUNABLES` (their choice stands). Returns whether the settings were made.
  """
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if not malloc_reuse_wanted() or any(name in tunables
                                      for name in _reuse_tunables(block_cache=False)):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
    return all(libc.mallopt(_MALLOPT[name], value)
               for name, value in _reuse_tunables(block_cache_loaded()).items())
  except (OSError, AttributeError):
    return False


def _reuse_tunables(block_cache: bool) -> dict[str, int]:
  """malloc reuse's settings: one heap for all threads only without the block cache."""
  return dict(_REUSE_TUNABLES) if block_cache else {**_REUSE_TUNABLES, **_ONE_HEAP}


def block_cache_loaded() -> bool:
  """Whether this process runs with the large-block cache (`block_cache_library`) preloaded."""
  try:
    return hasattr(ctypes.CDLL(None), 'ftjax_block_cache_waits')
  except OSError:
    return False


def release_freed_host_memory() -> None:
  """Gives freed host memory back to the OS (glibc's `malloc_trim`); a no-op off glibc.

  glibc keeps the pages of freed heap blocks, and XLA:CPU's later allocations do not reuse them,
  so replacing arrays by smaller copies (`params.hold_frozen_in_compute_dtype`) would not lower
  the resident memory without this.
  """
  if not _is_glibc():
    return
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def compiler() -> str | None:
  """The C++ compiler ftjax builds its native code with ($CXX, c++, g++ or clang++), or None."""
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and (path := shutil.which(name)):
      return path
  return None


def native_cache_dir() -> pathlib.Path:
  """Where ftjax keeps what it compiles for this machine (`$FTJAX_KERNEL_CACHE`)."""
  return pathlib.Path(os.environ.get('FTJAX_KERNEL_CACHE')
                      or pathlib.Path.home() / '.cache' / 'ftjax' / 'kernels')


def block_cache_wanted(env: dict[str, str] | None = None) -> bool:
  """Whether processes should run with the large-block cache: unless `FTJAX_BLOCK_CACHE=0`,
  on Linux with glibc, and when the user preloads nothing of their own."""
  env = os.environ if env is None else env
  return (env.get('FTJAX_BLOCK_CACHE', '1') != '0' and _is_glibc()
          and not env.get('LD_PRELOAD', '').strip())


def block_cache_library() -> pathlib.Path | None:
  """The large-block cache (`kernels/blockcache.cc`) built for this machine, building it once
  (about a second); None where there is no compiler or the build fails (ftjax then runs
  without it)."""
  cxx = compiler()
  if cxx is None:
    return None
  key = hashlib.sha256(_BLOCK_CACHE_SOURCE.read_bytes() + cxx.encode()).hexdigest()[:16]
  path = native_cache_dir() / f'blockcache-{key}.so'
  if path.exists():
    return path
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: concurrent builds never load a half-written file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
      out = pathlib.Path(tmp) / path.name
      subprocess.run([cxx, '-O2', '-std=c++17', '-shared', '-fPIC', str(_BLOCK_CACHE_SOURCE),
                      '-o', str(out), '-ldl', '-lpthread'], capture_output=True, check=True)
      os.replace(out, path)
  except (OSError, subprocess.CalledProcessError):
    return None
  return path


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


def process_env(env: dict[str, str] | None = None, *, malloc_reuse: bool = True
                ) -> dict[str, str]:
  """`env` (default: this process's) with the settings ftjax wants at process start added.

  Benchmarks pass the result to every child process, ftjax's and its baselines', so that both
  run under the same environment: huge pages where wanted (`hugepages_wanted`), the large-block
  cache preloaded (`block_cache_wanted`) and, with `malloc_reuse`, the malloc thresholds that
  `reuse_freed_host_memory` sets in-process. A tunable the user already set keeps their value.
  """
  env = dict(os.environ if env is None else env)
  library = block_cache_library() if block_cache_wanted(env) else None
  wanted = []
  if hugepages_wanted(env) and _glibc_supports_hugetlb():
    wanted.append(_HUGETLB)
  if malloc_reuse and malloc_reuse_wanted(env):
    wanted += [f'{name}={value}' for name, value in _reuse_tunables(library is not None).items()]
  tunables = env.get('GLIBC_TUNABLES', '')
  added = [t for t in wanted if t.split('=')[0] not in tunables]
  if added:
    env['GLIBC_TUNABLES'] = ':'.join(([tunables] if tunables else []) + added)
  if library:
    env['LD_PRELOAD'] = str(library)
  return env


def ensure_process_env() -> None:
  """Re-executes this Python process once if `process_env` would change its environment.

  Call it first thing in a command-line entry point, before jax is imported (the re-executed
  process starts from scratch, so nothing done before the call survives). Does nothing when
  the environment already has the settings, after one re-execution, or when the interpreter
  cannot be found again.
  """
  env = process_env(malloc_reuse=False)  # `train_and_evaluate` sets those thresholds itself.
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
