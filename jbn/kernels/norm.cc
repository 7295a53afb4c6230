// Fused CPU kernels for layer, RMS, group and instance norm (XLA FFI), compiled by jbn/_kernel.py on first use.
//
// x is viewed as (N, S, G, K): statistics per (n, g) over S and K, scale and bias per channel c = g * K + k.
// Layer/RMS norm over the last axis is (rows, 1, 1, features); instance norm (N, H*W, C, 1); group norm
// (N, H*W, groups, C / groups); batch norm (1, N*H*W, C, 1) or, channels first, (1, N, C, H*W).
// Sums are taken in double, one pass per sum (the mean, then the centered squares), so the statistics are
// two-pass exact whatever the offset of the data. The mean is handed on as two floats, hi + lo, so that
// x - hi - lo keeps its precision. Work is split over examples, and over rows of S where there are few examples,
// on XLA's intra-op thread pool in a fixed partition: results do not depend on thread timing.
//
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
#include <vector>

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
  if (std::isnan(f)) {
    p[i] = static_cast<uint16_t>((bits >> 16) | 0x40);
  } else {
    p[i] = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
}

struct Dims {
  int64_t n, s, g, k;
  int64_t channels() const { return g * k; }
  int64_t example() const { return s * g * k; }
};

// Runs body(0 .. count-1) on the calling thread and the pool. The caller takes work too and only waits for
// items already started, so it never waits on a task the pool has not begun (no deadlock on a busy pool).
class Parallel {
 public:
  static void For(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> body) {
    if (count <= 0) return;
    auto work = std::make_shared<Parallel>(count, std::move(body));
    int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
    for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
    work->Run();
    std::unique_lock<std::mutex> lock(work->mutex_);
    work->finished_.wait(lock, [&] { return work->done_.load() == count; });
  }

  Parallel(int64_t count, std::function<void(int64_t)> body) : count_(count), body_(std::move(body)) {}

 private:
  void Run() {
    for (int64_t i = next_.fetch_add(1); i < count_; i = next_.fetch_add(1)) {
      body_(i);
      if (done_.fetch_add(1) + 1 == count_) {
        std::lock_guard<std::mutex> lock(mutex_);
        finished_.notify_all();
      }
    }
  }

  int64_t count_;
  std::function<void(int64_t)> body_;
  std::atomic<int64_t> next_{0}, done_{0};
  std::mutex mutex_;
  std::condition_variable finished_;
};

int64_t Workers(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads() + 1); }

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

// ---- Rows (S == 1): each (n, g) is one contiguous run of K elements, handled in registers. ----

// A fixed partition of the examples into chunks of about 64K elements, at most 8 per worker.
int64_t ChunkCount(const Dims& d, ffi::ThreadPool& pool) {
  int64_t by_size = std::max<int64_t>(1, d.n * d.example() / 65536);
  return std::max<int64_t>(1, std::min({d.n, by_size, 8 * Workers(pool)}));
}

inline int64_t Split(int64_t part, int64_t parts, int64_t total) { return total * part / parts; }

template <typename T>
void RowForward(const T* x, const float* scale, const float* bias, T* y, int64_t K, double eps, bool centered,
                float* mean_out, float* std_out, float* var_out) {
  double sum = 0.0, sq = 0.0;
  if (centered) {
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < K; ++k) sum += Load(x, k);
  }
  const double m = sum / K;
#pragma omp simd reduction(+ : sq)
  for (int64_t k = 0; k < K; ++k) {
    const double v = Load(x, k) - m;
    sq += v * v;
  }
  SetStatistics(m, sq / K, eps, mean_out, std_out, var_out);
  const float hi = mean_out[0], lo = mean_out[1], r = static_cast<float>(1.0 / std::sqrt(sq / K + eps));
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) Store(y, k, (Load(x, k) - hi - lo) * r * scale[k] + bias[k]);
}

// dx of one row, and its dy * xhat and dy added to dscale and dbias.
template <typename T, typename U>
void RowBackward(const T* x, const float* mean, float std, const float* scale, const U* dy, T* dx, double* dscale,
                 double* dbias, int64_t K, bool centered) {
  const float hi = mean[0], lo = mean[1], r = static_cast<float>(1.0 / std);
  double sum_g = 0.0, sum_gx = 0.0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
  for (int64_t k = 0; k < K; ++k) {
    const float grad = Load(dy, k);
    const float xhat = (Load(x, k) - hi - lo) * r;
    const float gs = grad * scale[k];
    sum_g += gs;
    sum_gx += gs * xhat;
    dscale[k] += grad * xhat;
    dbias[k] += grad;
  }
  const float a = centered ? static_cast<float>(sum_g / K) : 0.0f, b = static_cast<float>(sum_gx / K);
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    const float xhat = (Load(x, k) - hi - lo) * r;
    Store(dx, k, r * (Load(dy, k) * scale[k] - a - xhat * b));
  }
}

template <typename T>
void RowsForward(ffi::ThreadPool& pool, const Dims& d, const T* x, const float* scale, const float* bias, T* y,
                 Statistics out, double eps, bool centered) {
  const int64_t chunks = ChunkCount(d, pool), rows = d.n * d.g;
  Parallel::For(pool, chunks, [&, chunks](int64_t chunk) {
    for (int64_t i = Split(chunk, chunks, rows); i < Split(chunk + 1, chunks, rows); ++i) {
      const int64_t c0 = (i % d.g) * d.k;
      RowForward(x + i * d.k, scale + c0, bias + c0, y + i * d.k, d.k, eps, centered, out.mean + 2 * i,
                 out.std + i, out.var + i);
    }
  });
}

template <typename T, typename U>
void RowsBackward(ffi::ThreadPool& pool, const Dims& d, const T* x, const float* mean, const float* std,
                  const float* scale, const U* dy, T* dx, double* dscale, double* dbias, bool centered) {
  const int64_t chunks = ChunkCount(d, pool), rows = d.n * d.g, C = d.channels();
  std::vector<double> partial(2 * C * chunks, 0.0);
  Parallel::For(pool, chunks, [&, chunks](int64_t chunk) {
    double* ds = partial.data() + 2 * C * chunk;
    for (int64_t i = Split(chunk, chunks, rows); i < Split(chunk + 1, chunks, rows); ++i) {
      const int64_t c0 = (i % d.g) * d.k;
      RowBackward(x + i * d.k, mean + 2 * i, std[i], scale + c0, dy + i * d.k, dx + i * d.k, ds + c0,
                  ds + C + c0, d.k, centered);
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t c = 0; c < C; ++c) {
      dscale[c] += partial[2 * C * chunk + c];
      dbias[c] += partial[2 * C * chunk + C + c];
    }
  }
}

// ---- Planes (S > 1): rows of C channels; sums per channel over rows, split into tasks (example, run of rows). ----

struct Tasks {
  int64_t per_example, count;
};

// Enough tasks to keep every worker busy when there are few examples (batch norm has one), none under 16K elements.
Tasks PlaneTasks(const Dims& d, ffi::ThreadPool& pool) {
  const int64_t wanted = 4 * Workers(pool);
  int64_t per = d.n >= wanted ? 1 : (wanted + d.n - 1) / d.n;
  per = std::max<int64_t>(1, std::min({per, d.s, d.example() / 16384}));
  return Tasks{per, d.n * per};
}

// Calls row(n, s) for the rows of task t.
template <typename F>
void ForRows(const Dims& d, const Tasks& tasks, int64_t t, F&& row) {
  const int64_t n = t / tasks.per_example, part = t % tasks.per_example;
  for (int64_t s = Split(part, tasks.per_example, d.s); s < Split(part + 1, tasks.per_example, d.s); ++s) row(n, s);
}

// Per-(n, g) totals of per-task, per-channel partial sums, in a fixed order.
void GroupTotals(const Dims& d, const Tasks& tasks, const std::vector<double>& partial, int64_t stride,
                 int64_t offset, std::vector<double>& totals) {
  const int64_t C = d.channels();
  totals.assign(d.n * d.g, 0.0);
  for (int64_t t = 0; t < tasks.count; ++t) {
    const int64_t n = t / tasks.per_example;
    for (int64_t c = 0; c < C; ++c) totals[n * d.g + c / d.k] += partial[t * stride + offset + c];
  }
}

// Per-(n, c) float copies of per-(n, g) values.
void PerChannel(const Dims& d, const float* values, int64_t stride, bool invert, std::vector<float>& out) {
  out.resize(d.n * d.channels());
  for (int64_t i = 0; i < d.n * d.g; ++i) {
    const float v = invert ? static_cast<float>(1.0 / values[i * stride]) : values[i * stride];
    std::fill_n(out.data() + i * d.k, d.k, v);
  }
}

template <typename T>
void PlanesForward(ffi::ThreadPool& pool, const Dims& d, const T* x, const float* scale, const float* bias, T* y,
                   Statistics out, double eps, bool centered) {
  const int64_t C = d.channels(), count = d.s * d.k;
  const Tasks tasks = PlaneTasks(d, pool);
  std::vector<double> partial(tasks.count * C), mean(d.n * d.g, 0.0), totals;
  if (centered) {
    Parallel::For(pool, tasks.count, [&](int64_t t) {
      double* sums = partial.data() + t * C;
      std::fill_n(sums, C, 0.0);
      ForRows(d, tasks, t, [&](int64_t n, int64_t s) {
        const T* row = x + (n * d.s + s) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sums[c] += Load(row, c);
      });
    });
    GroupTotals(d, tasks, partial, C, 0, totals);
    for (int64_t i = 0; i < d.n * d.g; ++i) mean[i] = totals[i] / count;
  }
  std::vector<double> channel_mean(d.n * C);
  for (int64_t i = 0; i < d.n * d.g; ++i) std::fill_n(channel_mean.data() + i * d.k, d.k, mean[i]);
  Parallel::For(pool, tasks.count, [&](int64_t t) {
    double* sums = partial.data() + t * C;
    std::fill_n(sums, C, 0.0);
    ForRows(d, tasks, t, [&](int64_t n, int64_t s) {
      const T* row = x + (n * d.s + s) * C;
      const double* m = channel_mean.data() + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double v = Load(row, c) - m[c];
        sums[c] += v * v;
      }
    });
  });
  GroupTotals(d, tasks, partial, C, 0, totals);
  for (int64_t i = 0; i < d.n * d.g; ++i) {
    SetStatistics(mean[i], totals[i] / count, eps, out.mean + 2 * i, out.std + i, out.var + i);
  }
  std::vector<float> hi, lo, inv;
  PerChannel(d, out.mean, 2, false, hi);
  PerChannel(d, out.mean + 1, 2, false, lo);
  PerChannel(d, out.std, 1, true, inv);
  Parallel::For(pool, tasks.count, [&](int64_t t) {
    ForRows(d, tasks, t, [&](int64_t n, int64_t s) {
      const T* row = x + (n * d.s + s) * C;
      T* result = y + (n * d.s + s) * C;
      const float *h = hi.data() + n * C, *l = lo.data() + n * C, *r = inv.data() + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) Store(result, c, (Load(row, c) - h[c] - l[c]) * r[c] * scale[c] + bias[c]);
    });
  });
}

template <typename T, typename U>
void PlanesBackward(ffi::ThreadPool& pool, const Dims& d, const T* x, const float* mean, const float* std,
                    const float* scale, const U* dy, T* dx, double* dscale, double* dbias, bool centered) {
  const int64_t C = d.channels(), count = d.s * d.k;
  const Tasks tasks = PlaneTasks(d, pool);
  std::vector<float> hi, lo, inv;
  PerChannel(d, mean, 2, false, hi);
  PerChannel(d, mean + 1, 2, false, lo);
  PerChannel(d, std, 1, true, inv);
  // Per task and channel: the sum of dy, then the sum of dy * xhat.
  std::vector<double> partial(tasks.count * 2 * C);
  Parallel::For(pool, tasks.count, [&](int64_t t) {
    double* sum_dy = partial.data() + t * 2 * C;
    double* sum_dy_xhat = sum_dy + C;
    std::fill_n(sum_dy, 2 * C, 0.0);
    ForRows(d, tasks, t, [&](int64_t n, int64_t s) {
      const T* row = x + (n * d.s + s) * C;
      const U* grad = dy + (n * d.s + s) * C;
      const float *h = hi.data() + n * C, *l = lo.data() + n * C, *r = inv.data() + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float g = Load(grad, c);
        sum_dy[c] += g;
        sum_dy_xhat[c] += g * ((Load(row, c) - h[c] - l[c]) * r[c]);
      }
    });
  });
  // Per example and channel totals, in task order; then dscale, dbias and the per-group means of g and g * xhat.
  std::vector<double> channel_dy(d.n * C, 0.0), channel_dy_xhat(d.n * C, 0.0);
  for (int64_t t = 0; t < tasks.count; ++t) {
    const int64_t n = t / tasks.per_example;
    for (int64_t c = 0; c < C; ++c) {
      channel_dy[n * C + c] += partial[t * 2 * C + c];
      channel_dy_xhat[n * C + c] += partial[t * 2 * C + C + c];
    }
  }
  std::vector<double> a(d.n * d.g, 0.0), b(d.n * d.g, 0.0);
  for (int64_t n = 0; n < d.n; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      dbias[c] += channel_dy[n * C + c];
      dscale[c] += channel_dy_xhat[n * C + c];
      a[n * d.g + c / d.k] += scale[c] * channel_dy[n * C + c];
      b[n * d.g + c / d.k] += scale[c] * channel_dy_xhat[n * C + c];
    }
  }
  std::vector<float> ca(d.n * C), cb(d.n * C);
  for (int64_t i = 0; i < d.n * d.g; ++i) {
    std::fill_n(ca.data() + i * d.k, d.k, centered ? static_cast<float>(a[i] / count) : 0.0f);
    std::fill_n(cb.data() + i * d.k, d.k, static_cast<float>(b[i] / count));
  }
  Parallel::For(pool, tasks.count, [&](int64_t t) {
    ForRows(d, tasks, t, [&](int64_t n, int64_t s) {
      const T* row = x + (n * d.s + s) * C;
      const U* grad = dy + (n * d.s + s) * C;
      T* result = dx + (n * d.s + s) * C;
      const float *h = hi.data() + n * C, *l = lo.data() + n * C, *r = inv.data() + n * C;
      const float *an = ca.data() + n * C, *bn = cb.data() + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float xhat = (Load(row, c) - h[c] - l[c]) * r[c];
        Store(result, c, r[c] * (Load(grad, c) * scale[c] - an[c] - xhat * bn[c]));
      }
    });
  });
}

// ---- Entry points. ----

Dims DimsOf(const ffi::AnyBuffer& x) {
  auto dims = x.dimensions();
  return Dims{dims[0], dims[1], dims[2], dims[3]};
}

template <typename T>
void Forward(ffi::ThreadPool& pool, const Dims& d, const T* x, const float* scale, const float* bias, T* y,
             Statistics out, double eps, bool centered) {
  if (d.s == 1) {
    RowsForward(pool, d, x, scale, bias, y, out, eps, centered);
  } else {
    PlanesForward(pool, d, x, scale, bias, y, out, eps, centered);
  }
}

template <typename T, typename U>
void Backward(ffi::ThreadPool& pool, const Dims& d, const T* x, const float* mean, const float* std,
              const float* scale, const U* dy, T* dx, float* dscale, float* dbias, bool centered) {
  const int64_t C = d.channels();
  std::vector<double> ds(C, 0.0), db(C, 0.0);
  if (d.s == 1) {
    RowsBackward(pool, d, x, mean, std, scale, dy, dx, ds.data(), db.data(), centered);
  } else {
    PlanesBackward(pool, d, x, mean, std, scale, dy, dx, ds.data(), db.data(), centered);
  }
  for (int64_t c = 0; c < C; ++c) {
    dscale[c] = static_cast<float>(ds[c]);
    dbias[c] = static_cast<float>(db[c]);
  }
}

bool IsF32(const ffi::AnyBuffer& b) { return b.element_type() == ffi::DataType::F32; }
bool IsBF16(const ffi::AnyBuffer& b) { return b.element_type() == ffi::DataType::BF16; }

ffi::Error ForwardHandler(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                          ffi::Buffer<ffi::F32> bias, float eps, bool centered, ffi::Result<ffi::AnyBuffer> y,
                          ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> std,
                          ffi::ResultBuffer<ffi::F32> var) {
  const Dims d = DimsOf(x);
  const Statistics out{mean->typed_data(), std->typed_data(), var->typed_data()};
  if (x.element_type() != y->element_type()) return ffi::Error::InvalidArgument("jbn: x and y dtypes differ");
  if (IsF32(x)) {
    Forward(pool, d, x.typed_data<float>(), scale.typed_data(), bias.typed_data(), y->typed_data<float>(), out,
            eps, centered);
  } else if (IsBF16(x)) {
    Forward(pool, d, reinterpret_cast<const uint16_t*>(x.untyped_data()), scale.typed_data(), bias.typed_data(),
            reinterpret_cast<uint16_t*>(y->untyped_data()), out, eps, centered);
  } else {
    return ffi::Error::InvalidArgument("jbn: x must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error BackwardFor(ffi::ThreadPool& pool, const Dims& d, const ffi::AnyBuffer& x, const float* mean,
                       const float* std, const float* scale, const ffi::AnyBuffer& dy, ffi::AnyBuffer& dx,
                       float* dscale, float* dbias, bool centered) {
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  T* dxp = reinterpret_cast<T*>(dx.untyped_data());
  if (IsF32(dy)) {
    Backward(pool, d, xp, mean, std, scale, dy.typed_data<float>(), dxp, dscale, dbias, centered);
  } else if (IsBF16(dy)) {
    Backward(pool, d, xp, mean, std, scale, reinterpret_cast<const uint16_t*>(dy.untyped_data()), dxp, dscale,
             dbias, centered);
  } else {
    return ffi::Error::InvalidArgument("jbn: dy must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error BackwardHandler(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean,
                           ffi::Buffer<ffi::F32> std, ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer dy, bool centered,
                           ffi::Result<ffi::AnyBuffer> dx, ffi::ResultBuffer<ffi::F32> dscale,
                           ffi::ResultBuffer<ffi::F32> dbias) {
  const Dims d = DimsOf(x);
  if (x.element_type() != dx->element_type()) return ffi::Error::InvalidArgument("jbn: x and dx dtypes differ");
  if (IsF32(x)) {
    return BackwardFor<float>(pool, d, x, mean.typed_data(), std.typed_data(), scale.typed_data(), dy, *dx,
                              dscale->typed_data(), dbias->typed_data(), centered);
  }
  if (IsBF16(x)) {
    return BackwardFor<uint16_t>(pool, d, x, mean.typed_data(), std.typed_data(), scale.typed_data(), dy, *dx,
                                 dscale->typed_data(), dbias->typed_data(), centered);
  }
  return ffi::Error::InvalidArgument("jbn: x must be float32 or bfloat16");
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
                                  .Attr<bool>("centered")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
