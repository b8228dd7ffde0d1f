// easympt's CPU matrix product for decode: y[M, N] = x[M, K] @ W, W packed as [ceil(N/48), K, 48].
//
// Why: a decode step multiplies a few rows (the batch) by every weight matrix once, so it is bound by
// reading the weights. XLA:CPU's small-M products read a [K, N] matrix at ~25 GB/s for one row and
// ~15 GB/s (62 GFLOP/s) for eight on a 2-core AVX-512 machine whose memory gives ~33 GB/s. With the
// weights packed in 48-column panels, each panel is one contiguous stream: this kernel reads it once
// for up to 8 rows at the memory bandwidth (measured: 0.29 ms for [8, 768] x [768, 3072], XLA 0.61).
//
// The kernel needs x86-64 with AVX-512F (EasymptCpuKernelSupported says so at run time); elsewhere
// easympt keeps XLA's dot and unpacked weights.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" int EasymptCpuKernelSupported();

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EASYMPT_X86 1
#endif

namespace {

#ifdef EASYMPT_X86
constexpr int64_t kPanel = 48;  // columns per packed panel: 3 AVX-512 vectors
constexpr int64_t kRows = 8;    // rows per register tile: 8 x 3 accumulators + 3 loads fit 32 zmm

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned 16-float loads and stores

// P adjacent panels for R rows: acc[m][j] += x[m, k] * panels[k, 16j : 16j + 16] over k (panel i's
// columns are j = 3i..3i+2). With one or two rows a single stream per thread left memory idle:
// reading P panels at once (P streams) measured ~15% faster; eight rows need every register.
template <int R, int P>
__attribute__((target("avx512f,fma"))) void PanelRows(const float* x, int64_t K, const float* panel, float* y,
                                                      int64_t N, int64_t n0) {
  constexpr int V = 3 * P;
  v16 acc[R][V];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < V; ++j) acc[m][j] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    v16 w[V];
    for (int i = 0; i < P; ++i)
      for (int j = 0; j < 3; ++j) w[3 * i + j] = *reinterpret_cast<const v16*>(panel + i * K * kPanel + k * kPanel + 16 * j);
    for (int m = 0; m < R; ++m) {
      const float xm = x[m * K + k];
      for (int j = 0; j < V; ++j) acc[m][j] += xm * w[j];
    }
  }
  const int64_t cols = std::min<int64_t>(P * kPanel, N - n0);
  for (int m = 0; m < R; ++m) {
    float* out = y + m * N + n0;
    if (cols == P * kPanel) {
      for (int j = 0; j < V; ++j) *reinterpret_cast<v16*>(out + 16 * j) = acc[m][j];
    } else {  // the last panel of a matrix whose N is not a multiple of 48
      float tmp[P * kPanel];
      std::memcpy(tmp, acc[m], sizeof(tmp));
      std::memcpy(out, tmp, cols * sizeof(float));
    }
  }
}

using PanelFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t);
constexpr PanelFn kOnePanel[kRows + 1] = {nullptr,           PanelRows<1, 1>, PanelRows<2, 1>,
                                          PanelRows<3, 1>, PanelRows<4, 1>, PanelRows<5, 1>,
                                          PanelRows<6, 1>, PanelRows<7, 1>, PanelRows<8, 1>};
constexpr int64_t kWide = 4;  // panels at once for one row, 2 for two rows

// Panels [begin, end) for every group of up to kRows rows (the panel is re-read from cache per group).
void Panels(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N, int64_t begin, int64_t end) {
  int64_t p = begin;
  if (M <= 2) {  // one row group: several panels at once
    const int64_t step = M == 1 ? kWide : kWide / 2;
    for (; p + step <= end; p += step) {
      (M == 1 ? PanelRows<1, kWide> : PanelRows<2, kWide / 2>)(x, K, w + p * K * kPanel, y, N, p * kPanel);
    }
  }
  for (; p < end; ++p) {
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const int64_t rows = std::min(kRows, M - m0);
      kOnePanel[rows](x + m0 * K, K, w + p * K * kPanel, y + m0 * N, N, p * kPanel);
    }
  }
}

// Work shared by the calling thread and the pool's: chunks of panels taken from an atomic counter.
// A helper that starts after the caller has finished finds no chunk and touches nothing but this
// state, which it co-owns; the caller returns once every chunk is done.
struct Shared {
  const float* x;
  const float* w;
  float* y;
  int64_t M, K, N, panels, chunk;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    const int64_t chunks = (panels + chunk - 1) / chunk;
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      Panels(x, M, K, w, y, N, c * chunk, std::min(panels, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kPanel || wd[1] != xd[1] || yd[0] != xd[0] ||
      (yd[1] + kPanel - 1) / kPanel != wd[0]) {
    return ffi::Error::InvalidArgument("easympt_packed_matmul: want x [M, K], w [ceil(N/48), K, 48], y [M, N]");
  }
  if (!EasymptCpuKernelSupported()) {
    return ffi::Error::Internal("easympt_packed_matmul needs AVX-512F");
  }
  auto s = std::make_shared<Shared>();
  s->x = x.typed_data();
  s->w = w.typed_data();
  s->y = y->typed_data();
  s->M = xd[0];
  s->K = xd[1];
  s->N = yd[1];
  s->panels = wd[0];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  s->chunk = std::max<int64_t>(1, s->panels / (4 * threads));  // a few chunks per thread evens out the finish
  const int64_t chunks = (s->panels + s->chunk - 1) / s->chunk;
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule([s] { s->Work(); });
  s->Work();
  while (s->done.load(std::memory_order_acquire) < chunks) {
    __builtin_ia32_pause();
  }
  return ffi::Error::Success();
}
#else
ffi::Error PackedMatmul(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::Internal("easympt_packed_matmul is built for x86-64 only");
}
#endif

}  // namespace

extern "C" int EasymptCpuKernelSupported() {
#ifdef EASYMPT_X86
  return __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EasymptPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
