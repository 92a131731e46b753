// Moments of float32 data in one read, for XLA's CPU backend (XLA FFI).
//
// The input is viewed as (B, R, C), row-major; the R axis is reduced, so the
// statistics have shape (B, C). Leading batch dimensions added by vmap fold
// into B: C is the last dimension of the outputs, B = outputs / C and
// R = inputs / (B * C).
//
// Each group is accumulated around a shift close to its mean (the mean of
// its first block of valid values): in float32 over short blocks, then in
// double. Sums of x - shift and (x - shift)^2 then lose nothing that float32
// data can show, at any offset, and the mean is returned as two float32 values
// hi + lo so that ((x - hi) - lo) keeps that precision when the data are
// normalized in float32 (strided groups compute it as (x - hi) * factor +
// (bias - lo * factor), one rounding fewer). Groups are split into fixed chunks that are merged
// in a fixed order (the pairwise update of Chan, Golub and LeVeque), so the
// result does not depend on the number of threads.
//
// Handler brainnorm_normalize_f32(x, mask, scale, bias) -> (y, hi, lo, var, count):
// y = ((x - hi) - lo) / sqrt(var + eps) * scale + bias, with the statistics
// of the valid elements of each group. Attributes: centered (false: RMS, var
// is the mean of x^2 and hi = lo = 0), masked, param_axis (1: scale and bias
// vary along R, 2: along C), eps. A group without valid elements gets
// inv = 0, so y = bias there.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Branch-free select on a 0/1 mask byte (XLA's PRED), so masked loops
// vectorize: keep ? a : b, bit for bit (non-finite a never leaks into b).
inline float pick(uint8_t keep, float a, float b) {
  const uint32_t k = 0u - static_cast<uint32_t>(keep);
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  const uint32_t u = (ua & k) | (ub & ~k);
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

struct Acc {
  double n = 0, k = 0, s1 = 0, s2 = 0;

  // Adds another accumulator, re-expressed around this one's shift.
  void merge(const Acc& o) {
    if (o.n == 0) return;
    if (n == 0) {
      *this = o;
      return;
    }
    const double d = o.k - k;
    s2 += o.s2 + 2 * d * o.s1 + o.n * d * d;
    s1 += o.s1 + o.n * d;
    n += o.n;
  }
};

// Groups are summed in blocks of kBlock elements (kBlock / 8 rows for C > 1)
// in float32 at SIMD width around a shift close to the group's mean (the mean
// of its first block: an ordinary float, it only has to be close to the data),
// and the block sums are added up in double.
constexpr int64_t kBlock = 256;

// Elements [i0, i1) of a contiguous group around a fixed shift k (padding
// counts as nothing): float32 sums at SIMD width.
void shifted_block(const float* __restrict__ x, const uint8_t* __restrict__ m, int64_t i0, int64_t i1, float k,
                   float* t1, float* t2, float* tn) {
  float a = 0, b = 0, n = 0;
  if (m == nullptr) {
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = i0; i < i1; ++i) {
      const float d = x[i] - k;
      a += d;
      b += d * d;
    }
    n = static_cast<float>(i1 - i0);
  } else {
#pragma omp simd reduction(+ : a, b, n)
    for (int64_t i = i0; i < i1; ++i) {
      const float d = pick(m[i], x[i] - k, 0.0f);
      a += d;
      b += d * d;
      n += static_cast<float>(m[i]);
    }
  }
  *t1 = a;
  *t2 = b;
  *tn = n;
}

// A contiguous group of r elements (the C == 1 case), in one pass: the shift
// is the mean of the valid values of the first block (or the first valid
// value, when that block has none), blocks are summed in float32 and added
// up in double.
Acc row_moments(const float* x, const bool* mask, int64_t r, bool centered) {
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask);
  float k = 0;
  if (centered) {
    float t1, t2, tn;
    const int64_t b1 = std::min(r, kBlock);
    shifted_block(x, m, 0, b1, 0.0f, &t1, &t2, &tn);
    if (tn > 0) {
      k = t1 / tn;
    } else {
      int64_t first = b1;
      while (first < r && !m[first]) ++first;
      if (first == r) return Acc();
      k = x[first];
    }
  }
  double s1 = 0, s2 = 0, n = 0;
  for (int64_t i0 = 0; i0 < r; i0 += kBlock) {
    float t1, t2, tn;
    shifted_block(x, m, i0, std::min(r, i0 + kBlock), k, &t1, &t2, &tn);
    s1 += t1;
    s2 += t2;
    n += tn;
  }
  Acc a;
  if (n > 0) {
    a.n = n;
    a.k = k;
    a.s1 = s1;
    a.s2 = s2;
  }
  return a;
}

// Sums of rows [r0, r1) around k into t1, t2, tn (overwritten), column by column.
void column_block(const float* __restrict__ x, const uint8_t* __restrict__ m, int64_t r0, int64_t r1, int64_t c,
                  const float* __restrict__ k, float* __restrict__ t1, float* __restrict__ t2,
                  float* __restrict__ tn) {
  std::fill(t1, t1 + c, 0.0f);
  std::fill(t2, t2 + c, 0.0f);
  std::fill(tn, tn + c, m == nullptr ? static_cast<float>(r1 - r0) : 0.0f);
  int64_t r = r0;
  if (m == nullptr) {
    // four rows per pass over the accumulators: a quarter of their loads and stores
    for (; r + 4 <= r1; r += 4) {
      const float* __restrict__ a = x + r * c;
      const float* __restrict__ b = a + c;
      const float* __restrict__ e = b + c;
      const float* __restrict__ f = e + c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        const float d0 = a[j] - k[j], d1 = b[j] - k[j], d2 = e[j] - k[j], d3 = f[j] - k[j];
        t1[j] += (d0 + d1) + (d2 + d3);
        t2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
      }
    }
  }
  for (; r < r1; ++r) {
    const float* __restrict__ xr = x + r * c;
    if (m == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        const float d = xr[j] - k[j];
        t1[j] += d;
        t2[j] += d * d;
      }
    } else {
      const uint8_t* __restrict__ mr = m + r * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        const float d = pick(mr[j], xr[j] - k[j], 0.0f);
        t1[j] += d;
        t2[j] += d * d;
        tn[j] += static_cast<float>(mr[j]);
      }
    }
  }
}

// Per-column sums of two terms over rows [r0, r1): add_row(r, a, b) adds row
// r's terms of C consecutive columns to a and b. Float32 over blocks of
// `block` rows, added up in double into s1 and s2. Used inside the
// out-of-line tiles below, where a and b stay in registers for a block.
template <int C, typename AddRow>
[[gnu::always_inline]] inline void block_sums(int64_t r0, int64_t r1, int64_t block, AddRow add_row,
                                              double* __restrict__ s1, double* __restrict__ s2) {
  for (int64_t b0 = r0; b0 < r1; b0 += block) {
    const int64_t b1 = std::min(r1, b0 + block);
    float a[C], b[C];
    for (int j = 0; j < C; ++j) a[j] = b[j] = 0.0f;
    for (int64_t r = b0; r < b1; ++r) add_row(r, a, b);
#pragma omp simd
    for (int j = 0; j < C; ++j) {
      s1[j] += a[j];
      s2[j] += b[j];
    }
  }
}

// Unmasked column sums of rows [r0, r1) for C consecutive columns (a
// compile-time count) of rows ld floats apart, around k, into s1 and s2.
// Kept out of line: inlined into its callers, the compiler spilled the
// accumulators to the stack (1.5x the time).
template <int C>
[[gnu::noinline]] void column_tile(const float* __restrict__ x, int64_t ld, int64_t r0, int64_t r1, int64_t block,
                                   const float* __restrict__ k, double* __restrict__ s1, double* __restrict__ s2) {
  float kk[C];
  for (int j = 0; j < C; ++j) kk[j] = k[j];
  block_sums<C>(r0, r1, block, [&](int64_t r, float* __restrict__ a, float* __restrict__ b) {
    const float* __restrict__ xr = x + r * ld;
#pragma omp simd
    for (int j = 0; j < C; ++j) {
      const float d = xr[j] - kk[j];
      a[j] += d;
      b[j] += d * d;
    }
  }, s1, s2);
}

// Column tiles of up to 4 kTile columns covering c (a multiple of kTile):
// fn(std::integral_constant<int, width>{}, first column) for each.
constexpr int64_t kTile = 16;

template <typename F>
void for_each_tile(int64_t c, F fn) {
  for (int64_t j0 = 0; j0 < c; j0 += 4 * kTile) {
    switch (std::min<int64_t>(c - j0, 4 * kTile) / kTile) {
      case 4: fn(std::integral_constant<int, 4 * kTile>{}, j0); break;
      case 3: fn(std::integral_constant<int, 3 * kTile>{}, j0); break;
      case 2: fn(std::integral_constant<int, 2 * kTile>{}, j0); break;
      default: fn(std::integral_constant<int, kTile>{}, j0); break;
    }
  }
}

// Unmasked sums of rows [r0, r1) for c a multiple of kTile.
void column_sums_tiled(const float* x, int64_t r0, int64_t r1, int64_t c, int64_t block, const float* k, double* s1,
                       double* s2) {
  for_each_tile(c, [&](auto width, int64_t j0) {
    column_tile<decltype(width)::value>(x + j0, c, r0, r1, block, k + j0, s1 + j0, s2 + j0);
  });
}

// Backward sums of rows [r0, r1) for C consecutive columns of rows ld floats
// apart: sum dy and sum dy * x_hat, x_hat = ((x - h) - l) * iv, into sdy and
// sdyx (out of line, as column_tile).
template <int C>
[[gnu::noinline]] void grad_tile(const float* __restrict__ x, const float* __restrict__ dy, int64_t ld, int64_t r0,
                                 int64_t r1, int64_t block, const float* __restrict__ h, const float* __restrict__ l,
                                 const float* __restrict__ iv, double* __restrict__ sdy, double* __restrict__ sdyx) {
  float hh[C], ll[C], ii[C];
  for (int j = 0; j < C; ++j) {
    hh[j] = h[j];
    ll[j] = l[j];
    ii[j] = iv[j];
  }
  block_sums<C>(r0, r1, block, [&](int64_t r, float* __restrict__ a, float* __restrict__ b) {
    const float* __restrict__ xr = x + r * ld;
    const float* __restrict__ gr = dy + r * ld;
#pragma omp simd
    for (int j = 0; j < C; ++j) {
      a[j] += gr[j];
      b[j] += gr[j] * (((xr[j] - hh[j]) - ll[j]) * ii[j]);
    }
  }, sdy, sdyx);
}

void column_moments(const float* x, const bool* m, int64_t r0, int64_t r1, int64_t c, bool centered,
                    Acc* out) {
  const uint8_t* mb = reinterpret_cast<const uint8_t*>(m);
  const int64_t rows_per_block = std::max<int64_t>(1, kBlock / 8);
  std::vector<float> scratch(static_cast<size_t>(4 * c), 0.0f);
  float* k = scratch.data();
  float* t1 = k + c;
  float* t2 = t1 + c;
  float* tn = t2 + c;
  if (centered) {
    // The shift of every column: the mean of its valid values in the first
    // block, or its first valid value when that block has none.
    const int64_t b1 = std::min(r1, r0 + rows_per_block);
    column_block(x, mb, r0, b1, c, k, t1, t2, tn);
    for (int64_t j = 0; j < c; ++j) {
      if (tn[j] > 0) {
        k[j] = t1[j] / tn[j];
        continue;
      }
      for (int64_t i = b1; i < r1; ++i) {
        if (mb[i * c + j]) {
          k[j] = x[i * c + j];
          break;
        }
      }
    }
  }
  std::vector<double> totals(static_cast<size_t>(3 * c), 0.0);
  double* s1 = totals.data();
  double* s2 = s1 + c;
  double* n = s2 + c;
  if (mb == nullptr && c % kTile == 0) {
    column_sums_tiled(x, r0, r1, c, rows_per_block, k, s1, s2);
    std::fill(n, n + c, static_cast<double>(r1 - r0));
  } else {
    for (int64_t b0 = r0; b0 < r1; b0 += rows_per_block) {
      const int64_t b1 = std::min(r1, b0 + rows_per_block);
      column_block(x, mb, b0, b1, c, k, t1, t2, tn);
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        s1[j] += t1[j];
        s2[j] += t2[j];
        n[j] += tn[j];
      }
    }
  }
  for (int64_t j = 0; j < c; ++j) {
    Acc a;
    a.n = n[j];
    a.k = k[j];
    a.s1 = s1[j];
    a.s2 = s2[j];
    if (a.n > 0) out[j].merge(a);
  }
}

// Work shared by the calling thread and the intra-op thread pool, in two
// phases: first(i) for i in [0, n1), then between() once, on the thread that
// finishes the last first(i), then second(i) for i in [0, n2).
// - Tasks are claimed from one counter, so a helper that starts late finds
//   fewer (or no) tasks left, and the caller waits only for claimed work.
// - Each helper is scheduled once per call and stays for both phases: on a
//   virtual machine a sleeping pool thread takes tens of microseconds to wake
//   (measured: 40-100 us on the development VM), a large part of a pass over
//   a few MiB.
// - The waits (for another thread's last task, or for between()) are a few
//   microseconds: they spin for a while before they block.
struct TeamState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done1{0}, done2{0};
  std::atomic<bool> ready{false};  // between() has returned
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<int> caller_cpu{-1};

  // Whether this thread should claim another task. The scheduler sometimes
  // wakes a helper on the CPU the caller runs on; the two then take turns on
  // one CPU, and each wait for the other spins while the other cannot run.
  // A helper that finds itself there leaves the work to the caller.
  bool claim_on_this_cpu(bool helper) {
#if defined(__linux__)
    const int cpu = sched_getcpu();
    if (!helper) {
      caller_cpu.store(cpu, std::memory_order_relaxed);
      return true;
    }
    return cpu < 0 || cpu != caller_cpu.load(std::memory_order_relaxed);
#else
    (void)helper;
    return true;
#endif
  }

  template <typename P>
  void await(P pred) {
    if (pred()) return;
    const auto limit = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
    for (int i = 1;; ++i) {
      spin_pause();
      if (pred()) return;
      if (i % 64 == 0 && std::chrono::steady_clock::now() > limit) break;
    }
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, pred);
  }
  void wake() {
    std::lock_guard<std::mutex> lock(mu);
    cv.notify_all();
  }

  static constexpr int64_t kSpinMicros = 50;
  static void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }
};

struct NoWork {
  void operator()() const {}
  void operator()(int64_t) const {}
};

template <typename F1, typename B, typename F2>
void phased_for(ffi::ThreadPool& pool, int64_t n1, F1 first, B between, int64_t n2, F2 second) {
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), std::max(n1, n2));
  if (threads <= 1) {
    for (int64_t i = 0; i < n1; ++i) first(i);
    between();
    for (int64_t i = 0; i < n2; ++i) second(i);
    return;
  }
  if (n1 == 0) {
    between();
    phased_for(pool, n2, second, NoWork{}, 0, NoWork{});
    return;
  }
  auto state = std::make_shared<TeamState>();
  TeamState& st = *state;
  // A thread touches first, between and second only while it holds claimed
  // work, and the caller returns only when all claimed work is done, so they
  // (on the caller's stack) outlive every use; a helper that starts late
  // finds nothing and touches only the shared state.
  auto work = [state, n1, n2, &first, &between, &second](bool helper) {
    TeamState& st = *state;
    const auto ready = [&st] { return st.ready.load(std::memory_order_acquire); };
    for (int64_t i;;) {
      if (!st.claim_on_this_cpu(helper)) return;
      if ((i = st.next.fetch_add(1, std::memory_order_relaxed)) >= n1 + n2) break;
      if (i < n1) {
        first(i);
        if (st.done1.fetch_add(1, std::memory_order_acq_rel) + 1 == n1) {
          between();
          st.ready.store(true, std::memory_order_release);
          st.wake();
        }
        continue;
      }
      st.await(ready);
      second(i - n1);
      if (st.done2.fetch_add(1, std::memory_order_acq_rel) + 1 == n2) st.wake();
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work] { work(true); });
  work(false);
  st.await([&st, n1, n2] {
    return st.ready.load(std::memory_order_acquire) && st.done2.load(std::memory_order_acquire) == n2;
  });
}

// fn(i) for i in [0, tasks), shared with the thread pool.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t tasks, F fn) {
  phased_for(pool, tasks, fn, NoWork{}, 0, NoWork{});
}

constexpr int64_t kChunkElements = 1 << 15;  // elements per task
constexpr int64_t kGradBlock = 32;          // rows per float32 block of the backward column sums
constexpr int64_t kMinChunkRows = 64;

struct Shape {
  int64_t b, r, c;  // groups along B and C; R is reduced
};

// Statistics of every (b, c) group of a strided layout (C > 1; contiguous
// groups are handled in normalize_impl, together with their output): one
// task per (b, chunk of rows), merged chunk by chunk in a fixed order.
struct ColumnMoments {
  const float* x;
  const bool* mask;
  Shape s;
  bool centered;
  int64_t rows_per_chunk, chunks;
  std::vector<Acc> partial;

  ColumnMoments(const float* x_, const bool* mask_, const Shape& s_, bool centered_)
      : x(x_), mask(mask_), s(s_), centered(centered_),
        // at least kMinChunkRows rows per chunk: the partial sums (32 bytes
        // per column and chunk) stay under an eighth of the input for any C
        rows_per_chunk(std::max<int64_t>(kMinChunkRows, kChunkElements / s_.c)),
        chunks(std::max<int64_t>(1, (s_.r + rows_per_chunk - 1) / rows_per_chunk)),
        partial(static_cast<size_t>(s_.b * chunks * s_.c)) {}

  int64_t tasks() const { return s.b * chunks; }

  void run(int64_t t) {
    const int64_t g = t / chunks, chunk = t % chunks;
    const int64_t r0 = chunk * rows_per_chunk, r1 = std::min(s.r, r0 + rows_per_chunk);
    const int64_t offset = g * s.r * s.c;
    column_moments(x + offset, mask ? mask + offset : nullptr, r0, r1, s.c, centered, partial.data() + t * s.c);
  }

  std::vector<Acc> merged() const {
    std::vector<Acc> acc(static_cast<size_t>(s.b * s.c));
    for (int64_t g = 0; g < s.b; ++g) {
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const Acc* p = partial.data() + (g * chunks + chunk) * s.c;
        for (int64_t j = 0; j < s.c; ++j) acc[g * s.c + j].merge(p[j]);
      }
    }
    return acc;
  }
};

// y = ((x - hi) - lo) * inv * scale + bias over the whole array; the affine
// parameters vary along R (param_axis 1) or C (param_axis 2), one row of them
// per leading batch block of `groups_per_param_row` groups along B.
struct Affine {
  const float* scale;  // nullptr: 1
  const float* bias;   // nullptr: 0
  int64_t axis;        // 1: along R, 2: along C
  int64_t len;         // R or C
  int64_t scale_rows, bias_rows, b_inner;
};

ffi::Error normalize_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, const bool* mask, const Affine& aff_in,
                          bool centered, float eps, float* y, float* hp, float* lp, float* vp, float* count) {
  const auto dims = x.dimensions();
  if (dims.size() < 3) return ffi::Error::InvalidArgument("brainnorm normalize: input must be (..., B, R, C)");
  const int64_t rank = static_cast<int64_t>(dims.size());
  Shape s{1, dims[rank - 2], dims[rank - 1]};
  for (int64_t i = 0; i < rank - 2; ++i) s.b *= dims[i];
  const float* xp = x.typed_data<float>();
  const Affine aff = aff_in;
  // Statistics of group g into the outputs; returns inv = 1 / sqrt(var + eps).
  auto finalize = [&](int64_t g, const Acc& a) -> float {
    if (count != nullptr) count[g] = static_cast<float>(a.n);
    if (a.n == 0) {
      hp[g] = lp[g] = vp[g] = 0.0f;
      return 0.0f;
    }
    const double delta = a.s1 / a.n;
    float v;
    if (centered) {
      const double mean = a.k + delta;
      const float h = static_cast<float>(mean);
      hp[g] = h;
      lp[g] = static_cast<float>(mean - static_cast<double>(h));
      v = static_cast<float>(std::max(a.s2 / a.n - delta * delta, 0.0));
    } else {
      hp[g] = lp[g] = 0.0f;
      v = static_cast<float>(a.s2 / a.n);
    }
    vp[g] = v;
    return 1.0f / std::sqrt(v + eps);
  };
  auto affine_rows = [&](int64_t g, const float** sc, const float** bi) {
    const int64_t prow = g / aff.b_inner;
    *sc = aff.scale ? aff.scale + (aff.scale_rows > 1 ? prow * aff.len : 0) : nullptr;
    *bi = aff.bias ? aff.bias + (aff.bias_rows > 1 ? prow * aff.len : 0) : nullptr;
  };
  if (s.c == 1) {
    // Contiguous groups: statistics and output of a group in one task, the
    // second read from cache.
    const int64_t per_task = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(s.r, 1));
    const int64_t tasks = (s.b + per_task - 1) / per_task;
    parallel_for(pool, tasks, [&](int64_t t) {
      const int64_t end = std::min(s.b, (t + 1) * per_task);
      for (int64_t g = t * per_task; g < end; ++g) {
        const float* __restrict__ xg = xp + g * s.r;
        float* __restrict__ yg = y + g * s.r;
        const float iv = finalize(g, row_moments(xg, mask ? mask + g * s.r : nullptr, s.r, centered));
        const float h = hp[g], l = lp[g];
        const float *sc, *bi;
        affine_rows(g, &sc, &bi);
        if (aff.axis == 1) {
          if (sc != nullptr && bi != nullptr) {
#pragma omp simd
            for (int64_t r = 0; r < s.r; ++r) yg[r] = ((xg[r] - h) - l) * iv * sc[r] + bi[r];
            continue;
          }
          if (sc != nullptr) {
#pragma omp simd
            for (int64_t r = 0; r < s.r; ++r) yg[r] = ((xg[r] - h) - l) * iv * sc[r];
            continue;
          }
          if (bi != nullptr) {
#pragma omp simd
            for (int64_t r = 0; r < s.r; ++r) yg[r] = ((xg[r] - h) - l) * iv + bi[r];
            continue;
          }
        }
        const float gs = sc ? sc[0] : 1.0f, gb = bi ? bi[0] : 0.0f;
#pragma omp simd
        for (int64_t r = 0; r < s.r; ++r) yg[r] = ((xg[r] - h) - l) * iv * gs + gb;
      }
    });
    return ffi::Error::Success();
  }
  // Strided groups: the statistics of every group (phase one), then the
  // output over row blocks (phase two), by one team of threads.
  ColumnMoments moments(xp, mask, s, centered);
  const int64_t groups = s.b * s.c;
  std::vector<float> inv(static_cast<size_t>(groups));
  const int64_t rows_per_task = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(s.c, 1));
  const int64_t r_tasks = (s.r + rows_per_task - 1) / rows_per_task;
  // Phase two visits the row blocks backwards: the blocks that phase one
  // read last are still in the cores' L2 caches.
  auto rows_of = [&](int64_t t, int64_t* g, int64_t* r0, int64_t* r1) {
    t = s.b * r_tasks - 1 - t;
    *g = t / r_tasks;
    *r0 = (t % r_tasks) * rows_per_task;
    *r1 = std::min(s.r, *r0 + rows_per_task);
  };
  auto stats_task = [&](int64_t t) { moments.run(t); };
  if (aff.axis == 2) {
    // y = (x - hi) * factor + offset, with offset = bias - lo * factor: the
    // low part of the mean folded into the offset (one rounding fewer).
    std::vector<float> factor(static_cast<size_t>(groups)), offset(static_cast<size_t>(groups));
    auto finish = [&] {
      const std::vector<Acc> acc = moments.merged();
      for (int64_t g = 0; g < groups; ++g) inv[g] = finalize(g, acc[g]);
      for (int64_t g = 0; g < s.b; ++g) {
        const float *sc, *bi;
        affine_rows(g, &sc, &bi);
        for (int64_t j = 0; j < s.c; ++j) {
          const float f = inv[g * s.c + j] * (sc ? sc[j] : 1.0f);
          factor[g * s.c + j] = f;
          offset[g * s.c + j] = static_cast<float>((bi ? bi[j] : 0.0) - static_cast<double>(lp[g * s.c + j]) * f);
        }
      }
    };
    phased_for(pool, moments.tasks(), stats_task, finish, s.b * r_tasks, [&](int64_t t) {
      int64_t g, r0, r1;
      rows_of(t, &g, &r0, &r1);
      const float* __restrict__ hg = hp + g * s.c;
      const float* __restrict__ fg = factor.data() + g * s.c;
      const float* __restrict__ og = offset.data() + g * s.c;
      for (int64_t r = r0; r < r1; ++r) {
        const float* __restrict__ xr = xp + (g * s.r + r) * s.c;
        float* __restrict__ yr = y + (g * s.r + r) * s.c;
#pragma omp simd
        for (int64_t j = 0; j < s.c; ++j) yr[j] = (xr[j] - hg[j]) * fg[j] + og[j];
      }
    });
    return ffi::Error::Success();
  }
  auto finish = [&] {
    const std::vector<Acc> acc = moments.merged();
    for (int64_t g = 0; g < groups; ++g) inv[g] = finalize(g, acc[g]);
  };
  phased_for(pool, moments.tasks(), stats_task, finish, s.b * r_tasks, [&](int64_t t) {
    int64_t g, r0, r1;
    rows_of(t, &g, &r0, &r1);
    const float *sc, *bi;
    affine_rows(g, &sc, &bi);
    const float* hg = hp + g * s.c;
    const float* lg = lp + g * s.c;
    const float* ig = inv.data() + g * s.c;
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict__ xr = xp + (g * s.r + r) * s.c;
      float* __restrict__ yr = y + (g * s.r + r) * s.c;
      const float gs = sc ? sc[r] : 1.0f, gb = bi ? bi[r] : 0.0f;
#pragma omp simd
      for (int64_t j = 0; j < s.c; ++j) yr[j] = ((xr[j] - hg[j]) - lg[j]) * ig[j] * gs + gb;
    }
  });
  return ffi::Error::Success();
}

ffi::Error check_affine(const ffi::AnyBuffer& p, int64_t len, int64_t b_total, int64_t b_inner, int64_t* rows) {
  const int64_t n = static_cast<int64_t>(p.element_count());
  if (n == 0) {
    *rows = 0;
    return ffi::Error::Success();
  }
  if (n % len != 0) return ffi::Error::InvalidArgument("brainnorm normalize: affine parameter size");
  *rows = n / len;
  if (*rows != 1 && *rows * b_inner != b_total) {
    return ffi::Error::InvalidArgument("brainnorm normalize: affine parameter batch size");
  }
  return ffi::Error::Success();
}

ffi::Error normalize(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer scale,
                     ffi::AnyBuffer bias, bool centered, bool masked, int64_t param_axis, float eps,
                     ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> hi,
                     ffi::Result<ffi::AnyBuffer> lo, ffi::Result<ffi::AnyBuffer> var,
                     ffi::Result<ffi::AnyBuffer> count) {
  const auto dims = x.dimensions();
  const int64_t rank = static_cast<int64_t>(dims.size());
  if (rank < 3) return ffi::Error::InvalidArgument("brainnorm normalize: input must be (..., B, R, C)");
  if (masked && mask.element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("brainnorm normalize: mask and input sizes differ");
  }
  int64_t b_total = 1;
  for (int64_t i = 0; i < rank - 2; ++i) b_total *= dims[i];
  if (param_axis != 1 && param_axis != 2) return ffi::Error::InvalidArgument("brainnorm normalize: param_axis must be 1 or 2");
  Affine aff{};
  aff.axis = param_axis;
  aff.len = param_axis == 1 ? dims[rank - 2] : dims[rank - 1];
  aff.b_inner = dims[rank - 3];
  if (x.element_count() == 0) {  // no elements: empty groups
    for (auto* out : {hi->typed_data<float>(), lo->typed_data<float>(), var->typed_data<float>(),
                      count->typed_data<float>()}) {
      std::fill(out, out + hi->element_count(), 0.0f);
    }
    return ffi::Error::Success();
  }
  if (auto e = check_affine(scale, aff.len, b_total, aff.b_inner, &aff.scale_rows); e.failure()) return e;
  if (auto e = check_affine(bias, aff.len, b_total, aff.b_inner, &aff.bias_rows); e.failure()) return e;
  aff.scale = aff.scale_rows ? scale.typed_data<float>() : nullptr;
  aff.bias = aff.bias_rows ? bias.typed_data<float>() : nullptr;
  return normalize_impl(pool, x, masked ? mask.typed_data<bool>() : nullptr, aff, centered, eps,
                        y->typed_data<float>(), hi->typed_data<float>(), lo->typed_data<float>(),
                        var->typed_data<float>(), count->typed_data<float>());
}

// ---------------------------------------------------------------------------
// Backward pass. With x_hat = ((x - hi) - lo) * inv, g = dy * scale and n the
// valid count of a group:
//   dx = inv * (g - S_g / n - x_hat * S_gx / n) + 2 d_var (x - mean) / n + d_lo / n
// at valid positions (S_g = sum g, S_gx = sum g x_hat over every position of
// the group: padding outputs use the statistics too), and dx = g * inv at
// padding. Without centering the S_g and d_lo terms drop and x - mean is x.
// d_scale = sum dy x_hat and d_bias = sum dy over everything but the
// parameter axis, one row per leading batch block (vmap).

struct Backward {
  const float *x, *dy, *hi, *lo, *var, *count, *d_lo, *d_var;
  const bool* mask;
  Affine aff;
  bool centered;
  float eps;
  float *dx, *d_scale, *d_bias;
};

float inv_std(float var, float n, float eps) { return n > 0 ? 1.0f / std::sqrt(var + eps) : 0.0f; }

ffi::Error backward_impl(ffi::ThreadPool& pool, const Backward& k, const Shape& s) {
  const Affine& aff = k.aff;
  const int64_t prows = std::max<int64_t>(1, s.b / aff.b_inner);
  const int64_t plen = aff.len;
  std::vector<double> dscale(static_cast<size_t>(prows * plen), 0.0), dbias(dscale.size(), 0.0);
  if (s.c == 1) {
    // Rows: one task per chunk of groups within one parameter row.
    const int64_t per_task = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(s.r, 1));
    const int64_t tasks_per_prow = (aff.b_inner + per_task - 1) / per_task;
    const int64_t tasks = prows * tasks_per_prow;
    const int64_t part_len = aff.axis == 1 ? s.r : 1;
    std::vector<double> ps(static_cast<size_t>(tasks * part_len), 0.0), pb(ps.size(), 0.0);
    parallel_for(pool, tasks, [&](int64_t t) {
      const int64_t prow = t / tasks_per_prow, sub = t % tasks_per_prow;
      const int64_t g0 = prow * aff.b_inner + sub * per_task;
      const int64_t g1 = std::min(prow * aff.b_inner + aff.b_inner, g0 + per_task);
      const float* sc = aff.scale ? aff.scale + (aff.scale_rows > 1 ? prow * plen : 0) : nullptr;
      double* __restrict__ psp = ps.data() + t * part_len;
      double* __restrict__ pbp = pb.data() + t * part_len;
      for (int64_t g = g0; g < g1; ++g) {
        const float* __restrict__ x = k.x + g * s.r;
        const float* __restrict__ dy = k.dy + g * s.r;
        float* __restrict__ dx = k.dx + g * s.r;
        const bool* m = k.mask ? k.mask + g * s.r : nullptr;
        const float n = k.count[g], nn = std::max(n, 1.0f);
        const float iv = inv_std(k.var[g], n, k.eps);
        const float h = k.centered ? k.hi[g] : 0.0f, l = k.centered ? k.lo[g] : 0.0f;
        double sg = 0, sgx = 0;  // float32 blocks, double totals (as in the forward)
        const float gs = sc ? sc[0] : 1.0f;
        const bool per_r = aff.axis == 1 && sc != nullptr;
        for (int64_t b0 = 0; b0 < s.r; b0 += kBlock) {
          const int64_t b1 = std::min(s.r, b0 + kBlock);
          float bg = 0, bgx = 0;
#pragma omp simd reduction(+ : bg, bgx)
          for (int64_t r = b0; r < b1; ++r) {
            const float gr = dy[r] * (per_r ? sc[r] : gs);
            bg += gr;
            bgx += gr * (((x[r] - h) - l) * iv);
          }
          sg += bg;
          sgx += bgx;
        }
        const float a_g = k.centered ? static_cast<float>(sg / nn) : 0.0f;
        const float a_gx = static_cast<float>(sgx / nn);
        const float a_var = 2.0f * k.d_var[g] / nn, a_lo = k.centered ? k.d_lo[g] / nn : 0.0f;
        const float gs0 = gs;
#pragma omp simd
        for (int64_t r = 0; r < s.r; ++r) {
          const float gr = dy[r] * (per_r ? sc[r] : gs0);
          const float c = (x[r] - h) - l;
          const float xh = c * iv;
          const float full = iv * (gr - a_g - xh * a_gx) + a_var * c + a_lo;
          dx[r] = m == nullptr ? full : pick(reinterpret_cast<const uint8_t*>(m)[r], full, gr * iv);
        }
        if (aff.axis == 1) {
#pragma omp simd
          for (int64_t r = 0; r < s.r; ++r) {
            psp[r] += dy[r] * (((x[r] - h) - l) * iv);
            pbp[r] += dy[r];
          }
        } else {
          float a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
          for (int64_t r = 0; r < s.r; ++r) {
            a += dy[r] * (((x[r] - h) - l) * iv);
            b += dy[r];
          }
          psp[0] += a;
          pbp[0] += b;
        }
      }
    });
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t prow = t / tasks_per_prow;
      for (int64_t p = 0; p < part_len; ++p) {
        dscale[prow * plen + p] += ps[t * part_len + p];
        dbias[prow * plen + p] += pb[t * part_len + p];
      }
    }
  } else {
    // Columns (parameters along C): per (b, chunk) sums, then dx.
    if (aff.axis != 2) return ffi::Error::InvalidArgument("brainnorm backward: C > 1 needs parameters along C");
    const int64_t rows_per_chunk = std::max<int64_t>(kMinChunkRows, kChunkElements / s.c);
    const int64_t chunks = std::max<int64_t>(1, (s.r + rows_per_chunk - 1) / rows_per_chunk);
    const int64_t groups = s.b * s.c;
    std::vector<float> inv(groups), hh(groups), ll(groups);
    for (int64_t g = 0; g < groups; ++g) {
      inv[g] = inv_std(k.var[g], k.count[g], k.eps);
      hh[g] = k.centered ? k.hi[g] : 0.0f;
      ll[g] = k.centered ? k.lo[g] : 0.0f;
    }
    // per chunk and column: sum dy, sum dy x_hat (g = dy * scale[c] is constant-scaled per column)
    std::vector<double> p_dy(static_cast<size_t>(s.b * chunks * s.c), 0.0), p_dyx(p_dy.size(), 0.0);
    auto sums = [&](int64_t t) {
      const int64_t b = t / chunks, chunk = t % chunks;
      const int64_t r0 = chunk * rows_per_chunk, r1 = std::min(s.r, r0 + rows_per_chunk);
      const float* __restrict__ hg = hh.data() + b * s.c;
      const float* __restrict__ lg = ll.data() + b * s.c;
      const float* __restrict__ ig = inv.data() + b * s.c;
      if (s.c % kTile == 0) {
        const int64_t off = (b * s.r + r0) * s.c;
        for_each_tile(s.c, [&](auto width, int64_t j0) {
          grad_tile<decltype(width)::value>(k.x + off + j0, k.dy + off + j0, s.c, 0, r1 - r0, kGradBlock, hg + j0,
                                            lg + j0, ig + j0, p_dy.data() + t * s.c + j0,
                                            p_dyx.data() + t * s.c + j0);
        });
        return;
      }
      std::vector<float> a(s.c, 0.0f), bsum(s.c, 0.0f);
      float* __restrict__ ap = a.data();
      float* __restrict__ bp = bsum.data();
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = (b * s.r + r) * s.c;
        const float* __restrict__ x = k.x + off;
        const float* __restrict__ dy = k.dy + off;
#pragma omp simd
        for (int64_t j = 0; j < s.c; ++j) {
          ap[j] += dy[j];
          bp[j] += dy[j] * (((x[j] - hg[j]) - lg[j]) * ig[j]);
        }
        if ((r - r0) % kGradBlock == kGradBlock - 1) {
          for (int64_t j = 0; j < s.c; ++j) {
            p_dy[t * s.c + j] += ap[j];
            p_dyx[t * s.c + j] += bp[j];
            ap[j] = bp[j] = 0.0f;
          }
        }
      }
      for (int64_t j = 0; j < s.c; ++j) {
        p_dy[t * s.c + j] += ap[j];
        p_dyx[t * s.c + j] += bp[j];
      }
    };
    std::vector<float> a_g(groups), a_gx(groups), a_var(groups), a_lo(groups), gsc(groups);
    auto combine = [&] {
      for (int64_t b = 0; b < s.b; ++b) {
        const int64_t prow = b / aff.b_inner;
        const float* sc = aff.scale ? aff.scale + (aff.scale_rows > 1 ? prow * plen : 0) : nullptr;
        for (int64_t j = 0; j < s.c; ++j) {
          double sdy = 0, sdyx = 0;
          for (int64_t chunk = 0; chunk < chunks; ++chunk) {
            sdy += p_dy[(b * chunks + chunk) * s.c + j];
            sdyx += p_dyx[(b * chunks + chunk) * s.c + j];
          }
          const int64_t g = b * s.c + j;
          const float scale = sc ? sc[j] : 1.0f;
          const float nn = std::max(k.count[g], 1.0f);
          gsc[g] = scale;
          a_g[g] = k.centered ? static_cast<float>(scale * sdy / nn) : 0.0f;
          a_gx[g] = static_cast<float>(scale * sdyx / nn);
          a_var[g] = 2.0f * k.d_var[g] / nn;
          a_lo[g] = k.centered ? k.d_lo[g] / nn : 0.0f;
          dscale[prow * plen + j] += sdyx;
          dbias[prow * plen + j] += sdy;
        }
      }
    };
    // dx over the chunks of the sums, the last ones first (still in cache)
    phased_for(pool, s.b * chunks, sums, combine, s.b * chunks, [&](int64_t t) {
      t = s.b * chunks - 1 - t;
      const int64_t b = t / chunks, chunk = t % chunks;
      const int64_t r0 = chunk * rows_per_chunk, r1 = std::min(s.r, r0 + rows_per_chunk);
      const int64_t gb = b * s.c;
      const float* __restrict__ hg = hh.data() + gb;
      const float* __restrict__ lg = ll.data() + gb;
      const float* __restrict__ ig = inv.data() + gb;
      const float* __restrict__ sg = gsc.data() + gb;
      const float* __restrict__ ag = a_g.data() + gb;
      const float* __restrict__ agx = a_gx.data() + gb;
      const float* __restrict__ av = a_var.data() + gb;
      const float* __restrict__ al = a_lo.data() + gb;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = (b * s.r + r) * s.c;
        const float* __restrict__ x = k.x + off;
        const float* __restrict__ dy = k.dy + off;
        float* __restrict__ dx = k.dx + off;
        const bool* m = k.mask ? k.mask + off : nullptr;
#pragma omp simd
        for (int64_t j = 0; j < s.c; ++j) {
          const float gr = dy[j] * sg[j];
          const float c = (x[j] - hg[j]) - lg[j];
          const float full = ig[j] * (gr - ag[j] - c * ig[j] * agx[j]) + av[j] * c + al[j];
          dx[j] = m == nullptr ? full : pick(reinterpret_cast<const uint8_t*>(m)[j], full, gr * ig[j]);
        }
      }
    });
  }
  if (k.d_scale != nullptr) {
    for (size_t i = 0; i < dscale.size(); ++i) k.d_scale[i] = static_cast<float>(dscale[i]);
  }
  if (k.d_bias != nullptr) {
    for (size_t i = 0; i < dbias.size(); ++i) k.d_bias[i] = static_cast<float>(dbias[i]);
  }
  return ffi::Error::Success();
}

ffi::Error normalize_bwd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer scale,
                         ffi::AnyBuffer dy, ffi::AnyBuffer hi, ffi::AnyBuffer lo, ffi::AnyBuffer var,
                         ffi::AnyBuffer count, ffi::AnyBuffer d_lo, ffi::AnyBuffer d_var, bool centered,
                         bool masked, int64_t param_axis, float eps, ffi::Result<ffi::AnyBuffer> dx,
                         ffi::Result<ffi::AnyBuffer> d_scale, ffi::Result<ffi::AnyBuffer> d_bias) {
  const auto dims = x.dimensions();
  const int64_t rank = static_cast<int64_t>(dims.size());
  if (rank < 3) return ffi::Error::InvalidArgument("brainnorm backward: input must be (..., B, R, C)");
  Shape s{1, dims[rank - 2], dims[rank - 1]};
  for (int64_t i = 0; i < rank - 2; ++i) s.b *= dims[i];
  if (param_axis != 1 && param_axis != 2) return ffi::Error::InvalidArgument("brainnorm backward: param_axis must be 1 or 2");
  if (dy.element_count() != x.element_count() || (masked && mask.element_count() != x.element_count())) {
    return ffi::Error::InvalidArgument("brainnorm backward: dy or mask size differs from x");
  }
  if (s.b * s.r * s.c == 0) {
    std::fill(d_scale->typed_data<float>(), d_scale->typed_data<float>() + d_scale->element_count(), 0.0f);
    std::fill(d_bias->typed_data<float>(), d_bias->typed_data<float>() + d_bias->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  Backward k{};
  k.aff.axis = param_axis;
  k.aff.len = param_axis == 1 ? s.r : s.c;
  k.aff.b_inner = dims[rank - 3];
  if (auto e = check_affine(scale, k.aff.len, s.b, k.aff.b_inner, &k.aff.scale_rows); e.failure()) return e;
  const int64_t prows = s.b / k.aff.b_inner;
  if (static_cast<int64_t>(d_scale->element_count()) != prows * k.aff.len) {
    return ffi::Error::InvalidArgument("brainnorm backward: parameter gradient size");
  }
  k.aff.scale = k.aff.scale_rows ? scale.typed_data<float>() : nullptr;
  k.x = x.typed_data<float>();
  k.dy = dy.typed_data<float>();
  k.hi = hi.typed_data<float>();
  k.lo = lo.typed_data<float>();
  k.var = var.typed_data<float>();
  k.count = count.typed_data<float>();
  k.d_lo = d_lo.typed_data<float>();
  k.d_var = d_var.typed_data<float>();
  k.mask = masked ? mask.typed_data<bool>() : nullptr;
  k.centered = centered;
  k.eps = eps;
  k.dx = dx->typed_data<float>();
  k.d_scale = d_scale->typed_data<float>();
  k.d_bias = d_bias->typed_data<float>();
  return backward_impl(pool, k, s);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(brainnorm_normalize_f32, normalize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (..., B, R, C)
                                  .Arg<ffi::AnyBuffer>()  // mask, same size as x (or empty)
                                  .Arg<ffi::AnyBuffer>()  // scale (..., P) or empty
                                  .Arg<ffi::AnyBuffer>()  // bias (..., P) or empty
                                  .Attr<bool>("centered")
                                  .Attr<bool>("masked")
                                  .Attr<int64_t>("param_axis")
                                  .Attr<float>("eps")
                                  .Ret<ffi::AnyBuffer>()   // y, like x
                                  .Ret<ffi::AnyBuffer>()   // hi (..., B, C)
                                  .Ret<ffi::AnyBuffer>()   // lo
                                  .Ret<ffi::AnyBuffer>()   // var
                                  .Ret<ffi::AnyBuffer>());  // count

XLA_FFI_DEFINE_HANDLER_SYMBOL(brainnorm_normalize_bwd_f32, normalize_bwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (..., B, R, C)
                                  .Arg<ffi::AnyBuffer>()  // mask (or empty)
                                  .Arg<ffi::AnyBuffer>()  // scale (..., P) or empty
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // hi (..., B, C)
                                  .Arg<ffi::AnyBuffer>()  // lo
                                  .Arg<ffi::AnyBuffer>()  // var
                                  .Arg<ffi::AnyBuffer>()  // count
                                  .Arg<ffi::AnyBuffer>()  // d_lo
                                  .Arg<ffi::AnyBuffer>()  // d_var
                                  .Attr<bool>("centered")
                                  .Attr<bool>("masked")
                                  .Attr<int64_t>("param_axis")
                                  .Attr<float>("eps")
                                  .Ret<ffi::AnyBuffer>()   // dx
                                  .Ret<ffi::AnyBuffer>()   // d_scale (..., P)
                                  .Ret<ffi::AnyBuffer>());  // d_bias (..., P)
