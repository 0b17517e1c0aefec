// CPU kernel for MDN's batch map: out = F - A (B^T F), also returning P = B^T F.
//
// F is (m, D) row-major; A and B are (m, K) row-major. With A = X_R (the removed design
// columns) and B = X W^T (W = (N/m) Sigma^-1), P is the batch estimate beta-hat and out the
// residual; the backward pass is the same map with A and B swapped. MKL's thin GEMMs
// (K x m times m x D) run far below memory speed on small K, and need two separate passes
// (estimate, then subtract) plus a copy of F. Here the columns are cut into chunks and the rows
// into panels; each chunk is read twice (the second time mostly from cache) and the output
// is written once with non-temporal stores. Register tiles hold all K <= 16 columns of A/B.
//
// Portable C++ with GCC/Clang vector extensions: the build picks the widest instructions of
// the machine it runs on (setup.py passes -march=native on x86-64 unless told otherwise).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
constexpr int kLanes = 64 / sizeof(T);

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, 64);
  return v;
}
template <typename T>
inline void store(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, 64);
}
// Non-temporal store of 64 bytes to a 64-byte aligned address (plain store where unsupported).
template <typename T>
inline void store_stream(T* p, typename Vec<T>::type v) {
#if defined(__AVX512F__)
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), reinterpret_cast<__m512i&>(v));
#elif defined(__AVX__)
  __m256i lo, hi;
  __builtin_memcpy(&lo, &v, 32);
  __builtin_memcpy(&hi, reinterpret_cast<char*>(&v) + 32, 32);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), lo);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p) + 1, hi);
#else
  store<T>(p, v);
#endif
}
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}

// widest A/B the register tiles hold; MKL's GEMM is faster beyond (measured: even at K = 24,
// 1.4x slower at K = 32), so wider designs stay on the PyTorch path
constexpr int kMaxColumns = 16;
// vectors per register tile: the accumulators (KG x JV) and the loads fit in 32 registers
template <int KG>
constexpr int kTileVectors = KG <= 3 ? 4 : (KG <= 8 ? 2 : 1);

// P[:, c:c+JV*L] = (P if r0 > 0) + B[r0:r1, :]^T F[r0:r1, c:c+JV*L]   (K = KG columns)
template <typename T, int KG, int JV>
void tile_estimate(const T* F, int64_t D, const T* B, int64_t r0,
                   int64_t r1, int64_t c, T* P) {
  constexpr int L = kLanes<T>;
  using V = typename Vec<T>::type;
  V acc[KG][JV];
  for (int k = 0; k < KG; ++k)
    for (int v = 0; v < JV; ++v)
      acc[k][v] = r0 == 0 ? V{} : load<T>(P + k * D + c + L * v);
  for (int64_t i = r0; i < r1; ++i) {
    V f[JV];
    for (int v = 0; v < JV; ++v) f[v] = load<T>(F + i * D + c + L * v);
    const T* b = B + i * KG;
    for (int k = 0; k < KG; ++k) {
      const T s = b[k];
      for (int v = 0; v < JV; ++v) acc[k][v] += s * f[v];
    }
  }
  for (int k = 0; k < KG; ++k)
    for (int v = 0; v < JV; ++v) store<T>(P + k * D + c + L * v, acc[k][v]);
}

// out[r0:r1, c:c+JV*L] = F[r0:r1, c:c+JV*L] - A[r0:r1, :] P[:, c:c+JV*L]
template <typename T, int KG, int JV>
void tile_subtract(const T* F, T* out, int64_t D, const T* A, int64_t r0, int64_t r1,
                   int64_t c, const T* P, bool stream) {
  constexpr int L = kLanes<T>;
  using V = typename Vec<T>::type;
  V p[KG][JV];
  for (int k = 0; k < KG; ++k)
    for (int v = 0; v < JV; ++v) p[k][v] = load<T>(P + k * D + c + L * v);
  for (int64_t i = r0; i < r1; ++i) {
    V o[JV];
    for (int v = 0; v < JV; ++v) o[v] = load<T>(F + i * D + c + L * v);
    const T* a = A + i * KG;
    for (int k = 0; k < KG; ++k) {
      const T s = a[k];
      for (int v = 0; v < JV; ++v) o[v] -= s * p[k][v];
    }
    if (stream) {
      for (int v = 0; v < JV; ++v) store_stream<T>(out + i * D + c + L * v, o[v]);
    } else {
      for (int v = 0; v < JV; ++v) store<T>(out + i * D + c + L * v, o[v]);
    }
  }
}

// Both passes over the column chunks [q0, q1) for K = KG design columns.
template <typename T, int KG>
void run_chunks(const T* F, const T* A, const T* B, T* out, T* P, int64_t m, int64_t D,
                int64_t dv, int64_t chunk, int64_t q0, int64_t q1, bool stream) {
  constexpr int L = kLanes<T>;
  constexpr int JV = kTileVectors<KG>;
  // small K is memory-bound: short panels (8 rows of a chunk: 32 KiB in float32) fit in L1;
  // larger K is compute-bound: long panels reload the tile of P less often
  constexpr int64_t panel = KG <= 4 ? 8 : 32;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t c0 = q * chunk, c1 = std::min(dv, c0 + chunk);
    const int64_t cw = c0 + (c1 - c0) / (L * JV) * (L * JV);  // end of the full-width tiles
    for (int64_t r0 = 0; r0 < m; r0 += panel) {
      const int64_t r1 = std::min(m, r0 + panel);
      for (int64_t c = c0; c < cw; c += L * JV) tile_estimate<T, KG, JV>(F, D, B, r0, r1, c, P);
      for (int64_t c = cw; c < c1; c += L) tile_estimate<T, KG, 1>(F, D, B, r0, r1, c, P);
    }
    // the second pass goes backwards: the panels read last by the first pass are still in
    // cache (in order, each panel would evict the next one; measured 2x slower for small K)
    for (int64_t r0 = (m - 1) / panel * panel; r0 >= 0; r0 -= panel) {
      const int64_t r1 = std::min(m, r0 + panel);
      for (int64_t c = c0; c < cw; c += L * JV)
        tile_subtract<T, KG, JV>(F, out, D, A, r0, r1, c, P, stream);
      for (int64_t c = cw; c < c1; c += L) tile_subtract<T, KG, 1>(F, out, D, A, r0, r1, c, P, stream);
    }
  }
  if (stream) stream_fence();
}

template <typename T>
void low_rank_residual_impl(const T* F, const T* A, const T* B, T* out, T* P, int64_t m,
                            int64_t D, int64_t K, bool streaming) {
  constexpr int L = kLanes<T>;
  // columns per task (copying each chunk to a contiguous buffer for the second pass measured
  // slower, although rows at a power-of-two-like stride evict each other from cache)
  const int64_t chunk = 64 * L;
  const int64_t dv = D / L * L;  // the part done with full vectors
  const bool stream = streaming && D % L == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0;
  const int64_t nchunks = (dv + chunk - 1) / chunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t q0, int64_t q1) {
    switch (K) {
#define METANORM_CASE(kg)                                                              \
  case kg:                                                                             \
    run_chunks<T, kg>(F, A, B, out, P, m, D, dv, chunk, q0, q1, stream);               \
    break;
      METANORM_CASE(1) METANORM_CASE(2) METANORM_CASE(3) METANORM_CASE(4)
      METANORM_CASE(5) METANORM_CASE(6) METANORM_CASE(7) METANORM_CASE(8)
      METANORM_CASE(9) METANORM_CASE(10) METANORM_CASE(11) METANORM_CASE(12)
      METANORM_CASE(13) METANORM_CASE(14) METANORM_CASE(15) METANORM_CASE(16)
#undef METANORM_CASE
    }
  });
  for (int64_t j = dv; j < D; ++j) {  // the last D mod L columns
    for (int64_t k = 0; k < K; ++k) {
      T s = 0;
      for (int64_t i = 0; i < m; ++i) s += B[i * K + k] * F[i * D + j];
      P[k * D + j] = s;
    }
    for (int64_t i = 0; i < m; ++i) {
      T s = F[i * D + j];
      for (int64_t k = 0; k < K; ++k) s -= A[i * K + k] * P[k * D + j];
      out[i * D + j] = s;
    }
  }
}

// streaming: write the output with non-temporal stores (bypassing the cache, which the output
// of a large batch would mostly evict anyway)
std::vector<at::Tensor> low_rank_residual(const at::Tensor& F, const at::Tensor& A,
                                          const at::Tensor& B, bool streaming) {
  TORCH_CHECK(F.device().is_cpu() && A.device().is_cpu() && B.device().is_cpu(),
              "low_rank_residual: CPU tensors expected");
  TORCH_CHECK(F.dim() == 2 && A.dim() == 2 && B.dim() == 2, "low_rank_residual: 2-D tensors expected");
  TORCH_CHECK(A.sizes() == B.sizes() && A.size(0) == F.size(0),
              "low_rank_residual: A and B must be (m, K) with m = F.size(0)");
  TORCH_CHECK(F.scalar_type() == A.scalar_type() && F.scalar_type() == B.scalar_type(),
              "low_rank_residual: one dtype expected");
  TORCH_CHECK(F.is_contiguous() && A.is_contiguous() && B.is_contiguous(),
              "low_rank_residual: contiguous tensors expected");
  const int64_t m = F.size(0), D = F.size(1), K = A.size(1);
  TORCH_CHECK(m > 0 && K > 0 && K <= kMaxColumns,
              "low_rank_residual: m >= 1 rows and 1 <= K <= ", kMaxColumns, " columns expected");
  at::Tensor out = at::empty_like(F);
  at::Tensor P = at::empty({K, D}, F.options());
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "low_rank_residual", [&] {
    low_rank_residual_impl<scalar_t>(F.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                                     B.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                     P.data_ptr<scalar_t>(), m, D, K, streaming);
  });
  return {out, P};
}

// The same map as an autograd function: for fixed A and B it is linear in F, and its transpose
// is the map with A and B swapped, so the backward is this function again (double backward
// works). P carries no gradient; A and B get none (callers needing them use plain autograd).
class LowRankResidualFunction : public torch::autograd::Function<LowRankResidualFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& F, const at::Tensor& A,
                                                const at::Tensor& B, bool streaming) {
    auto result = low_rank_residual(F.contiguous(), A, B, streaming);
    ctx->save_for_backward({A, B});
    ctx->mark_non_differentiable({result[1]});
    ctx->set_materialize_grads(false);
    return {result[0], result[1]};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    auto saved = ctx->get_saved_variables();
    // streamed too: measured faster than cached stores even when .grad sums it right away
    auto grad = LowRankResidualFunction::apply(grads[0], saved[1], saved[0], true);
    return {grad[0], at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// A = X_b * mask and B = scale * X_b Sigma^-1 (Sigma^-1 symmetric), accumulated in double:
// small loops, cheaper than a handful of tensor operations for these tiny matrices.
template <typename T>
void design_factors(const T* rows, const double* kernel, const bool* mask, double scale,
                    int64_t m, int64_t K, T* A, T* B) {
  for (int64_t i = 0; i < m; ++i) {
    const T* x = rows + i * K;
    for (int64_t j = 0; j < K; ++j) {
      double s = 0.0;
      for (int64_t l = 0; l < K; ++l) s += static_cast<double>(x[l]) * kernel[j * K + l];
      B[i * K + j] = static_cast<T>(scale * s);
      A[i * K + j] = mask[j] ? x[j] : T(0);
    }
  }
}

// MDN's training map (metanorm.glm.batch_residual) for CPU float32/float64 features: returns
// (F - A B^T F, beta = B^T F, sum of beta and of the rows in double), differentiable in F. The
// sum is finite exactly when beta and the rows are (double cannot overflow on these entries).
std::tuple<at::Tensor, at::Tensor, double> batch_residual(const at::Tensor& features, const at::Tensor& rows,
                                       const at::Tensor& kernel, const at::Tensor& remove_mask,
                                       double scale) {
  TORCH_CHECK(rows.dim() == 2 && kernel.dim() == 2 && remove_mask.dim() == 1 &&
                  kernel.size(0) == rows.size(1) && kernel.size(1) == rows.size(1) &&
                  remove_mask.size(0) == rows.size(1),
              "batch_residual: rows (m, K), kernel (K, K) and remove_mask (K,) expected");
  TORCH_CHECK(rows.scalar_type() == features.scalar_type(),
              "batch_residual: rows and features must have one dtype");
  const at::Tensor x = rows.contiguous();
  const at::Tensor w = kernel.to(at::kDouble).contiguous();
  const at::Tensor mask = remove_mask.to(at::kBool).contiguous();
  const int64_t m = x.size(0), K = x.size(1);
  at::Tensor A = at::empty({m, K}, x.options());
  at::Tensor B = at::empty({m, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "design_factors", [&] {
    design_factors<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<double>(), mask.data_ptr<bool>(),
                             scale, m, K, A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>());
  });
  auto result = LowRankResidualFunction::apply(features, A, B, true);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "finite_total", [&] {
    const scalar_t* p = result[1].data_ptr<scalar_t>();
    for (int64_t i = 0, n = result[1].numel(); i < n; ++i) total += static_cast<double>(p[i]);
    const scalar_t* r = x.data_ptr<scalar_t>();
    for (int64_t i = 0; i < m * K; ++i) total += static_cast<double>(r[i]);
  });
  return {result[0], result[1], total};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "metanorm's compiled CPU kernels";
  module.attr("MAX_COLUMNS") = kMaxColumns;
  module.def("low_rank_residual", &low_rank_residual,
             "(F, A, B, streaming) -> (F - A (B^T F), B^T F) for contiguous float32/float64 CPU "
             "tensors; streaming: non-temporal stores for the output",
             pybind11::arg("F"), pybind11::arg("A"), pybind11::arg("B"),
             pybind11::arg("streaming") = true);
  module.def("batch_residual", &batch_residual,
             "(features, rows, kernel, remove_mask, scale) -> (residual, beta, total), "
             "differentiable in features; total = sum(beta) + sum(rows) in double");
}
