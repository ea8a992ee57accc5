// A cache of large freed memory blocks, preloaded into ftjax's processes (LD_PRELOAD) by its
// launcher (ftjax/launch.py): blocks of kMinBlock bytes or more that the process frees stay
// mapped and serve its next large allocation, instead of going back to the kernel.
//
// Why: XLA:CPU allocates all of a step's scratch buffers as one block (a MiniLM training step at
// 32 x 128 tokens: ~500 MB in bfloat16) when the step starts and frees it when the step ends.
// glibc serves such a block with a fresh mmap and unmaps it on free, so every step faulted its
// pages in again and the kernel zeroed them (~130,000 page faults and ~0.2 s of system CPU per
// ~0.7 s step on a 2-core Xeon). glibc can keep blocks that large only in its heap, where they
// fragment it (tried: the peak grew from 2.3 to 8.9 GiB). Here each block is its own mapping,
// so a kept block costs exactly its size, and a step reuses the same pages every time.
//
// Why from 16 MiB: smaller steps' blocks (the default job's: 44 MB) came from glibc's heap, which
// ftjax then had to make one for all threads (a thread's own heap is unmapped whenever it
// empties). The evaluations and checkpoint saves between steps left that heap in more pieces
// (free chunks ~4,500 -> ~6,500), and the threads queued on its one lock: the steps after the
// first evaluation ran 5-10% slower. With these blocks here, glibc's heaps hold small objects only
// and each thread keeps a heap of its own (ftjax/launch.py).
//
// What it must not cost is memory: a kept block is resident, so two steps' blocks alive at once
// would both stay resident, where glibc's fresh mappings hold only the pages touched so far. Two
// things keep the peak where it was. XLA frees a step's block a moment after the step's outputs
// are ready, so the next step's allocation can come first: an allocation that finds the block it
// would take still in use waits up to kWaitMicros for it. If it is still in use after the wait
// (two steps really overlap, or it is long-lived: a model's weights), glibc serves the
// allocation, the block in use is unmapped when freed, not kept, and later allocations of its
// size go to glibc at once while it lives (no more waiting for it). At most kMaxIdle blocks are kept unused (the least recently freed go first),
// and a block is never handed to an allocation of less than half its size.
//
// Only large allocations are served here (malloc, posix_memalign, aligned_alloc, memalign;
// realloc and malloc_usable_size of these blocks); everything else, and every pointer that is not
// one of these blocks, goes to the next allocator in the chain (glibc's) untouched. calloc is
// left to glibc (its blocks must be zero). Built by ftjax.launch with the machine's C++
// compiler; FTJAX_BLOCK_CACHE=0 leaves it out.

#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <time.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace {

constexpr size_t kMinBlock = size_t{16} << 20;  // the default job's 44 MB scratch block included
constexpr size_t kGrain = size_t{2} << 20;      // sizes rounded to huge pages
constexpr size_t kMaxAlign = 4096;              // mmap's alignment: larger ones go to glibc
constexpr int kSlots = 64;
constexpr int kMaxIdle = 2;
constexpr int64_t kWaitMicros = 3000;

struct Slot {
  char* p;
  size_t size;
  bool used;
  bool drop;       // outlived a wait: unmap it when freed, and send its size to glibc meanwhile
  uint64_t freed;  // when it was last freed (a counter; 0: never), to evict the oldest idle block
};

Slot slots[kSlots];
uint64_t clock_ticks = 0;
uint64_t waits = 0;  // allocations that waited for a block in use (for tests)
pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t freed_one = PTHREAD_COND_INITIALIZER;  // a block went idle
// The address range of all blocks ever mapped: a pointer outside it is not one of ours, and
// free() hands it on without taking the lock.
std::atomic<uintptr_t> lowest{UINTPTR_MAX}, highest{0};

}  // namespace

// glibc's own allocator, under the names it exports for exactly this (no dlsym, which may itself
// allocate, on the allocation path).
extern "C" {
void* __libc_malloc(size_t);
void __libc_free(void*);
void* __libc_realloc(void*, size_t);
void* __libc_memalign(size_t, size_t);
}

namespace {

size_t NextUsableSize(void* p) {
  using UsableFn = size_t (*)(void*);
  static const UsableFn next = reinterpret_cast<UsableFn>(dlsym(RTLD_NEXT, "malloc_usable_size"));
  return next(p);
}

// A child forked while another thread held the lock would wait on it forever.
void LockForFork() { pthread_mutex_lock(&mu); }
void UnlockAfterFork() { pthread_mutex_unlock(&mu); }
const int fork_handlers = pthread_atfork(LockForFork, UnlockAfterFork, UnlockAfterFork);

bool Fits(const Slot& s, size_t size) { return s.p && s.size >= size && s.size <= 2 * size; }

// A block of at least `size` bytes: the smallest idle one that fits (and is at most twice the
// size), or one in use that fits, waited for; else a new mapping. nullptr when glibc should
// serve it (a fitting block stayed in use, or no mapping could be made).
void* Take(size_t size) {
  size = (size + kGrain - 1) / kGrain * kGrain;
  pthread_mutex_lock(&mu);
  timespec deadline = {};
  int best, empty;
  for (bool waited = false;; waited = true) {
    best = empty = -1;
    bool in_use = false, outlived = false;
    for (int i = 0; i < kSlots; ++i) {
      const Slot& s = slots[i];
      if (!s.p) {
        if (empty < 0) empty = i;
      } else if (Fits(s, size) && s.used) {
        in_use = true;
        outlived |= s.drop;
      } else if (Fits(s, size) && (best < 0 || s.size < slots[best].size)) {
        best = i;
      }
    }
    if (best >= 0 || !in_use) break;
    if (outlived) {  // A block of this size already outlived a wait: no second one.
      pthread_mutex_unlock(&mu);
      return nullptr;
    }
    if (!waited) {
      ++waits;
      clock_gettime(CLOCK_REALTIME, &deadline);
      deadline.tv_nsec += kWaitMicros * 1000;
      deadline.tv_sec += deadline.tv_nsec / 1000000000;
      deadline.tv_nsec %= 1000000000;
    }
    if (pthread_cond_timedwait(&freed_one, &mu, &deadline) == ETIMEDOUT) {
      // Two blocks alive at once: keeping both would keep both resident.
      for (Slot& s : slots)
        if (Fits(s, size) && s.used) s.drop = true;
      pthread_mutex_unlock(&mu);
      return nullptr;
    }
  }
  if (best >= 0) {
    slots[best].used = true;
    void* p = slots[best].p;
    pthread_mutex_unlock(&mu);
    return p;
  }
  void* p = empty < 0 ? MAP_FAILED
                      : mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0);
  if (p == MAP_FAILED) {
    pthread_mutex_unlock(&mu);
    return nullptr;
  }
  madvise(p, size, MADV_HUGEPAGE);  // fewer faults and TLB misses; ignored where unsupported
  slots[empty] = {static_cast<char*>(p), size, true, false, 0};
  const uintptr_t at = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t lo = lowest.load(); at < lo && !lowest.compare_exchange_weak(lo, at);) {}
  for (uintptr_t hi = highest.load(); at + size > hi && !highest.compare_exchange_weak(hi, at + size);) {}
  pthread_mutex_unlock(&mu);
  return p;
}

// The slot of a block in use at p, or -1; the caller holds the lock.
int Find(const void* p) {
  for (int i = 0; i < kSlots; ++i)
    if (slots[i].p == p && slots[i].used) return i;
  return -1;
}

bool MaybeOurs(const void* p) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p);
  return p && at >= lowest.load(std::memory_order_relaxed) &&
         at < highest.load(std::memory_order_relaxed);
}

// Marks the block at p idle (unmapping the oldest idle one beyond kMaxIdle); false if p is not
// one of ours.
bool Give(void* p) {
  if (!MaybeOurs(p)) return false;
  pthread_mutex_lock(&mu);
  const int i = Find(p);
  if (i < 0) {
    pthread_mutex_unlock(&mu);
    return false;
  }
  if (slots[i].drop) {
    munmap(slots[i].p, slots[i].size);
    slots[i] = {};
    pthread_mutex_unlock(&mu);
    return true;
  }
  slots[i].used = false;
  slots[i].freed = ++clock_ticks;
  pthread_cond_broadcast(&freed_one);
  int idle = 0, oldest = -1;
  for (int j = 0; j < kSlots; ++j)
    if (slots[j].p && !slots[j].used) {
      ++idle;
      if (oldest < 0 || slots[j].freed < slots[oldest].freed) oldest = j;
    }
  if (idle > kMaxIdle) {
    munmap(slots[oldest].p, slots[oldest].size);
    slots[oldest] = {};
  }
  pthread_mutex_unlock(&mu);
  return true;
}

// The size of the block in use at p, or 0 if p is not one of ours.
size_t SizeOf(void* p) {
  if (!MaybeOurs(p)) return 0;
  pthread_mutex_lock(&mu);
  const int i = Find(p);
  const size_t size = i < 0 ? 0 : slots[i].size;
  pthread_mutex_unlock(&mu);
  return size;
}

}  // namespace

extern "C" {

void* malloc(size_t n) {
  if (n >= kMinBlock)
    if (void* p = Take(n)) return p;
  return __libc_malloc(n);
}

void free(void* p) {
  if (!Give(p)) __libc_free(p);
}

void* realloc(void* p, size_t n) {
  const size_t have = SizeOf(p);
  if (!have) return __libc_realloc(p, n);
  if (n <= have && n >= have / 2) return p;
  void* q = malloc(n);
  if (!q) return nullptr;
  std::memcpy(q, p, n < have ? n : have);
  free(p);
  return q;
}

void* reallocarray(void* p, size_t count, size_t size) {
  size_t n;
  if (__builtin_mul_overflow(count, size, &n)) {
    errno = ENOMEM;
    return nullptr;
  }
  return realloc(p, n);
}

void* memalign(size_t align, size_t n) {
  if (n >= kMinBlock && align <= kMaxAlign)
    if (void* p = Take(n)) return p;
  return __libc_memalign(align, n);
}

void* aligned_alloc(size_t align, size_t n) { return memalign(align, n); }

int posix_memalign(void** out, size_t align, size_t n) {
  if (align < sizeof(void*) || (align & (align - 1))) return EINVAL;
  void* p = memalign(align, n);
  if (!p && n) return ENOMEM;
  *out = p;
  return 0;
}

size_t malloc_usable_size(void* p) {
  const size_t have = SizeOf(p);
  return have ? have : NextUsableSize(p);
}

// For tests: how many allocations waited for a block in use.
uint64_t ftjax_block_cache_waits() {
  pthread_mutex_lock(&mu);
  const uint64_t n = waits;
  pthread_mutex_unlock(&mu);
  return n;
}

// For tests: how many blocks are mapped, and how many of them are in use.
void ftjax_block_cache_counts(int* mapped, int* used) {
  pthread_mutex_lock(&mu);
  *mapped = *used = 0;
  for (const Slot& s : slots)
    if (s.p) {
      ++*mapped;
      *used += s.used;
    }
  pthread_mutex_unlock(&mu);
}

}  // extern "C"
