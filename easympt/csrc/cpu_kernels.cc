// easympt's CPU kernels for inference, registered with XLA as FFI targets (easympt/cpu_kernels.py).
//
// easympt_packed_matmul: y[M, N] = x[M, K] @ W, W packed as [ceil(N/48), K, 48]. A decode step
// multiplies a few rows (the batch) by every weight matrix once, so it is bound by reading the
// weights. XLA:CPU's small-M products read a [K, N] matrix at ~25 GB/s for one row and ~15 GB/s
// (62 GFLOP/s) for eight on a 2-core AVX-512 machine whose memory gives ~30 GB/s. With the weights
// packed in 48-column panels, each panel is one contiguous stream, read once for up to 8 rows at
// about the memory bandwidth (measured: 0.29 ms for [8, 768] x [768, 3072], XLA 0.61).
//
// easympt_decode_attention: one query per row and head over the slots that row holds (see
// DecodeRow), so attention costs what rows hold rather than the cache's length.
//
// Both need x86-64 with AVX-512F (EasymptCpuKernelSupported says so at run time); elsewhere the
// library builds without them and easympt keeps XLA.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EASYMPT_X86 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" int EasymptCpuKernelSupported();

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

// fn(begin, end) over [0, count) in chunks, on the calling thread and the pool's. Chunks come from
// an atomic counter; a helper that starts after the caller has finished finds no chunk and touches
// nothing but this state, which it co-owns; the caller returns once every chunk is done.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, int64_t chunks_per_thread, Fn fn) {
  struct State {
    State(Fn f, int64_t n, int64_t c) : fn(std::move(f)), count(n), chunk(c), chunks((n + c - 1) / c) {}
    Fn fn;
    int64_t count, chunk, chunks;
    std::atomic<int64_t> next{0}, done{0};
    void Work() {
      for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
        fn(c * chunk, std::min(count, (c + 1) * chunk));
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto s = std::make_shared<State>(std::move(fn), count, std::max<int64_t>(1, count / (chunks_per_thread * threads)));
  for (int64_t t = 1; t < std::min(threads, s->chunks); ++t) pool.Schedule([s] { s->Work(); });
  s->Work();
  while (s->done.load(std::memory_order_acquire) < s->chunks) __builtin_ia32_pause();
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kPanel || wd[1] != xd[1] || yd[0] != xd[0] ||
      (yd[1] + kPanel - 1) / kPanel != wd[0]) {
    return ffi::Error::InvalidArgument("easympt_packed_matmul: want x [M, K], w [ceil(N/48), K, 48], y [M, N]");
  }
  if (!EasymptCpuKernelSupported()) return ffi::Error::Internal("easympt_packed_matmul needs AVX-512F");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  // a few chunks per thread even out the finish
  ParallelFor(pool, wd[0], 4, [=](int64_t begin, int64_t end) { Panels(xp, M, K, wp, yp, N, begin, end); });
  return ffi::Error::Success();
}

// exp(x) for x <= 0 (Cephes' expf polynomial, ~1 ulp; x below -87 gives ~0), 16 lanes.
__attribute__((target("avx512f,fma"))) inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// One decode query per (row, head) over the slots the row holds: slots 0..q_slot (causal), those
// with key_valid set, ALiBi bias -slope * (q_slot - s). Reads the keys and values of those slots
// once, whatever the cache's length: a batch whose rows hold 100 of 256 slots reads 100.
// q [N, G, D] (N = B * K rows of the cache), kt [N, D, S], v [N, S, D], q_slot [B], key_valid [B, S],
// slopes [K * G] (zeros without ALiBi); out [N, G, D]. D a multiple of 16. The cache is float32 or
// bfloat16 (T = uint16_t: bf16 bits, as BF16 or U16, widened exactly on load; half the bytes per slot).

// Sixteen cache values from p as float32; the lanes outside `m` are zero and nothing past them is read.
__attribute__((target("avx512f"))) inline __m512 Load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
__attribute__((target("avx512f"))) inline __m512 Load16(const uint16_t* p, __mmask16 m) {
  __m256i bits;
  if (m == (__mmask16)0xFFFF) {
    bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else {  // a tail: copy the lanes that exist (masked 16-bit loads need AVX-512BW)
    alignas(32) uint16_t tail[16] = {};
    for (int i = 0; i < 16 && (m >> i) & 1; ++i) tail[i] = p[i];
    bits = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
  }
  // bf16 is float32's top half (the maskz form: GCC 12 warns about the undefined source of the plain one)
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32((__mmask16)0xFFFF, _mm512_cvtepu16_epi32(bits), 16));
}

template <typename T>
__attribute__((target("avx512f,fma"))) void DecodeRow(int64_t n, const float* q, const T* kt, const T* v,
                                                      int32_t q_slot, const bool* valid, const float* slopes,
                                                      float scale, int64_t G, int64_t D, int64_t S, float* out,
                                                      float* scores) {
  const int64_t L = std::min<int64_t>(q_slot + 1, S);  // slots past q_slot are masked (causal)
  const int64_t Lv = (L + 15) / 16 * 16;              // scores padded to whole vectors
  const T* kn = kt + n * D * S;
  const T* vn = v + n * S * D;
  std::fill(scores, scores + G * Lv, 0.0f);
  for (int64_t d = 0; d < D; d += 4) {  // scores[g, s] += q[g, d] * kt[d, s]: four key rows (streams) at once
    const T* k0 = kn + d * S;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + (n * G + g) * D + d;
      const __m512 q0 = _mm512_set1_ps(qg[0] * scale), q1 = _mm512_set1_ps(qg[1] * scale),
                   q2 = _mm512_set1_ps(qg[2] * scale), q3 = _mm512_set1_ps(qg[3] * scale);
      float* sg = scores + g * Lv;
      for (int64_t s = 0; s < L; s += 16) {
        const __mmask16 m = L - s >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - s)) - 1);
        __m512 acc = _mm512_loadu_ps(sg + s);
        acc = _mm512_fmadd_ps(q0, Load16(k0 + s, m), acc);
        acc = _mm512_fmadd_ps(q1, Load16(k0 + S + s, m), acc);
        acc = _mm512_fmadd_ps(q2, Load16(k0 + 2 * S + s, m), acc);
        acc = _mm512_fmadd_ps(q3, Load16(k0 + 3 * S + s, m), acc);
        _mm512_storeu_ps(sg + s, acc);
      }
    }
  }
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * Lv;
    float* og = out + (n * G + g) * D;
    // bias and mask, then the maximum over allowed slots
    const float sl = slopes[g];
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t s = 0; s < Lv; s += 16) {
      const __m512i slot = _mm512_add_epi32(_mm512_set1_epi32((int32_t)s), lane);
      __mmask16 ok = _mm512_cmplt_epi32_mask(slot, _mm512_set1_epi32((int32_t)L));
      for (int i = 0; i < 16; ++i)
        if (s + i < L && !valid[s + i]) ok &= (__mmask16)~(1u << i);
      const __m512 dist = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_set1_epi32(q_slot), slot));
      const __m512 x = _mm512_mask_blend_ps(ok, _mm512_set1_ps(-INFINITY),
                                            _mm512_fnmadd_ps(_mm512_set1_ps(sl), dist, _mm512_loadu_ps(sg + s)));
      _mm512_storeu_ps(sg + s, x);
      mx = _mm512_max_ps(mx, x);
    }
    const float m = _mm512_reduce_max_ps(mx);
    if (m == -INFINITY) {  // no slot allowed (an empty decode row): zeros, as no value is read
      std::fill(og, og + D, 0.0f);
      continue;
    }
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < Lv; s += 16) {  // masked slots hold -inf: exp gives ~0, and they are skipped below
      const __m512 x = _mm512_loadu_ps(sg + s);
      const __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      const __m512 p = _mm512_maskz_mov_ps(ok, Exp(_mm512_sub_ps(x, _mm512_set1_ps(m))));
      _mm512_storeu_ps(sg + s, p);
      sum = _mm512_add_ps(sum, p);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(sum);
    // out[d] = sum_s p[s] * v[s, d] over allowed slots (a masked slot's value is never read)
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int64_t nv = std::min<int64_t>(4, (D - d0) / 16);
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t s = 0; s < L; ++s) {
        const float ps = sg[s];
        if (ps == 0.0f) continue;
        const __m512 pb = _mm512_set1_ps(ps);
        const T* vr = vn + s * D + d0;
        for (int64_t j = 0; j < nv; ++j) acc[j] = _mm512_fmadd_ps(pb, Load16(vr + 16 * j, 0xFFFF), acc[j]);
      }
      for (int64_t j = 0; j < nv; ++j) _mm512_storeu_ps(og + d0 + 16 * j, _mm512_mul_ps(acc[j], _mm512_set1_ps(inv)));
    }
  }
}

template <typename T>
void DecodeRows(ffi::ThreadPool& pool, const float* qp, const T* kp, const T* vp, const int32_t* slot,
                const bool* valid, const float* sp, float scale, int64_t N, int64_t K, int64_t G, int64_t D,
                int64_t S, float* op) {
  ParallelFor(pool, N, 2, [=](int64_t begin, int64_t end) {
    std::vector<float> scores(G * ((S + 15) / 16 * 16));
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / K;
      DecodeRow<T>(n, qp, kp, vp, slot[b], valid + b * S, sp + (n % K) * G, scale, G, D, S, op, scores.data());
    }
  });
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kt, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::S32> q_slot, ffi::Buffer<ffi::PRED> key_valid,
                           ffi::Buffer<ffi::F32> slopes, float scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = kt.dimensions(), vd = v.dimensions(), md = key_valid.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 2) {
    return ffi::Error::InvalidArgument("easympt_decode_attention: want q [N, G, D], kt [N, D, S], v [N, S, D]");
  }
  const int64_t N = qd[0], G = qd[1], D = qd[2], S = kd[2], B = md[0];
  if (kd[0] != N || kd[1] != D || vd[0] != N || vd[1] != S || vd[2] != D || md[1] != S || N % B != 0 ||
      D % 16 != 0 || q_slot.element_count() != B || slopes.element_count() != (N / B) * G) {
    return ffi::Error::InvalidArgument("easympt_decode_attention: shapes do not agree");
  }
  const ffi::DataType type = kt.element_type();
  if (v.element_type() != type ||
      (type != ffi::DataType::F32 && type != ffi::DataType::BF16 && type != ffi::DataType::U16)) {
    return ffi::Error::InvalidArgument(
        "easympt_decode_attention: the cache is float32 or bfloat16 (or its uint16 bits), keys as values");
  }
  if (!EasymptCpuKernelSupported()) return ffi::Error::Internal("easympt_decode_attention needs AVX-512F");
  const int64_t K = N / B;
  if (type == ffi::DataType::F32) {
    DecodeRows(pool, q.typed_data(), kt.typed_data<float>(), v.typed_data<float>(), q_slot.typed_data(),
               key_valid.typed_data(), slopes.typed_data(), scale, N, K, G, D, S, out->typed_data());
  } else {
    DecodeRows(pool, q.typed_data(), kt.typed_data<uint16_t>(), v.typed_data<uint16_t>(), q_slot.typed_data(),
               key_valid.typed_data(), slopes.typed_data(), scale, N, K, G, D, S, out->typed_data());
  }
  return ffi::Error::Success();
}
#else
ffi::Error PackedMatmul(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::Internal("easympt_packed_matmul is built for x86-64 only");
}
ffi::Error DecodeAttention(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::AnyBuffer, ffi::AnyBuffer,
                           ffi::Buffer<ffi::S32>, ffi::Buffer<ffi::PRED>, ffi::Buffer<ffi::F32>, float,
                           ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::Internal("easympt_decode_attention is built for x86-64 only");
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(EasymptDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [N, G, D]
                                  .Arg<ffi::AnyBuffer>()          // kt [N, D, S], float32 or bfloat16 bits
                                  .Arg<ffi::AnyBuffer>()          // v [N, S, D], as kt
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_slot [B]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // key_valid [B, S]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // slopes [K * G]
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
