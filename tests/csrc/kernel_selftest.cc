// The CPU kernels' arithmetic without JAX: the packed product and decode attention of
// easympt/kernels/csrc/cpu_kernels.inc against scalar references, in one binary built with the same
// flags as a kernel library. tests/test_kernel_selftest.py builds it for this CPU's instruction sets
// and for aarch64 (NEON, run under qemu-aarch64), where no jaxlib is at hand to call the kernels
// through XLA. Prints one line per check and exits non-zero on the first mismatch.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../../easympt/kernels/csrc/cpu_kernels.inc"

namespace {

std::mt19937 rng(0);
float Normal() { return std::normal_distribution<float>(0.0f, 1.0f)(rng); }

// float32 -> bfloat16 bits (truncated; the reference then reads the same rounded values)
uint16_t Bf16Bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return uint16_t(bits >> 16);
}

// W [K, N] -> panels [ceil(N/48), K, 48], zero past N (easympt.kernels.cpu.pack)
template <typename T>
std::vector<T> Pack(const std::vector<float>& w, int64_t K, int64_t N) {
  const int64_t P = (N + kPanel - 1) / kPanel;
  std::vector<T> out(P * K * kPanel, T(0));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) {
      const float v = w[k * N + n];
      T& dst = out[(n / kPanel) * K * kPanel + k * kPanel + n % kPanel];
      if constexpr (sizeof(T) == 2) dst = Bf16Bits(v); else dst = v;
    }
  return out;
}

// y [M, N] from a kernel against x @ w in double precision; prints one line, true when within bounds.
bool CheckProduct(const char* what, const std::vector<float>& x, const std::vector<float>& w,
                  const std::vector<float>& y, int64_t M, int64_t K, int64_t N) {
  double worst = 0.0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double want = 0.0;
      for (int64_t k = 0; k < K; ++k) want += double(x[m * K + k]) * w[k * N + n];
      worst = std::max(worst, std::fabs(want - y[m * N + n]) / std::sqrt(double(K)));
    }
  const bool ok = worst < 1e-4;
  std::printf("%s matmul %s M=%lld K=%lld N=%lld: max |err| / sqrt(K) %.2e %s\n", EASYMPT_ISA, what, (long long)M,
              (long long)K, (long long)N, worst, ok ? "ok" : "FAILED");
  return ok;
}

template <typename T>
bool CheckMatmul(int64_t M, int64_t K, int64_t N) {
  std::vector<float> x(M * K), w(K * N), y(M * N, NAN);
  for (auto& v : x) v = Normal();
  for (auto& v : w) v = sizeof(T) == 2 ? Widen(Bf16Bits(Normal())) : Normal();
  const std::vector<T> packed = Pack<T>(w, K, N);
  Panels(x.data(), M, K, packed.data(), nullptr, y.data(), N, 0, (N + kPanel - 1) / kPanel);
  return CheckProduct(sizeof(T) == 2 ? "bf16" : "f32", x, w, y, M, K, N);
}

// 8- and 4-bit panels (easympt.kernels.linear.pack_quantized) against the float product of the values
// they stand for: int8 with a float32 scale per column, int4 nibble pairs (q + 8) with a bfloat16
// scale per group of 32 rows and column.
bool CheckQuantMatmul(bool int4, int64_t M, int64_t K, int64_t N) {
  const int64_t P = (N + kPanel - 1) / kPanel, groups = K / kGroup;
  std::vector<float> x(M * K), w(K * N), y(M * N, NAN);
  for (auto& v : x) v = Normal();
  std::vector<int8_t> q8(P * K * kPanel, 0);
  std::vector<uint8_t> q4(P * (K / 2) * kPanel, 0);
  std::vector<float> s8(P * kPanel, 0.0f);
  std::vector<uint16_t> s4(P * groups * kPanel, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t p = n / kPanel, c = n % kPanel;
    const float col_scale = 0.01f * float(1 + n % 7);
    if (!int4) s8[p * kPanel + c] = col_scale;
    for (int64_t k = 0; k < K; ++k) {
      const int q = int(rng() % 255) - 127;  // int8 in [-127, 127]
      if (!int4) {
        q8[p * K * kPanel + k * kPanel + c] = int8_t(q);
        w[k * N + n] = q * col_scale;
      } else {
        const int u = int(rng() % 16);  // stored q + 8 in [0, 15]
        const uint16_t d = Bf16Bits(col_scale * float(1 + k / kGroup));
        s4[p * groups * kPanel + (k / kGroup) * kPanel + c] = d;
        q4[p * (K / 2) * kPanel + (k / 2) * kPanel + c] |= uint8_t(k % 2 ? u << 4 : u);
        w[k * N + n] = float(u - 8) * Widen(d);
      }
    }
  }
  if (int4) {
    Panels(x.data(), M, K, reinterpret_cast<const Int4*>(q4.data()), s4.data(), y.data(), N, 0, P);
  } else {
    Panels(x.data(), M, K, q8.data(), s8.data(), y.data(), N, 0, P);
  }
  return CheckProduct(int4 ? "int4" : "int8", x, w, y, M, K, N);
}

// One row (n = 0), G query heads, over S slots of which the first L = q_slot + 1 are causal and
// `valid` marks real keys; ALiBi slopes per head.
// cache: "f32", "bf16" (bits) or "int8" (a float32 scale per slot for keys and for values).
bool CheckDecode(int64_t G, int64_t D, int64_t S, int32_t q_slot, const std::string& cache) {
  std::vector<float> q(G * D), kt(D * S), v(S * D), slopes(G), out(G * D), scores(G * ((S + 15) / 16 * 16 + 16));
  for (auto& a : q) a = Normal();
  for (auto& a : kt) a = Normal();
  for (auto& a : v) a = Normal();
  for (int64_t g = 0; g < G; ++g) slopes[g] = 0.5f / float(g + 1);
  std::vector<char> valid_bytes(S, 1);
  valid_bytes[0] = 0;  // left padding
  if (S > 7) valid_bytes[7] = 0;
  const bool* valid = reinterpret_cast<const bool*>(valid_bytes.data());
  const float scale = 0.3f;
  if (cache == "bf16") {  // keys and values as bfloat16 bits (rounded toward zero here), the reference reads the same
    std::vector<uint16_t> kb(kt.size()), vb(v.size());
    for (size_t i = 0; i < kt.size(); ++i) kt[i] = Widen(kb[i] = Bf16Bits(kt[i]));
    for (size_t i = 0; i < v.size(); ++i) v[i] = Widen(vb[i] = Bf16Bits(v[i]));
    DecodeRow<uint16_t>(0, q.data(), kb.data(), vb.data(), nullptr, nullptr, q_slot, valid, slopes.data(), scale, G,
                        D, S, out.data(), scores.data());
  } else if (cache == "int8") {  // rounded to int8 per slot; the reference reads the dequantized values
    std::vector<int8_t> kq(kt.size()), vq(v.size());
    std::vector<float> ks(S), vs(S);
    for (int64_t s = 0; s < S; ++s) {
      float km = 0.0f, vm = 0.0f;
      for (int64_t d = 0; d < D; ++d) km = std::max(km, std::fabs(kt[d * S + s])), vm = std::max(vm, std::fabs(v[s * D + d]));
      ks[s] = km / 127.0f, vs[s] = vm / 127.0f;
      for (int64_t d = 0; d < D; ++d) {
        kq[d * S + s] = int8_t(std::lrint(kt[d * S + s] / ks[s]));
        kt[d * S + s] = float(kq[d * S + s]) * ks[s];
        vq[s * D + d] = int8_t(std::lrint(v[s * D + d] / vs[s]));
        v[s * D + d] = float(vq[s * D + d]) * vs[s];
      }
    }
    DecodeRow<int8_t>(0, q.data(), kq.data(), vq.data(), ks.data(), vs.data(), q_slot, valid, slopes.data(), scale, G,
                      D, S, out.data(), scores.data());
  } else {
    DecodeRow<float>(0, q.data(), kt.data(), v.data(), nullptr, nullptr, q_slot, valid, slopes.data(), scale, G, D, S,
                     out.data(), scores.data());
  }
  double worst = 0.0;
  const int64_t L = std::min<int64_t>(q_slot + 1, S);
  for (int64_t g = 0; g < G; ++g) {
    std::vector<double> p(L, 0.0);
    double mx = -INFINITY, sum = 0.0;
    for (int64_t s = 0; s < L; ++s) {
      if (!valid[s]) continue;
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) dot += double(q[g * D + d]) * scale * kt[d * S + s];
      p[s] = dot - double(slopes[g]) * (q_slot - s);
      mx = std::max(mx, p[s]);
    }
    for (int64_t s = 0; s < L; ++s) sum += valid[s] ? (p[s] = std::exp(p[s] - mx)) : (p[s] = 0.0);
    for (int64_t d = 0; d < D; ++d) {
      double want = 0.0;
      for (int64_t s = 0; s < L; ++s) want += p[s] / sum * v[s * D + d];
      worst = std::max(worst, std::fabs(want - out[g * D + d]));
    }
  }
  const bool ok = worst < 1e-5;
  std::printf("%s decode attention G=%lld D=%lld S=%lld q_slot=%d %s: max |err| %.2e %s\n", EASYMPT_ISA,
              (long long)G, (long long)D, (long long)S, q_slot, cache.c_str(), worst, ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace

int main() {
  bool ok = true;
  for (int64_t M : {1, 2, 3, 5, 8, 9, 17, 40})
    for (auto [K, N] : {std::pair<int64_t, int64_t>{64, 100}, {130, 200}, {16, 48}, {40, 1}, {300, 500}})
      ok = CheckMatmul<float>(M, K, N) && CheckMatmul<uint16_t>(M, K, N) && ok;
  for (int64_t M : {1, 2, 3, 8, 9, 33, 40})
    for (auto [K, N] : {std::pair<int64_t, int64_t>{64, 100}, {32, 48}, {160, 1}, {256, 500}})
      ok = CheckQuantMatmul(false, M, K, N) && CheckQuantMatmul(true, M, K, N) && ok;
  for (const std::string cache : {"f32", "bf16", "int8"})
    for (auto [G, D, S, slot] : {std::tuple<int64_t, int64_t, int64_t, int32_t>{1, 16, 37, 36}, {3, 64, 64, 20},
                                 {8, 32, 130, 129}, {2, 16, 200, 5}})
      ok = CheckDecode(G, D, S, slot, cache) && ok;
  std::printf("%s\n", ok ? "all ok" : "FAILED");
  return ok ? 0 : 1;
}
