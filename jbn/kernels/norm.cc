// Fused CPU kernels for layer, RMS, group and instance norm (XLA FFI), compiled by jbn/_kernel.py on first use.
//
// x is viewed as (N, S, G, K): statistics per (n, g) over S and K, scale and bias per channel c = g * K + k.
// Layer/RMS norm over the last axis is (rows, 1, 1, features); instance norm (N, H*W, C, 1); group norm
// (N, H*W, groups, C / groups); statistics over (T, C) with scale over C, (N, T, 1, C).
// The statistics are shifted sums in double (the shift one of the data: see SliceMoments), exact whatever the
// offset or magnitude of float data. The mean is handed on as two floats, hi + lo, so that x - hi - lo keeps
// its precision. Work is split over examples, and over rows of S where there are few examples,
// on XLA's intra-op thread pool in a fixed partition: results do not depend on thread timing.
//
//   statistics: per (n, g): mean and var only (batch norm's, which XLA normalizes)
//   affine:   y = ((x - m) - o) * a + b with given per-channel terms (batch norm's normalization in bfloat16)
//   forward:  per (n, g): mean, var, std = sqrt(var + eps);  y = (x - mean) / std * scale + bias
//   backward: with xhat = (x - mean) / std and g = dy * scale, per (n, g):
//             dx = (g - <g> - xhat <g xhat>) / std   (<g> dropped without centering)
//             dscale = sum over n, s, (k) of dy * xhat,  dbias = sum of dy

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Elements are float32 or bfloat16 (the upper half of a float32's bits, rounded to nearest even).
inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
inline void Store(float* p, int64_t i, float value) { p[i] = value; }
inline void Store(uint16_t* p, int64_t i, float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, quiet_nan = (bits >> 16) | 0x40;
  p[i] = static_cast<uint16_t>(f != f ? quiet_nan : rounded);  // a select, not a branch: the loops vectorize
}

// Asks for [p, p + bytes) in cache ahead of its use: the next task's rows, while this task writes its output
// from cache and the memory bus would otherwise idle. Not while the output streams around the cache (see
// kStreamBytes): on a 2-core AVX-512 EPYC the prefetches then made float32 training 5-11% slower.
inline void Prefetch(const void* p, int64_t bytes) {
  const char* bytes_at = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(bytes_at + b, 0, 2);
}

// Stores of large outputs go around the cache (non-temporal stores, where the CPU has them): such an output leaves
// the cache before it is read anyway, and a cached store first reads in the line it overwrites. On a 2-core AVX-512
// machine this took 10-15% off float32 instance norm training for outputs of 4-8 MiB, also with a consumer reading
// them right after; at 1-2 MiB it helped in some runs and hurt in others.
constexpr int64_t kStreamBytes = int64_t{4} << 20;

// Stores 16 floats from v to p (64-byte aligned) around the cache.
inline void StreamLanes(float* p, const float* v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, _mm512_loadu_ps(v));
#elif defined(__AVX__)
  for (int i = 0; i < 16; i += 8) _mm256_stream_ps(p + i, _mm256_loadu_ps(v + i));
#elif defined(__SSE__)
  for (int i = 0; i < 16; i += 4) _mm_stream_ps(p + i, _mm_loadu_ps(v + i));
#else
  std::memcpy(p, v, 16 * sizeof(float));
#endif
}

// Orders a task's streamed stores before its completion is signalled.
inline void StreamFence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// The planes' outputs go in blocks of kBlockRows rows (the unit of prefetching); streamed ones in chunks of kLanes
// channels, one 64-byte line per row.
constexpr int64_t kLanes = 16, kBlockRows = 16;
static_assert(kLanes * sizeof(float) == 64, "StreamLanes stores one 64-byte line");

// The backward passes' per-channel sums of dy and dy * xhat go in float over blocks of kFloatBlock rows, then in
// double: float's vector lanes, double's reach.
constexpr int64_t kFloatBlock = 16;

// Whether the planes' output `out` goes around the cache: float32, large, and every row chunk a whole aligned line.
template <typename T>
bool Streams(const T* out, int64_t elements, int64_t channels) {
#if defined(__SSE__)
  return std::is_same_v<T, float> && elements * static_cast<int64_t>(sizeof(T)) >= kStreamBytes &&
         channels % kLanes == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0;
#else
  return false;
#endif
}

struct Dims {
  int64_t n, s, g, k;
  int64_t channels() const { return g * k; }
  int64_t example() const { return s * g * k; }
};

// Runs body(0 .. count-1) on the calling thread and the pool (on the calling thread alone where `alone`). The
// caller takes work too and only waits for items already started, so it never waits on a task the pool has not
// begun (no deadlock on a busy pool).
class Parallel {
 public:
  static void For(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t, int64_t)> body,
                  bool alone = false) {
    if (count <= 0) return;
    auto work = std::make_shared<Parallel>(count, std::move(body));
    const int64_t helpers = alone ? 0 : std::min<int64_t>(pool.num_threads(), count - 1);
    for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
    work->Run();
    std::unique_lock<std::mutex> lock(work->mutex_);
    work->finished_.wait(lock, [&] { return work->done_.load() == count; });
  }

  Parallel(int64_t count, std::function<void(int64_t, int64_t)> body) : count_(count), body_(std::move(body)) {}

 private:
  // Each thread claims its next item before running the current one, so that the body can prefetch it.
  void Run() {
    for (int64_t i = next_.fetch_add(1), next; i < count_; i = next) {
      next = next_.fetch_add(1);
      body_(i, next < count_ ? next : -1);
      if (done_.fetch_add(1) + 1 == count_) {
        std::lock_guard<std::mutex> lock(mutex_);
        finished_.notify_all();
      }
    }
  }

  int64_t count_;
  std::function<void(int64_t, int64_t)> body_;
  std::atomic<int64_t> next_{0}, done_{0};
  std::mutex mutex_;
  std::condition_variable finished_;
};

int64_t Workers(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads() + 1); }

// The one-pass kernels (statistics, affine) run inputs of up to kAloneElements on the calling thread alone: a
// helper thread of XLA's pool starts 3-20 us after it is asked. On a 2-core AVX-512 EPYC, alone took 0.83-0.87x
// the time of two threads for batch norm's float32 statistics up to 512K elements, and 0.82-0.94x for its
// bfloat16 normalization; at 1M elements two threads took 0.86-0.91x. The tasks, and so the results, are the same.
constexpr int64_t kAloneElements = int64_t{1} << 19;

// Where the statistics go: mean as (hi, lo) pairs, std and var, each per (n, g).
struct Statistics {
  float* mean;
  float* std;
  float* var;
};

void SetStatistics(double mean, double var, double eps, float* mean_out, float* std_out, float* var_out) {
  mean_out[0] = static_cast<float>(mean);
  mean_out[1] = static_cast<float>(mean - mean_out[0]);
  *std_out = static_cast<float>(std::sqrt(var + eps));
  *var_out = static_cast<float>(var);
}

// The two elementwise formulas, from per-channel floats (hi + lo: the mean; inv: 1 / std):
//   y = xhat * scale + bias,  dx = inv * (dy * scale - a - xhat * b),  with xhat = (x - hi - lo) * inv
// and a = <dy * scale>, b = <dy * scale * xhat> over the statistics' group.
// Without centering (kCentered false: RMS norm's rows) hi and lo are 0 and left out, the same values (x - 0 is x):
// on (16, 512, 768), RMS norm's forward pass took 0.79-0.85x the time in bfloat16 (training 0.87-0.93x), 0.88-0.98x
// in float32.
template <bool kCentered = true>
inline float XhatOf(float v, float hi, float lo, float inv) {
  return (kCentered ? v - hi - lo : v) * inv;
}
template <bool kCentered = true>
inline float OutputOf(float v, float hi, float lo, float inv, float scale, float bias) {
  return XhatOf<kCentered>(v, hi, lo, inv) * scale + bias;
}
template <bool kCentered = true>
inline float GradientOf(float v, float grad, float hi, float lo, float inv, float scale, float a, float b) {
  return inv * (grad * scale - a - XhatOf<kCentered>(v, hi, lo, inv) * b);
}

// Scale and bias with one entry per run of `run` consecutive elements of a group's K: per channel (run 1), per
// group (run K) or, for rows, per part of a row (channels-first group norm: one entry per H * W plane). Planes
// take the first two only (see Parameters).
struct Affine {
  const float* scale;
  const float* bias;
  int64_t run;
  bool per_group() const { return run > 1; }  // on planes, where the run is 1 or K
  int64_t Entry(int64_t c) const { return c / run; }
  int64_t Piece(int64_t k) const { return run > 1 ? run : k; }  // what one PutRow of a row of K writes
};

// ---- Rows (S == 1): each (n, g) is one contiguous run of K elements, handled in registers. ----

// value(k) for k < K to p around the cache (K a multiple of kLanes, p 64-byte aligned; see kStreamBytes).
template <typename F>
void StreamRun(float* p, int64_t K, F&& value) {
  for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
    float out[kLanes];
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) out[j] = value(k0 + j);
    StreamLanes(p + k0, out);
  }
}

// value(k) for k < K to out: around the cache where `stream` (float32 only), else cached.
template <typename T, typename F>
void PutRow(T* out, int64_t K, bool stream, F&& value) {
  if constexpr (std::is_same_v<T, float>) {
    if (stream) return StreamRun(out, K, value);
  }
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) Store(out, k, value(k));
}

// A fixed partition of the examples into chunks of about 64K elements, at most 8 per worker.
int64_t ChunkCount(const Dims& d, ffi::ThreadPool& pool) {
  int64_t by_size = std::max<int64_t>(1, d.n * d.example() / 65536);
  return std::max<int64_t>(1, std::min({d.n, by_size, 8 * Workers(pool)}));
}

inline int64_t Split(int64_t part, int64_t parts, int64_t total) { return total * part / parts; }

// A sum over k < K of term(k): float lanes within runs of 128 elements, double across runs. Float doubles the
// vector lanes; each float partial covers 16 terms per lane. For sums without cancellation (the backward pass).
template <typename F>
double RunSum(int64_t K, F&& term) {
  constexpr int64_t kRun = 128;
  double total = 0.0;
  for (int64_t first = 0; first < K; first += kRun) {
    const int64_t last = std::min(K, first + kRun);
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t k = first; k < last; ++k) part += term(k);
    total += part;
  }
  return total;
}

// y of one row and its statistics. Without centering (RMS norm) the shift, the sum and the subtractions of the
// zero mean are left out (see XhatOf).
template <bool kCentered, typename T>
void RowForward(const T* x, const float* scale, const float* bias, int64_t run, T* y, int64_t K, double eps,
                float* mean_out, float* std_out, float* var_out, bool stream) {
  // One pass of d = x - shift and d^2 in double, the shift being the first element (see SliceMoments).
  const double shift = kCentered ? Load(x, 0) : 0.0;
  double sum = 0.0, sq = 0.0;
  if constexpr (kCentered) {
#pragma omp simd reduction(+ : sum, sq)
    for (int64_t k = 0; k < K; ++k) {
      const double v = Load(x, k) - shift;
      sum += v;
      sq += v * v;
    }
  } else {
#pragma omp simd reduction(+ : sq)
    for (int64_t k = 0; k < K; ++k) {
      const double v = Load(x, k);
      sq += v * v;
    }
  }
  const double m = kCentered ? shift + sum / K : 0.0;
  const double var = kCentered ? std::max(0.0, (sq - sum * (sum / K)) / K) : sq / K;
  SetStatistics(m, var, eps, mean_out, std_out, var_out);
  const float hi = mean_out[0], lo = mean_out[1], r = static_cast<float>(1.0 / std::sqrt(var + eps));
  if (run == 1) {
    return PutRow(y, K, stream,
                  [&](int64_t k) { return OutputOf<kCentered>(Load(x, k), hi, lo, r, scale[k], bias[k]); });
  }
  for (int64_t j = 0; j < K / run; ++j) {
    const int64_t o = j * run;
    const float sj = scale[j], bj = bias[j];
    PutRow(y + o, run, stream, [=](int64_t k) { return OutputOf<kCentered>(Load(x, o + k), hi, lo, r, sj, bj); });
  }
}

// dx of one row, and its dy * xhat and dy added to dscale and dbias: per channel (K entries, float) or, with one
// scale entry per run of `run` elements, to the runs' entries (double).
template <bool kCentered, typename T, typename U>
void RowBackward(const T* x, const float* mean, float std, const float* scale, int64_t run, const U* dy, T* dx,
                 float* dscale, float* dbias, double* run_dscale, double* run_dbias, int64_t K, const double* shift,
                 bool frozen, bool stream) {
  const float hi = mean[0], lo = mean[1], r = static_cast<float>(1.0 / std);
  auto xhat = [=](int64_t k) { return XhatOf<kCentered>(Load(x, k), hi, lo, r); };
  double sum_g = 0.0, sum_gx = 0.0;
  if (run > 1) {
    for (int64_t j = 0; j < K / run; ++j) {
      const int64_t o = j * run;  // the run's offset (by value in the lambdas: a reference would slow them down)
      const double sum_dy = RunSum(run, [=](int64_t k) { return Load(dy, o + k); });
      const double sum_dyx = RunSum(run, [=](int64_t k) { return Load(dy, o + k) * xhat(o + k); });
      run_dscale[j] += sum_dyx;
      run_dbias[j] += sum_dy;
      sum_g += kCentered ? scale[j] * sum_dy : 0.0;
      sum_gx += scale[j] * sum_dyx;
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const float grad = Load(dy, k);
      dscale[k] += grad * xhat(k);
      dbias[k] += grad;
    }
    if (!frozen) {  // with frozen statistics dx takes no sums (a = b = 0)
      sum_g = kCentered ? RunSum(K, [&](int64_t k) { return Load(dy, k) * scale[k]; }) : 0.0;
      sum_gx = RunSum(K, [&](int64_t k) { return Load(dy, k) * scale[k] * xhat(k); });
    }
  }
  const float a = frozen ? 0.0f : static_cast<float>(sum_g / K - shift[0]);
  const float b = frozen ? 0.0f : static_cast<float>(sum_gx / K - shift[1]);
  if (run == 1) {
    return PutRow(dx, K, stream,
                  [&](int64_t k) { return GradientOf<kCentered>(Load(x, k), Load(dy, k), hi, lo, r, scale[k], a, b); });
  }
  for (int64_t j = 0; j < K / run; ++j) {
    const int64_t o = j * run;
    const float sj = scale[j];
    PutRow(dx + o, run, stream,
           [=](int64_t k) { return GradientOf<kCentered>(Load(x, o + k), Load(dy, o + k), hi, lo, r, sj, a, b); });
  }
}

template <typename T>
void RowsForward(ffi::ThreadPool& pool, const Dims& d, const T* x, const Affine& affine, T* y, Statistics out,
                 double eps, bool centered) {
  const int64_t chunks = ChunkCount(d, pool), rows = d.n * d.g;
  const bool stream = Streams(y, d.n * d.example(), affine.Piece(d.k));
  const auto row = centered ? RowForward<true, T> : RowForward<false, T>;
  Parallel::For(pool, chunks, [&, chunks](int64_t chunk, int64_t) {
    for (int64_t i = Split(chunk, chunks, rows); i < Split(chunk + 1, chunks, rows); ++i) {
      const int64_t e = affine.Entry((i % d.g) * d.k);
      row(x + i * d.k, affine.scale + e, affine.bias + e, affine.run, y + i * d.k, d.k, eps, out.mean + 2 * i,
          out.std + i, out.var + i, stream);
    }
    if (stream) StreamFence();
  });
}

template <typename T, typename U>
void RowsBackward(ffi::ThreadPool& pool, const Dims& d, const T* x, const float* mean, const float* std,
                  const Affine& affine, const U* dy, T* dx, double* dscale, double* dbias, const double* shifts,
                  bool centered, bool frozen) {
  const int64_t chunks = ChunkCount(d, pool), rows = d.n * d.g, P = d.channels() / affine.run;
  std::vector<double> partial(2 * P * chunks, 0.0);  // per chunk: dscale, then dbias, per scale entry
  const bool per_channel = affine.run == 1;
  const bool stream = Streams(dx, d.n * d.example(), affine.Piece(d.k));
  const auto row = centered ? RowBackward<true, T, U> : RowBackward<false, T, U>;
  Parallel::For(pool, chunks, [&, chunks](int64_t chunk, int64_t) {
    // Per channel, dscale and dbias are summed in float over blocks of kFloatBlock rows, then in double. Per run,
    // each row's sums are double already.
    double* ds = partial.data() + 2 * P * chunk;
    std::vector<float> block(per_channel ? 2 * P : 0, 0.0f);
    const int64_t begin = Split(chunk, chunks, rows), end = Split(chunk + 1, chunks, rows);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = affine.Entry((i % d.g) * d.k);
      float *block_ds = nullptr, *block_db = nullptr;
      if (per_channel) block_ds = block.data() + e, block_db = block.data() + P + e;
      row(x + i * d.k, mean + 2 * i, std[i], affine.scale + e, affine.run, dy + i * d.k, dx + i * d.k, block_ds,
          block_db, ds + e, ds + P + e, d.k, shifts + 2 * i, frozen, stream);
      if (per_channel && ((i - begin + 1) % kFloatBlock == 0 || i + 1 == end)) {
#pragma omp simd
        for (int64_t c = 0; c < 2 * P; ++c) ds[c] += block[c];
        std::fill(block.begin(), block.end(), 0.0f);
      }
    }
    if (stream) StreamFence();
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t p = 0; p < P; ++p) {
      dscale[p] += partial[2 * P * chunk + p];
      dbias[p] += partial[2 * P * chunk + P + p];
    }
  }
}

// ---- Planes (S > 1): rows of C channels, split into tasks (one example's slice of rows). ----
//
// Each task sums its slice's shifted moments in one pass; slices are pooled with Chan's formula
// (M2 = sum of M2_t + n_t (mean_t - mean)^2), which is exact. Short runs (K < 16: channels last) are summed per
// channel, vectorized across C, in registers chunk by chunk (see kRegisterChannels); long runs in registers per
// run.
//
// A task takes a whole example where there are enough examples to go round and the example has at most
// kSliceElements: then its second pass (y, or dx) reads the example from cache (L2, or the L3 it was evicted to).
// Whole examples of 256K-1M elements were 5-30% faster than slices of 64K-256K.
constexpr int64_t kSliceElements = int64_t{1} << 20;

struct Tasks {
  int64_t per_example, count;
};

Tasks PlaneTasks(const Dims& d, ffi::ThreadPool& pool) {
  int64_t per = (d.example() + kSliceElements - 1) / kSliceElements;
  const int64_t wanted = 4 * Workers(pool);
  if (d.n * per < wanted) per = (wanted + d.n - 1) / d.n;
  per = std::max<int64_t>(1, std::min(per, d.s));
  return Tasks{per, d.n * per};
}

struct Slice {
  int64_t n, begin, end;
};

Slice SliceOf(const Dims& d, const Tasks& tasks, int64_t t) {
  const int64_t n = t / tasks.per_example, part = t % tasks.per_example;
  return Slice{n, Split(part, tasks.per_example, d.s), Split(part + 1, tasks.per_example, d.s)};
}

// Streamed output (see kStreamBytes) of `count` rows of C channels, C a multiple of kLanes: chunk by chunk of kLanes
// channels, each row's chunk one whole line stored at once, the chunk's constants in registers over the rows.
// y of the forward pass:
void StreamOutputs(const float* rows, float* results, int64_t count, const Dims& d, const Affine& affine,
                   const float* h, const float* l, const float* r) {
  const int64_t C = d.channels();
  for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
    float hc[kLanes], lc[kLanes], rc[kLanes], sc[kLanes], bc[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) {
      const int64_t c = c0 + j, e = affine.Entry(c);
      hc[j] = h[c], lc[j] = l[c], rc[j] = r[c], sc[j] = affine.scale[e], bc[j] = affine.bias[e];
    }
    for (int64_t s = 0; s < count; ++s) {
      const float* row = rows + s * C + c0;
      float out[kLanes];
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) out[j] = OutputOf(row[j], hc[j], lc[j], rc[j], sc[j], bc[j]);
      StreamLanes(results + s * C + c0, out);
    }
  }
}

// dx of the backward pass, with the per-channel a and b (see GradientOf):
template <typename U>
void StreamGradients(const float* rows, const U* grads, float* results, int64_t count, const Dims& d,
                     const Affine& affine, const float* h, const float* l, const float* r, const float* a,
                     const float* b) {
  const int64_t C = d.channels();
  for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
    float hc[kLanes], lc[kLanes], rc[kLanes], sc[kLanes], ac[kLanes], bc[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) {
      const int64_t c = c0 + j;
      hc[j] = h[c], lc[j] = l[c], rc[j] = r[c], sc[j] = affine.scale[affine.Entry(c)];
      ac[j] = a[c], bc[j] = b[c];
    }
    for (int64_t s = 0; s < count; ++s) {
      const float* row = rows + s * C + c0;
      const U* grad = grads + s * C + c0;
      float out[kLanes];
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        out[j] = GradientOf(row[j], Load(grad, j), hc[j], lc[j], rc[j], sc[j], ac[j], bc[j]);
      }
      StreamLanes(results + s * C + c0, out);
    }
  }
}

struct SliceScratch {
  std::vector<double> channel, shift;
};

// Per-channel sums over a slice's rows go chunk by chunk of at most kRegisterChannels channels, the chunk's sums
// in registers over the rows (kept in memory, each row's sums would wait on the previous row's stores). Chunks are
// a multiple of kChunkChannels (one vector of doubles) wide, except a last one of fewer.
constexpr int64_t kChunkChannels = 8, kRegisterChannels = 64;
using ChunkWidths = std::integer_sequence<int64_t, 1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 40, 48, 56, 64>;

template <typename F, int64_t... Widths>
void CallWithWidth(int64_t width, int64_t c0, F& chunk, std::integer_sequence<int64_t, Widths...>) {
  ((width == Widths && (chunk(std::integral_constant<int64_t, Widths>{}, c0), true)) || ...);
}

// Calls chunk(width, c0) for the chunks covering C channels, each of `width` channels from c0, `width` a
// compile-time constant (a std::integral_constant).
template <typename F>
void ForChannelChunks(int64_t C, F&& chunk) {
  for (int64_t c0 = 0; c0 < C;) {
    const int64_t left = std::min(C - c0, kRegisterChannels);
    const int64_t width = left < kChunkChannels ? left : left - left % kChunkChannels;
    CallWithWidth(width, c0, chunk, ChunkWidths{});
    c0 += width;
  }
}

// Sums of d = x - shift and d^2 per channel of one chunk of C channels, over `count` rows `stride` apart.
template <int64_t C, typename T>
void SumChunk(const T* rows, int64_t count, int64_t stride, const double* shift, double* sum, double* sq) {
  double s[C] = {}, q[C] = {}, c[C];
  for (int64_t j = 0; j < C; ++j) c[j] = shift[j];
  for (int64_t r = 0; r < count; ++r) {
    const T* row = rows + r * stride;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      const double v = Load(row, j) - c[j];
      s[j] += v;
      q[j] += v * v;
    }
  }
  for (int64_t j = 0; j < C; ++j) sum[j] += s[j], sq[j] += q[j];
}

// Per group of one slice: mean and centered sum of squares, in one pass over d = x - shift in double, the shift
// being the group's first element in the slice: M2 = sum d^2 - (sum d)^2 / n. As the shift is one of the data,
// (mean - shift)^2 <= n var, so the subtraction loses at most a factor n of double's 2^-53: below 2e-10 for a
// slice of kSliceElements (more only where an example has few, long rows). Short runs are summed per channel
// (see kRegisterChannels), long runs in registers per run.
template <typename T>
void SliceMoments(const Dims& d, const T* x, const Slice& slice, bool centered, double* mean, double* m2,
                  SliceScratch& scratch) {
  const int64_t C = d.channels(), count = (slice.end - slice.begin) * d.k;
  const T* base = x + slice.n * d.example();
  std::vector<double>& shift = scratch.shift;
  shift.resize(C);
  for (int64_t g = 0; g < d.g; ++g) {
    const double first = centered ? Load(base + slice.begin * C, g * d.k) : 0.0;
    std::fill_n(shift.data() + g * d.k, d.k, first);
  }
  std::vector<double>& sums = scratch.channel;
  sums.assign(2 * C, 0.0);
  double *sum = sums.data(), *sq = sum + C;
  if (d.k >= 16) {
    for (int64_t s = slice.begin; s < slice.end; ++s) {
      for (int64_t g = 0; g < d.g; ++g) {
        const T* run = base + s * C + g * d.k;
        const double c = shift[g * d.k];
        double run_sum = 0.0, run_sq = 0.0;
#pragma omp simd reduction(+ : run_sum, run_sq)
        for (int64_t k = 0; k < d.k; ++k) {
          const double v = Load(run, k) - c;
          run_sum += v;
          run_sq += v * v;
        }
        sum[g * d.k] += run_sum;
        sq[g * d.k] += run_sq;
      }
    }
  } else {
    const T* rows = base + slice.begin * C;
    ForChannelChunks(C, [&](auto width, int64_t c0) {
      SumChunk<decltype(width)::value>(rows + c0, slice.end - slice.begin, C, shift.data() + c0, sum + c0, sq + c0);
    });
  }
  for (int64_t g = 0; g < d.g; ++g) {
    double group_sum = 0.0, group_sq = 0.0;
    for (int64_t k = 0; k < d.k; ++k) {
      group_sum += sum[g * d.k + k];
      group_sq += sq[g * d.k + k];
    }
    // Without centering the "mean" is 0 and M2 the plain sum of squares, so that pooling (PoolExample) adds
    // nothing to it: the statistics are then mean 0 and var = <x^2>.
    mean[g] = centered ? shift[g * d.k] + group_sum / count : 0.0;
    m2[g] = centered ? std::max(0.0, group_sq - group_sum * (group_sum / count)) : group_sq;
  }
}

// Per-(n, c) floats of per-(n, g) statistics: hi, lo and 1 / std.
struct ChannelStatistics {
  std::vector<float> hi, lo, inv;
  void Resize(const Dims& d) {
    const int64_t size = d.n * d.channels();
    hi.resize(size);
    lo.resize(size);
    inv.resize(size);
  }
  void FillExample(const Dims& d, int64_t n, const float* mean, const float* std) {
    for (int64_t i = n * d.g; i < (n + 1) * d.g; ++i) {
      std::fill_n(hi.data() + i * d.k, d.k, mean[2 * i]);
      std::fill_n(lo.data() + i * d.k, d.k, mean[2 * i + 1]);
      std::fill_n(inv.data() + i * d.k, d.k, static_cast<float>(1.0 / std[i]));
    }
  }
  void Fill(const Dims& d, const float* mean, const float* std) {
    Resize(d);
    for (int64_t n = 0; n < d.n; ++n) FillExample(d, n, mean, std);
  }
};

// The statistics of example n from its slices' means and centered sums of squares (Chan's formula, slices in
// order). The inner loops run over the groups, along each slice's contiguous entries: group by group, striding
// over the slices, this took 19 us of a 130 us batch norm statistics call on (4096, 512).
template <typename F>
void PoolSlices(const Dims& d, const Tasks& tasks, int64_t n, const double* means, const double* m2s, F&& put) {
  const double count = static_cast<double>(d.s * d.k);
  const int64_t first = n * tasks.per_example;
  std::vector<double> sizes(tasks.per_example);  // elements per slice of each group
  for (int64_t p = 0; p < tasks.per_example; ++p) {
    const Slice slice = SliceOf(d, tasks, first + p);
    sizes[p] = static_cast<double>((slice.end - slice.begin) * d.k);
  }
  std::vector<double> mean(d.g, 0.0), m2(d.g, 0.0);
  for (int64_t p = 0; p < tasks.per_example; ++p) {
    const double* slice_mean = means + (first + p) * d.g;
    for (int64_t g = 0; g < d.g; ++g) mean[g] += sizes[p] * slice_mean[g];
  }
  for (int64_t g = 0; g < d.g; ++g) mean[g] /= count;
  for (int64_t p = 0; p < tasks.per_example; ++p) {
    const double *slice_mean = means + (first + p) * d.g, *slice_m2 = m2s + (first + p) * d.g;
    for (int64_t g = 0; g < d.g; ++g) {
      const double shift = slice_mean[g] - mean[g];
      m2[g] += slice_m2[g] + sizes[p] * shift * shift;
    }
  }
  for (int64_t g = 0; g < d.g; ++g) put(n * d.g + g, mean[g], m2[g] / count);
}

void PoolExample(const Dims& d, const Tasks& tasks, int64_t n, const double* means, const double* m2s, double eps,
                 Statistics out) {
  PoolSlices(d, tasks, n, means, m2s, [&](int64_t i, double mean, double var) {
    SetStatistics(mean, var, eps, out.mean + 2 * i, out.std + i, out.var + i);
  });
}

// y for the rows of one slice, from its example's per-channel hi, lo and 1 / std. Streamed output goes block by
// block (see StreamOutputs); otherwise row by row, while the same rows of example `ahead` (the thread's next task,
// or -1) are fetched into cache (see Prefetch).
template <typename T>
void SliceOutput(const Dims& d, const T* x, const Affine& affine, T* y, const Slice& slice, const float* h,
                 const float* l, const float* r, int64_t ahead, bool stream) {
  const int64_t C = d.channels();
  for (int64_t first = slice.begin; first < slice.end; first += kBlockRows) {
    const int64_t last = std::min(slice.end, first + kBlockRows);
    if (ahead >= 0 && !stream) Prefetch(x + (ahead * d.s + first) * C, (last - first) * C * sizeof(T));
    const T* rows = x + (slice.n * d.s + first) * C;
    T* results = y + (slice.n * d.s + first) * C;
    if (stream) {
      if constexpr (std::is_same_v<T, float>) StreamOutputs(rows, results, last - first, d, affine, h, l, r);
      continue;
    }
    for (int64_t s = 0; s < last - first; ++s) {
      const T* row = rows + s * C;
      T* result = results + s * C;
      if (affine.per_group()) {
        for (int64_t g = 0; g < d.g; ++g) {
          const int64_t c0 = g * d.k;
          const float hg = h[c0], lg = l[c0], rg = r[c0], sg = affine.scale[g], bg = affine.bias[g];
#pragma omp simd
          for (int64_t k = c0; k < c0 + d.k; ++k) Store(result, k, OutputOf(Load(row, k), hg, lg, rg, sg, bg));
        }
      } else {
        const float *sc = affine.scale, *bi = affine.bias;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) Store(result, c, OutputOf(Load(row, c), h[c], l[c], r[c], sc[c], bi[c]));
      }
    }
  }
  if (stream) StreamFence();
}

template <typename T>
void PlanesForward(ffi::ThreadPool& pool, const Dims& d, const T* x, const Affine& affine, T* y, Statistics out,
                   double eps, bool centered) {
  const int64_t C = d.channels();
  const Tasks tasks = PlaneTasks(d, pool);
  std::vector<double> means(tasks.count * d.g), m2s(tasks.count * d.g);
  ChannelStatistics stats;
  stats.Resize(d);
  const bool stream = Streams(y, d.n * d.example(), C);
  // One task per example: its statistics and y at once, while the example is in cache.
  const bool whole = tasks.per_example == 1;
  Parallel::For(pool, tasks.count, [&](int64_t t, int64_t next) {
    SliceScratch scratch;
    const Slice slice = SliceOf(d, tasks, t);
    SliceMoments(d, x, slice, centered, means.data() + t * d.g, m2s.data() + t * d.g, scratch);
    if (whole) {
      PoolExample(d, tasks, slice.n, means.data(), m2s.data(), eps, out);
      stats.FillExample(d, slice.n, out.mean, out.std);
      const int64_t o = slice.n * C;
      SliceOutput(d, x, affine, y, slice, stats.hi.data() + o, stats.lo.data() + o, stats.inv.data() + o, next, stream);
    }
  });
  if (whole) return;
  for (int64_t n = 0; n < d.n; ++n) {
    PoolExample(d, tasks, n, means.data(), m2s.data(), eps, out);
    stats.FillExample(d, n, out.mean, out.std);
  }
  Parallel::For(pool, tasks.count, [&](int64_t t, int64_t) {
    const Slice slice = SliceOf(d, tasks, t);
    const int64_t o = slice.n * C;
    SliceOutput(d, x, affine, y, slice, stats.hi.data() + o, stats.lo.data() + o, stats.inv.data() + o, -1, stream);
  });
}

// ---- Statistics only (batch norm: XLA normalizes). ----
//
// Per example n, four rows of G floats: hi and lo of mean * scale, var * scale^2 and scale, a power of two, 1
// unless the variance leaves [2^-100, 2^100] (then var * scale^2 is in [1/4, 1)), so that the squares XLA forms
// from them stay in float32's range. Slices of kStatisticsElements, so that a slice stays in L2 across its
// channel chunks.
constexpr int64_t kStatisticsElements = int64_t{1} << 17;

void SetScaled(double mean, double var, float* out, int64_t stride) {
  double scale = 1.0;
  if (!(var >= 0x1p-100 && var <= 0x1p100) && var > 0 && std::isfinite(var)) {
    int exponent;
    std::frexp(std::sqrt(var), &exponent);
    scale = std::ldexp(1.0, -exponent);
  }
  const double scaled = mean * scale;
  const float hi = static_cast<float>(scaled);
  out[0] = hi;
  out[stride] = static_cast<float>(scaled - hi);
  out[2 * stride] = static_cast<float>(var * scale * scale);
  out[3 * stride] = static_cast<float>(scale);
}

template <typename T>
void PlanesStatistics(ffi::ThreadPool& pool, const Dims& d, const T* x, float* out) {
  const int64_t per = std::max<int64_t>(1, std::min((d.example() + kStatisticsElements - 1) / kStatisticsElements, d.s));
  const Tasks tasks{per, d.n * per};
  std::vector<double> means(tasks.count * d.g), m2s(tasks.count * d.g);
  const auto slice = [&](int64_t t, int64_t) {
    SliceScratch scratch;
    SliceMoments(d, x, SliceOf(d, tasks, t), true, means.data() + t * d.g, m2s.data() + t * d.g, scratch);
  };
  Parallel::For(pool, tasks.count, slice, d.n * d.example() <= kAloneElements);
  for (int64_t n = 0; n < d.n; ++n) {
    PoolSlices(d, tasks, n, means.data(), m2s.data(), [&](int64_t i, double mean, double var) {
      SetScaled(mean, var, out + 4 * n * d.g + (i - n * d.g), d.g);
    });
  }
}

// dscale and dbias: the per-task sums in task order.
void Totals(const Dims& d, const Tasks& tasks, const std::vector<double>& partial, int64_t stride, int64_t params,
            double* dscale, double* dbias) {
  for (int64_t t = 0; t < tasks.count; ++t) {
    for (int64_t p = 0; p < params; ++p) {
      dscale[p] += partial[t * stride + 2 * d.g + p];
      dbias[p] += partial[t * stride + 2 * d.g + params + p];
    }
  }
}

// The backward pass's per-channel sums of dy and dy * xhat (see kFloatBlock) for one chunk of C channels (see
// kRegisterChannels) over `count` rows `stride` apart. With frozen statistics (kWritesDx: batch norm in eval mode)
// dx = scale dy / std needs no sums, so the same pass writes it to `results` (GradientOf with a = b = 0, the value
// the two-pass path writes).
template <int64_t C, bool kWritesDx, typename T, typename U>
void SumGradientChunk(const T* rows, const U* grads, T* results, int64_t count, int64_t stride, const float* h,
                      const float* l, const float* r, const float* scale, double* sum_dy, double* sum_dyx) {
  float hc[C], lc[C], rc[C], sc[C];
  for (int64_t j = 0; j < C; ++j) hc[j] = h[j], lc[j] = l[j], rc[j] = r[j], sc[j] = kWritesDx ? scale[j] : 0.0f;
  double total_dy[C] = {}, total_dyx[C] = {};
  for (int64_t first = 0; first < count; first += kFloatBlock) {
    float block_dy[C] = {}, block_dyx[C] = {};
    for (int64_t s = first; s < std::min(count, first + kFloatBlock); ++s) {
      const T* row = rows + s * stride;
      const U* grad = grads + s * stride;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const float v = Load(row, j), gr = Load(grad, j);
        block_dy[j] += gr;
        block_dyx[j] += gr * XhatOf(v, hc[j], lc[j], rc[j]);
        if constexpr (kWritesDx) Store(results + s * stride, j, GradientOf(v, gr, hc[j], lc[j], rc[j], sc[j], 0, 0));
      }
    }
    for (int64_t j = 0; j < C; ++j) total_dy[j] += block_dy[j], total_dyx[j] += block_dyx[j];
  }
  for (int64_t j = 0; j < C; ++j) sum_dy[j] += total_dy[j], sum_dyx[j] += total_dyx[j];
}

// Reverse mode over planes: per task, the sums of g = dy * scale and g * xhat per group, and of dy * xhat and dy
// per scale entry; pooled in task order; then dx = (g - <g> - xhat <g xhat>) / std.
template <typename T, typename U>
void PlanesBackward(ffi::ThreadPool& pool, const Dims& d, const T* x, const float* mean, const float* std,
                    const Affine& affine, const U* dy, T* dx, double* dscale, double* dbias, const double* shifts,
                    bool centered, bool frozen) {
  const int64_t C = d.channels(), count = d.s * d.k, params = affine.per_group() ? d.g : C;
  const Tasks tasks = PlaneTasks(d, pool);
  ChannelStatistics stats;
  stats.Fill(d, mean, std);
  const bool stream = Streams(dx, d.n * d.example(), C);
  // Per task: [sum g, sum g xhat] per group, then [sum dy xhat, sum dy] per scale entry.
  const int64_t stride = 2 * d.g + 2 * params;
  std::vector<double> partial(tasks.count * stride, 0.0);
  std::vector<float> a(d.n * C), b(d.n * C);  // 0 where frozen
  // Per channel of example n: <g> and <g xhat> of its group, from its slices' sums in order.
  auto coefficients = [&](int64_t n) {
    for (int64_t g = 0; g < d.g; ++g) {
      double total_g = 0.0, total_gx = 0.0;
      for (int64_t t = n * tasks.per_example; t < (n + 1) * tasks.per_example; ++t) {
        total_g += partial[t * stride + g];
        total_gx += partial[t * stride + d.g + g];
      }
      const double* shift = shifts + 2 * (n * d.g + g);
      const float ag = centered ? static_cast<float>(total_g / count - shift[0]) : 0.0f;
      std::fill_n(a.data() + (n * d.g + g) * d.k, d.k, ag);
      std::fill_n(b.data() + (n * d.g + g) * d.k, d.k, static_cast<float>(total_gx / count - shift[1]));
    }
  };
  // dx of one slice; unless it streams, the same rows of example `ahead` (or -1) are fetched into cache meanwhile.
  auto slice_dx = [&](const Slice& slice, int64_t ahead) {
    const int64_t o = slice.n * C;
    const float *h = stats.hi.data() + o, *l = stats.lo.data() + o, *r = stats.inv.data() + o;
    const float *an = a.data() + o, *bn = b.data() + o;
    for (int64_t first = slice.begin; first < slice.end; first += kBlockRows) {
      const int64_t last = std::min(slice.end, first + kBlockRows);
      if (ahead >= 0 && !stream) {
        Prefetch(x + (ahead * d.s + first) * C, (last - first) * C * sizeof(T));
        Prefetch(dy + (ahead * d.s + first) * C, (last - first) * C * sizeof(U));
      }
      const T* rows = x + (slice.n * d.s + first) * C;
      const U* grads = dy + (slice.n * d.s + first) * C;
      T* results = dx + (slice.n * d.s + first) * C;
      if (stream) {
        if constexpr (std::is_same_v<T, float>) {
          StreamGradients(rows, grads, results, last - first, d, affine, h, l, r, an, bn);
        }
        continue;
      }
      for (int64_t s = 0; s < last - first; ++s) {
        const T* row = rows + s * C;
        const U* grad = grads + s * C;
        T* result = results + s * C;
        if (affine.per_group()) {
          for (int64_t g = 0; g < d.g; ++g) {
            const int64_t c0 = g * d.k;
            const float hg = h[c0], lg = l[c0], rg = r[c0], sg = affine.scale[g], ag = an[c0], bg = bn[c0];
#pragma omp simd
            for (int64_t k = c0; k < c0 + d.k; ++k) {
              Store(result, k, GradientOf(Load(row, k), Load(grad, k), hg, lg, rg, sg, ag, bg));
            }
          }
        } else {
          const float* sc = affine.scale;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            Store(result, c, GradientOf(Load(row, c), Load(grad, c), h[c], l[c], r[c], sc[c], an[c], bn[c]));
          }
        }
      }
    }
    if (stream) StreamFence();
  };
  // One task per example: dx right after the example's sums, while it is in cache. Frozen statistics need no
  // sums for dx, so each task writes its own: per channel in the sums' pass (SumGradientChunk: on 64x32x32x64,
  // eval-mode training steps took 0.80-0.84x the time of a second pass over each slice in bfloat16, 0.62-0.68x in
  // float32, where that pass streamed dx around the cache), per group right after its sums.
  const bool whole = tasks.per_example == 1;
  const bool dx_in_task = whole || frozen, dx_in_sums = frozen && !affine.per_group();
  Parallel::For(pool, tasks.count, [&](int64_t t, int64_t next) {
    const Slice slice = SliceOf(d, tasks, t);
    double* sum_g = partial.data() + t * stride;
    double* sum_gx = sum_g + d.g;
    double* sum_dyx = sum_gx + d.g;
    double* sum_dy = sum_dyx + params;
    const int64_t o = slice.n * C;
    const float *h = stats.hi.data() + o, *l = stats.lo.data() + o, *r = stats.inv.data() + o;
    if (affine.per_group()) {
      for (int64_t s = slice.begin; s < slice.end; ++s) {
        const T* row = x + (slice.n * d.s + s) * C;
        const U* grad = dy + (slice.n * d.s + s) * C;
        for (int64_t g = 0; g < d.g; ++g) {
          const int64_t c0 = g * d.k;
          const float hg = h[c0], lg = l[c0], rg = r[c0];
          double dy_sum = 0.0, dyx_sum = 0.0;
#pragma omp simd reduction(+ : dy_sum, dyx_sum)
          for (int64_t k = 0; k < d.k; ++k) {
            const float gr = Load(grad, c0 + k);
            dy_sum += gr;
            dyx_sum += gr * ((Load(row, c0 + k) - hg - lg) * rg);
          }
          sum_dy[g] += dy_sum;
          sum_dyx[g] += dyx_sum;
        }
      }
    } else {
      const int64_t first = (slice.n * d.s + slice.begin) * C;
      ForChannelChunks(C, [&](auto width, int64_t c0) {
        constexpr int64_t W = decltype(width)::value;
        const auto chunk = dx_in_sums ? SumGradientChunk<W, true, T, U> : SumGradientChunk<W, false, T, U>;
        chunk(x + first + c0, dy + first + c0, dx + first + c0, slice.end - slice.begin, C, h + c0, l + c0, r + c0,
              affine.scale + c0, sum_dy + c0, sum_dyx + c0);
      });
    }
    const int64_t group_entries = affine.per_group() ? 1 : d.k;  // scale entries per group
    for (int64_t g = 0; g < d.g; ++g) {
      for (int64_t p = g * group_entries; p < (g + 1) * group_entries; ++p) {
        sum_g[g] += affine.scale[p] * sum_dy[p];
        sum_gx[g] += affine.scale[p] * sum_dyx[p];
      }
    }
    if (!frozen && whole) coefficients(slice.n);  // frozen: a = b = 0
    if (dx_in_task && !dx_in_sums) slice_dx(slice, whole ? next : -1);
  });
  Totals(d, tasks, partial, stride, params, dscale, dbias);
  if (dx_in_task) return;
  for (int64_t n = 0; n < d.n; ++n) coefficients(n);
  Parallel::For(pool, tasks.count, [&](int64_t t, int64_t) { slice_dx(SliceOf(d, tasks, t), -1); });
}

// ---- Normalization with given per-feature terms (batch norm's: XLA computes them from the statistics). ----
//
// y = ((x - m) - o) * a + b (TermOf), rounded once to x's dtype, with x as (P, R, C, K) and one entry of each term
// per (p, c), constant along K (P > 1 under vmap: one set of terms per mapped example). The multiply-add is fused,
// as in XLA's elementwise code for the same formula, which gives the same bits. Lines of work: rows of C channels
// (K = 1), or runs of K elements of one channel; tasks of about 64K elements.
struct Terms {
  const float *m, *o, *a, *b;
};

inline float TermOf(float v, float m, float o, float a, float b) { return std::fma((v - m) - o, a, b); }

// Rows [begin, end) of C channels, row i with the terms of example i / R.
template <typename T>
void TermRows(const T* x, const Terms& t, T* y, int64_t begin, int64_t end, int64_t R, int64_t C) {
  for (int64_t i = begin; i < end;) {
    const int64_t e = i / R * C, stop = std::min(end, (i / R + 1) * R);
    const float *m = t.m + e, *o = t.o + e, *a = t.a + e, *b = t.b + e;
    for (; i < stop; ++i) {
      const T* in = x + i * C;
      T* out = y + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) Store(out, c, TermOf(Load(in, c), m[c], o[c], a[c], b[c]));
    }
  }
}

// Runs [begin, end) of K elements, run i with the entry (i / (R * C), i % C).
template <typename T>
void TermRuns(const T* x, const Terms& t, T* y, int64_t begin, int64_t end, int64_t R, int64_t C, int64_t K) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t e = i / (R * C) * C + i % C;
    const float m = t.m[e], o = t.o[e], a = t.a[e], b = t.b[e];
    const T* in = x + i * K;
    T* out = y + i * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) Store(out, k, TermOf(Load(in, k), m, o, a, b));
  }
}

template <typename T>
void ApplyTerms(ffi::ThreadPool& pool, const T* x, const Terms& terms, T* y, int64_t P, int64_t R, int64_t C, int64_t K) {
  const int64_t line = K == 1 ? C : K, lines = P * R * (K == 1 ? 1 : C);
  const int64_t per_task = std::max<int64_t>(1, 65536 / line), tasks = (lines + per_task - 1) / per_task;
  const auto lines_of = [&](int64_t t, int64_t) {
    const int64_t begin = t * per_task, end = std::min(lines, begin + per_task);
    if (K == 1) {
      TermRows(x, terms, y, begin, end, R, C);
    } else {
      TermRuns(x, terms, y, begin, end, R, C, K);
    }
  };
  Parallel::For(pool, tasks, lines_of, P * R * C * K <= kAloneElements);
}

// ---- Entry points. ----

// x comes in its own shape (a reshape would cost XLA a copy for bfloat16); its view is given as attributes.
std::optional<Dims> DimsOf(const ffi::AnyBuffer& x, int64_t n, int64_t s, int64_t g, int64_t k) {
  if (n < 0 || s < 1 || g < 1 || k < 1 || n * s * g * k != static_cast<int64_t>(x.element_count())) return {};
  return Dims{n, s, g, k};
}

// Scale and bias come with one entry per run of elements within each group's K (see Affine): C entries (per
// channel), G (per group) or in between, each run dividing K. Where the kernels do not take the given run, the
// entries are expanded to channels (and dscale, dbias folded back).
bool ValidEntries(const Dims& d, int64_t size) {
  return size > 0 && d.channels() % size == 0 && d.k % (d.channels() / size) == 0;
}

// The runs the loops take as given: per channel anywhere; on planes, per group of long runs; on rows, per group or
// per part of a row of 16 elements or more.
bool TakesRun(const Dims& d, int64_t run) {
  if (run == 1) return true;
  if (d.s > 1) return run == d.k && d.k >= 16;
  return run == d.k || run >= 16;
}

struct Parameters {
  Affine affine;
  std::vector<float> scale, bias;
  int64_t given_run;  // the run of the entries as given; affine.run is 1 where they were expanded to channels

  Parameters(const Dims& d, const float* scale_in, const float* bias_in, int64_t size)
      : given_run(d.channels() / size) {
    affine = Affine{scale_in, bias_in, given_run};
    if (!TakesRun(d, given_run)) {
      scale.resize(d.channels());
      bias.resize(d.channels());
      for (int64_t c = 0; c < d.channels(); ++c) scale[c] = scale_in[c / given_run], bias[c] = bias_in[c / given_run];
      affine = Affine{scale.data(), bias.data(), 1};
    }
  }
};

template <typename T>
void Forward(ffi::ThreadPool& pool, const Dims& d, const T* x, const float* scale, const float* bias, int64_t size,
             T* y, Statistics out, double eps, bool centered) {
  const Parameters params(d, scale, bias, size);
  if (d.s == 1) {
    RowsForward(pool, d, x, params.affine, y, out, eps, centered);
  } else {
    PlanesForward(pool, d, x, params.affine, y, out, eps, centered);
  }
}

// The cotangents of the statistics' outputs, per (n, g): mean (0 without centering) and variance.
struct StatisticsGrads {
  const float* mean;
  const float* var;
};

// Their part of dx, dmean / count + 2 (x - mean) dvar / count = (std dmean / count + xhat 2 std^2 dvar / count) / std,
// as shifts of a and b in GradientOf, per (n, g).
std::vector<double> GradientShifts(const Dims& d, const float* std, StatisticsGrads grads, bool centered) {
  const double count = static_cast<double>(d.s * d.k);
  std::vector<double> shifts(2 * d.n * d.g);
  for (int64_t i = 0; i < d.n * d.g; ++i) {
    const double sd = std[i];
    shifts[2 * i] = centered ? sd * grads.mean[i] / count : 0.0;
    shifts[2 * i + 1] = 2.0 * sd * sd * grads.var[i] / count;
  }
  return shifts;
}

// dx, dscale and dbias from dy and the statistics' cotangents. Frozen: the statistics are constants (batch norm in
// eval mode), so dx = scale dy / std, without the sums' terms, and the statistics have no cotangents.
template <typename T, typename U>
void Backward(ffi::ThreadPool& pool, const Dims& d, const T* x, const float* mean, const float* std,
              const float* scale, int64_t size, const U* dy, StatisticsGrads grads, T* dx, float* dscale, float* dbias,
              bool centered, bool frozen) {
  const Parameters params(d, scale, scale, size);  // the bias plays no part in reverse mode
  const int64_t entries = d.channels() / params.affine.run;
  std::vector<double> ds(entries, 0.0), db(entries, 0.0);
  const std::vector<double> shifts = GradientShifts(d, std, grads, centered);
  if (d.s == 1) {
    RowsBackward(pool, d, x, mean, std, params.affine, dy, dx, ds.data(), db.data(), shifts.data(), centered, frozen);
  } else {
    PlanesBackward(pool, d, x, mean, std, params.affine, dy, dx, ds.data(), db.data(), shifts.data(), centered,
                   frozen);
  }
  std::vector<double> fs(size, 0.0), fb(size, 0.0);
  for (int64_t e = 0; e < entries; ++e) {
    const int64_t p = e * params.affine.run / params.given_run;
    fs[p] += ds[e];
    fb[p] += db[e];
  }
  for (int64_t p = 0; p < size; ++p) {
    dscale[p] = static_cast<float>(fs[p]);
    dbias[p] = static_cast<float>(fb[p]);
  }
}

bool IsF32(const ffi::AnyBuffer& b) { return b.element_type() == ffi::DataType::F32; }
bool IsBF16(const ffi::AnyBuffer& b) { return b.element_type() == ffi::DataType::BF16; }

ffi::Error ForwardHandler(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                          ffi::Buffer<ffi::F32> bias, float eps, bool centered, int64_t n, int64_t s, int64_t g,
                          int64_t k, ffi::Result<ffi::AnyBuffer> y,
                          ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> std,
                          ffi::ResultBuffer<ffi::F32> var) {
  const std::optional<Dims> view = DimsOf(x, n, s, g, k);
  if (!view) return ffi::Error::InvalidArgument("jbn: the view (n, s, g, k) does not match x's size");
  const Dims d = *view;
  const Statistics out{mean->typed_data(), std->typed_data(), var->typed_data()};
  const int64_t size = static_cast<int64_t>(scale.element_count());
  if (!ValidEntries(d, size) || static_cast<int64_t>(bias.element_count()) != size) {
    return ffi::Error::InvalidArgument("jbn: scale and bias need one entry per run of elements dividing K");
  }
  if (x.element_type() != y->element_type()) return ffi::Error::InvalidArgument("jbn: x and y dtypes differ");
  if (IsF32(x)) {
    Forward(pool, d, x.typed_data<float>(), scale.typed_data(), bias.typed_data(), size, y->typed_data<float>(),
            out, eps, centered);
  } else if (IsBF16(x)) {
    Forward(pool, d, reinterpret_cast<const uint16_t*>(x.untyped_data()), scale.typed_data(), bias.typed_data(),
            size, reinterpret_cast<uint16_t*>(y->untyped_data()), out, eps, centered);
  } else {
    return ffi::Error::InvalidArgument("jbn: x must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error BackwardFor(ffi::ThreadPool& pool, const Dims& d, const ffi::AnyBuffer& x, const float* mean,
                       const float* std, const float* scale, int64_t size, const ffi::AnyBuffer& dy,
                       StatisticsGrads grads, ffi::AnyBuffer& dx, float* dscale, float* dbias, bool centered,
                       bool frozen) {
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  T* dxp = reinterpret_cast<T*>(dx.untyped_data());
  if (IsF32(dy)) {
    Backward(pool, d, xp, mean, std, scale, size, dy.typed_data<float>(), grads, dxp, dscale, dbias, centered, frozen);
  } else if (IsBF16(dy)) {
    Backward(pool, d, xp, mean, std, scale, size, reinterpret_cast<const uint16_t*>(dy.untyped_data()), grads, dxp,
             dscale, dbias, centered, frozen);
  } else {
    return ffi::Error::InvalidArgument("jbn: dy must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error BackwardHandler(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean,
                           ffi::Buffer<ffi::F32> std, ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer dy,
                           ffi::Buffer<ffi::F32> dmean, ffi::Buffer<ffi::F32> dvar, bool centered, bool frozen,
                           int64_t n, int64_t s, int64_t g, int64_t k, ffi::Result<ffi::AnyBuffer> dx,
                           ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias) {
  const std::optional<Dims> view = DimsOf(x, n, s, g, k);
  if (!view) return ffi::Error::InvalidArgument("jbn: the view (n, s, g, k) does not match x's size");
  const Dims d = *view;
  if (x.element_type() != dx->element_type()) return ffi::Error::InvalidArgument("jbn: x and dx dtypes differ");
  const int64_t size = static_cast<int64_t>(scale.element_count());
  if (!ValidEntries(d, size)) {
    return ffi::Error::InvalidArgument("jbn: scale needs one entry per run of elements dividing K");
  }
  const auto groups = static_cast<size_t>(d.n * d.g);
  if (dmean.element_count() != groups || dvar.element_count() != groups) {
    return ffi::Error::InvalidArgument("jbn: dmean and dvar need one entry per (n, g)");
  }
  const StatisticsGrads grads{dmean.typed_data(), dvar.typed_data()};
  if (IsF32(x)) {
    return BackwardFor<float>(pool, d, x, mean.typed_data(), std.typed_data(), scale.typed_data(), size, dy, grads,
                              *dx, dscale->typed_data(), dbias->typed_data(), centered, frozen);
  }
  if (IsBF16(x)) {
    return BackwardFor<uint16_t>(pool, d, x, mean.typed_data(), std.typed_data(), scale.typed_data(), size, dy,
                                 grads, *dx, dscale->typed_data(), dbias->typed_data(), centered, frozen);
  }
  return ffi::Error::InvalidArgument("jbn: x must be float32 or bfloat16");
}

// The view's n is x's size over s * g * k, so that a batch (vmap) in front of x adds examples.
ffi::Error StatisticsHandler(ffi::ThreadPool pool, ffi::AnyBuffer x, int64_t s, int64_t g, int64_t k,
                             ffi::ResultBuffer<ffi::F32> out) {
  const int64_t example = s * g * k, size = static_cast<int64_t>(x.element_count());
  if (s < 1 || g < 1 || k < 1 || size % example != 0) {
    return ffi::Error::InvalidArgument("jbn: the view (s, g, k) does not divide x's size");
  }
  const Dims d{size / example, s, g, k};
  if (static_cast<int64_t>(out->element_count()) != 4 * d.n * d.g) {
    return ffi::Error::InvalidArgument("jbn: the statistics need 4 floats per (n, g)");
  }
  if (IsF32(x)) {
    PlanesStatistics(pool, d, x.typed_data<float>(), out->typed_data());
  } else if (IsBF16(x)) {
    PlanesStatistics(pool, d, reinterpret_cast<const uint16_t*>(x.untyped_data()), out->typed_data());
  } else {
    return ffi::Error::InvalidArgument("jbn: x must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

// The terms have P * C entries each; x's size is P * R * C * K.
ffi::Error AffineHandler(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> o,
                         ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, int64_t c, int64_t k,
                         ffi::Result<ffi::AnyBuffer> y) {
  const int64_t terms = static_cast<int64_t>(m.element_count()), size = static_cast<int64_t>(x.element_count());
  for (const auto* term : {&o, &a, &b}) {
    if (static_cast<int64_t>(term->element_count()) != terms) {
      return ffi::Error::InvalidArgument("jbn: the per-feature terms differ in size");
    }
  }
  if (c < 1 || k < 1 || terms % c != 0 || size % (terms * k) != 0) {
    return ffi::Error::InvalidArgument("jbn: the view (c, k) does not match x and the terms");
  }
  if (x.element_type() != y->element_type()) return ffi::Error::InvalidArgument("jbn: x and y dtypes differ");
  const int64_t P = terms / c, R = size / (terms * k);
  const Terms given{m.typed_data(), o.typed_data(), a.typed_data(), b.typed_data()};
  if (IsF32(x)) {
    ApplyTerms(pool, x.typed_data<float>(), given, y->typed_data<float>(), P, R, c, k);
  } else if (IsBF16(x)) {
    ApplyTerms(pool, reinterpret_cast<const uint16_t*>(x.untyped_data()), given,
               reinterpret_cast<uint16_t*>(y->untyped_data()), P, R, c, k);
  } else {
    return ffi::Error::InvalidArgument("jbn: x must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbnNormForward, ForwardHandler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("centered")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("s")
                                  .Attr<int64_t>("g")
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbnNormBackward, BackwardHandler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("centered")
                                  .Attr<bool>("frozen")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("s")
                                  .Attr<int64_t>("g")
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbnNormStatistics, StatisticsHandler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("s")
                                  .Attr<int64_t>("g")
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbnNormAffine, AffineHandler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("c")
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::AnyBuffer>());
