// CPU kernel for MDN's batch map: out = F - A (B^T F), also returning P = B^T F.
//
// F is (m, D) row-major; A and B are (m, K) row-major, K <= 16. With A = X_R (the removed
// design columns) and B = X W^T (W = (N/m) Sigma^-1), P is the batch estimate beta-hat and out
// the residual; the backward pass is the same map with A and B swapped. MKL's thin GEMMs
// (K x m times m x D) run far below memory speed on small K, and need two separate passes
// (estimate, then subtract) plus a copy of F. Here the columns are cut into chunks and the rows
// into panels; each chunk is read twice (the second time mostly from cache) and the output
// is written once with non-temporal stores. Register tiles hold all K columns of A/B.
//
// Portable C++ with GCC/Clang vector extensions (low_rank_kernel.h). The build uses no -march
// flag by default; on x86-64 the kernel is compiled three times, for AVX-512, AVX2+FMA and the
// x86-64 baseline (SSE2), through function target attributes, and the widest variant the CPU
// supports is picked once at load time (METANORM_NATIVE_ISA=avx512|avx2|sse2 caps the choice).
// The attributes add ISA features to the build's own (no arch=: with -march=native that would
// take features away and break the inlining of intrinsics) and tune=intel (measured 10% faster
// than generic tuning with AVX-512; tuning never changes which instructions may run).
// Elsewhere one variant is built for whatever the compiler targets.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define METANORM_X86 1
#else
#define METANORM_X86 0
#endif

// Keeps a vector in a register. Without it GCC (baseline flags plus target attributes) folds the
// load of each F vector into the K multiply-adds that use it, loading F K times per row instead
// of once (tile_estimate measured 8% slower on one thread, 20% more CPU time in the layer's step).
#if METANORM_X86
#define METANORM_IN_REGISTER(x) __asm__("" : "+v"(x))
#else
#define METANORM_IN_REGISTER(x) ((void)0)
#endif

namespace {

// widest A/B the register tiles hold; MKL's GEMM is faster beyond (measured: even at K = 24,
// 1.4x slower at K = 32), so wider designs stay on the PyTorch path
constexpr int kMaxColumns = 16;

#if METANORM_X86

namespace isa_avx512 {
#define METANORM_TARGET __attribute__((target("avx512f,avx512cd,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,tune=intel")))
constexpr int kVecBytes = 64;
constexpr int kRegisters = 32;
METANORM_TARGET inline void stream_bytes(void* dst, const void* src) {
  __m512i v;
  std::memcpy(&v, src, 64);
  _mm512_stream_si512(static_cast<__m512i*>(dst), v);
}
METANORM_TARGET inline void stream_fence() { _mm_sfence(); }
#include "low_rank_kernel.h"
#undef METANORM_TARGET
}  // namespace isa_avx512

namespace isa_avx2 {
#define METANORM_TARGET __attribute__((target("avx2,fma,bmi,bmi2,tune=intel")))
constexpr int kVecBytes = 32;
constexpr int kRegisters = 16;
METANORM_TARGET inline void stream_bytes(void* dst, const void* src) {
  __m256i v;
  std::memcpy(&v, src, 32);
  _mm256_stream_si256(static_cast<__m256i*>(dst), v);
}
METANORM_TARGET inline void stream_fence() { _mm_sfence(); }
#include "low_rank_kernel.h"
#undef METANORM_TARGET
}  // namespace isa_avx2

// the x86-64 baseline (SSE2), or whatever -march the build was given
namespace isa_base {
#define METANORM_TARGET
constexpr int kVecBytes = 16;
constexpr int kRegisters = 16;
inline void stream_bytes(void* dst, const void* src) {
  __m128i v;
  std::memcpy(&v, src, 16);
  _mm_stream_si128(static_cast<__m128i*>(dst), v);
}
inline void stream_fence() { _mm_sfence(); }
#include "low_rank_kernel.h"
#undef METANORM_TARGET
}  // namespace isa_base

#else  // not x86: one variant for the compiler's target (128-bit vectors: NEON, VSX, ...)

namespace isa_base {
#define METANORM_TARGET
constexpr int kVecBytes = 16;
constexpr int kRegisters = 32;
inline void stream_bytes(void* dst, const void* src) { std::memcpy(dst, src, 16); }
inline void stream_fence() {}
#include "low_rank_kernel.h"
#undef METANORM_TARGET
}  // namespace isa_base

#endif

enum class Isa { kBase, kAvx2, kAvx512 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return METANORM_X86 ? "sse2" : "generic";
  }
}

// The widest variant this CPU runs, capped by METANORM_NATIVE_ISA (for comparisons).
Isa detect_isa() {
  Isa isa = Isa::kBase;
#if METANORM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = Isa::kAvx2;
  if (isa == Isa::kAvx2 && __builtin_cpu_supports("avx512f")) isa = Isa::kAvx512;
  if (const char* cap = std::getenv("METANORM_NATIVE_ISA")) {
    const std::string c(cap);
    if (c == "sse2" || c == "generic" || c == "base") {
      isa = Isa::kBase;
    } else if (c == "avx2" && isa == Isa::kAvx512) {
      isa = Isa::kAvx2;
    }
  }
#endif
  return isa;
}

const Isa kIsa = detect_isa();

template <typename T>
void dispatch(const T* F, const T* A, const T* B, T* out, T* P, int64_t m, int64_t D, int64_t K,
              bool streaming) {
#if METANORM_X86
  if (kIsa == Isa::kAvx512)
    return isa_avx512::low_rank_residual_impl<T>(F, A, B, out, P, m, D, K, streaming);
  if (kIsa == Isa::kAvx2)
    return isa_avx2::low_rank_residual_impl<T>(F, A, B, out, P, m, D, K, streaming);
#endif
  isa_base::low_rank_residual_impl<T>(F, A, B, out, P, m, D, K, streaming);
}

// streaming: write the output with non-temporal stores (bypassing the cache, which the output
// of a large batch would mostly evict anyway; measured faster in both directions)
std::tuple<at::Tensor, at::Tensor> low_rank_residual(const at::Tensor& F, const at::Tensor& A,
                                                     const at::Tensor& B, bool streaming) {
  TORCH_CHECK(F.device().is_cpu() && A.device().is_cpu() && B.device().is_cpu(),
              "low_rank_residual: CPU tensors expected");
  TORCH_CHECK(F.dim() == 2 && A.dim() == 2 && B.dim() == 2,
              "low_rank_residual: 2-D tensors expected");
  TORCH_CHECK(A.sizes() == B.sizes() && A.size(0) == F.size(0),
              "low_rank_residual: A and B must be (m, K) with m = F.size(0), got F ", F.sizes(),
              ", A ", A.sizes(), ", B ", B.sizes());
  TORCH_CHECK(F.scalar_type() == A.scalar_type() && F.scalar_type() == B.scalar_type(),
              "low_rank_residual: one dtype expected, got ", F.scalar_type(), ", ",
              A.scalar_type(), ", ", B.scalar_type());
  TORCH_CHECK(F.scalar_type() == at::kFloat || F.scalar_type() == at::kDouble,
              "low_rank_residual: float32 or float64 expected, got ", F.scalar_type());
  TORCH_CHECK(F.is_contiguous() && A.is_contiguous() && B.is_contiguous(),
              "low_rank_residual: contiguous tensors expected");
  const int64_t m = F.size(0), D = F.size(1), K = A.size(1);
  TORCH_CHECK(m > 0 && K > 0 && K <= kMaxColumns,
              "low_rank_residual: m >= 1 rows and 1 <= K <= ", kMaxColumns,
              " design columns expected, got m = ", m, ", K = ", K);
  at::Tensor out = at::empty_like(F, at::MemoryFormat::Contiguous);
  at::Tensor P = at::empty({K, D}, F.options());
  if (D == 0) return {out, P};
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "low_rank_residual", [&] {
    dispatch<scalar_t>(F.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), m, D, K, streaming);
  });
  return {out, P};
}

// The running-beta update of metanorm.nn.functional.update_running_beta for one process (the
// batch size m known on the host) with all three counters, in one pass over beta:
//   finite = sum(beta) is finite (in beta's dtype);
//   f = m / (S + m), and with a momentum mu: f = max(f, min(1, mu m B / max(S, 1)))
//       (S samples and B batches folded in before);
//   if finite: running <- lerp(running, beta, f), B += 1, S += m; else skipped += 1.
// The factor follows the order of the PyTorch operations; lerp is torch's formula (torch's
// vectorised lerp fuses the multiply-add: the result may differ in the last bit).
template <typename T>
bool running_update_impl(T* running, const T* beta, int64_t n, int64_t count, double momentum,
                         bool cumulative, int64_t* batches, int64_t* samples, int64_t* skipped) {
  constexpr int kAcc = 16;  // independent partial sums (they vectorise; one would not)
  T acc[kAcc] = {};
  int64_t i = 0;
  for (; i + kAcc <= n; i += kAcc)
    for (int j = 0; j < kAcc; ++j) acc[j] += beta[i + j];
  T total = 0;
  for (; i < n; ++i) total += beta[i];
  for (int j = 0; j < kAcc; ++j) total += acc[j];
  if (!std::isfinite(total)) {
    *skipped += 1;
    return false;
  }
  const T s = static_cast<T>(*samples), c = static_cast<T>(count);
  T f = (T(1) / (s + c)) * c;
  if (!cumulative) {
    const T w = (T(1) / std::max(s, T(1))) * static_cast<T>(momentum * count) *
                static_cast<T>(*batches);
    f = std::max(f, std::min(w, T(1)));
  }
  if (std::abs(f) < T(0.5)) {
    // (no std::fma: in the baseline build it is a slow library call)
    for (int64_t j = 0; j < n; ++j) running[j] += f * (beta[j] - running[j]);
  } else {
    const T g = T(1) - f;
    for (int64_t j = 0; j < n; ++j) running[j] = beta[j] - (beta[j] - running[j]) * g;
  }
  *batches += 1;
  *samples += count;
  return true;
}

void check_counter(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 0,
              "running_update: ", name, " must be a CPU int64 0-d tensor, got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
}

// Returns whether beta was finite (a bool 0-d tensor); updates running and the counters in place.
at::Tensor running_update(at::Tensor running, const at::Tensor& beta, int64_t count,
                          double momentum, bool cumulative, at::Tensor batches,
                          at::Tensor samples, at::Tensor skipped) {
  TORCH_CHECK(running.device().is_cpu() && beta.device().is_cpu(),
              "running_update: CPU tensors expected");
  TORCH_CHECK(running.sizes() == beta.sizes(), "running_update: running ", running.sizes(),
              " and beta ", beta.sizes(), " must have one shape");
  TORCH_CHECK(running.scalar_type() == beta.scalar_type() &&
                  (running.scalar_type() == at::kFloat || running.scalar_type() == at::kDouble),
              "running_update: float32 or float64 running and beta of one dtype expected, got ",
              running.scalar_type(), " and ", beta.scalar_type());
  TORCH_CHECK(running.is_contiguous(), "running_update: a contiguous running tensor expected");
  TORCH_CHECK(count > 0, "running_update: a positive batch size expected, got ", count);
  check_counter(batches, "num_batches_tracked");
  check_counter(samples, "num_samples_tracked");
  check_counter(skipped, "num_batches_skipped");
  const at::Tensor b = beta.contiguous();
  bool finite = false;
  AT_DISPATCH_FLOATING_TYPES(running.scalar_type(), "running_update", [&] {
    finite = running_update_impl<scalar_t>(
        running.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), running.numel(), count, momentum,
        cumulative, batches.data_ptr<int64_t>(), samples.data_ptr<int64_t>(),
        skipped.data_ptr<int64_t>());
  });
  // written through raw pointers: bump the version counters as in-place torch ops do, so that
  // autograd still refuses a saved tensor that was changed since
  for (const at::Tensor* t : {&running, &batches, &samples, &skipped})
    t->unsafeGetTensorImpl()->bump_version();
  return at::scalar_tensor(finite, at::TensorOptions().dtype(at::kBool));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "metanorm's optional compiled CPU kernel (metanorm_native)";
  module.attr("MAX_COLUMNS") = kMaxColumns;
  module.attr("ISA") = isa_name(kIsa);
#ifdef _OPENMP
  module.attr("OPENMP") = true;  // at::parallel_for splits the column chunks over threads
#else
  module.attr("OPENMP") = false;  // at::parallel_for runs serially in this build
#endif
  module.def("low_rank_residual", &low_rank_residual,
             "(F, A, B, streaming=True) -> (F - A (B^T F), B^T F) for contiguous float32/float64 "
             "CPU tensors, F (m, D), A and B (m, K), 1 <= K <= MAX_COLUMNS; streaming: "
             "non-temporal stores for the output. Not differentiable.",
             pybind11::arg("F"), pybind11::arg("A"), pybind11::arg("B"),
             pybind11::arg("streaming") = true);
  module.def("running_update", &running_update,
             "(running, beta, count, momentum, cumulative, num_batches_tracked, "
             "num_samples_tracked, num_batches_skipped) -> finite: the running-beta update of "
             "metanorm.nn.functional.update_running_beta (one process, all counters), in place",
             pybind11::arg("running"), pybind11::arg("beta"), pybind11::arg("count"),
             pybind11::arg("momentum"), pybind11::arg("cumulative"),
             pybind11::arg("num_batches_tracked"), pybind11::arg("num_samples_tracked"),
             pybind11::arg("num_batches_skipped"));
}
