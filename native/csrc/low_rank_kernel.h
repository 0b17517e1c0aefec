// The kernel body of low_rank.cpp, included once per instruction set inside its own namespace
// (no include guard on purpose, and no #include: low_rank.cpp includes everything first).
//
// The including file defines METANORM_IN_REGISTER(x) (keeps a vector in a register) and, in the
// enclosing namespace:
//   METANORM_TARGET      the function attribute of this variant (e.g. target("avx2,fma"))
//   kVecBytes            the vector width in bytes (16, 32 or 64)
//   kRegisters           the vector registers the register tiles may use (16 or 32)
//   stream_bytes(p, v)   a non-temporal store of one vector to a kVecBytes-aligned address
//   stream_fence()       the fence after a run of non-temporal stores
// Every function here carries METANORM_TARGET, so each variant is compiled for its own
// instruction set whatever the build flags; low_rank.cpp picks one at run time.

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
};
template <typename T>
constexpr int kLanes = kVecBytes / sizeof(T);

template <typename T>
METANORM_TARGET inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, kVecBytes);
  return v;
}
template <typename T>
METANORM_TARGET inline void store(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, kVecBytes);
}

// vectors per register tile: the accumulators (KG x JV) and the loads fit in the registers
// (32 with AVX-512: the tiles of the original kernel; 16 with AVX2/SSE2: half as wide)
template <int KG>
constexpr int kTileVectors = kRegisters >= 32 ? (KG <= 3 ? 4 : (KG <= 8 ? 2 : 1))
                                              : (KG <= 2 ? 4 : (KG <= 6 ? 2 : 1));

// P[:, c:c+JV*L] = (P if r0 > 0) + B[r0:r1, :]^T F[r0:r1, c:c+JV*L]   (K = KG columns)
template <typename T, int KG, int JV>
METANORM_TARGET inline void tile_estimate(const T* F, int64_t D, const T* B, int64_t r0,
                                          int64_t r1, int64_t c, T* P) {
  constexpr int L = kLanes<T>;
  using V = typename Vec<T>::type;
  V acc[KG][JV];
  for (int k = 0; k < KG; ++k)
    for (int v = 0; v < JV; ++v) acc[k][v] = r0 == 0 ? V{} : load<T>(P + k * D + c + L * v);
  for (int64_t i = r0; i < r1; ++i) {
    V f[JV];
    for (int v = 0; v < JV; ++v) {
      f[v] = load<T>(F + i * D + c + L * v);
      METANORM_IN_REGISTER(f[v]);
    }
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
// (JV*L is at least a cache line for full tiles, see run_chunks: non-temporal stores of part of
// a line, then of another row, flush the write-combining buffers half-full: measured 10-20x
// slower with AVX2/SSE2 tiles of 32 bytes)
template <typename T, int KG, int JV>
METANORM_TARGET inline void tile_subtract(const T* F, T* out, int64_t D, const T* A, int64_t r0,
                                          int64_t r1, int64_t c, const T* P, bool stream) {
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
      for (int v = 0; v < JV; ++v) stream_bytes(out + i * D + c + L * v, &o[v]);
    } else {
      for (int v = 0; v < JV; ++v) store<T>(out + i * D + c + L * v, o[v]);
    }
  }
}

// Both passes over the column chunks [q0, q1) for K = KG design columns.
template <typename T, int KG>
METANORM_TARGET void run_chunks(const T* F, const T* A, const T* B, T* out, T* P, int64_t m,
                                int64_t D, int64_t dv, int64_t chunk, int64_t q0, int64_t q1,
                                bool stream) {
  constexpr int L = kLanes<T>;
  constexpr int JV = kTileVectors<KG>;
  // the subtract tile spans whole cache lines (its P tile may then not fit in the registers: the
  // rest is reloaded from L1, which costs less than partial-line streaming)
  constexpr int JS = JV * kVecBytes >= 64 ? JV : 64 / kVecBytes;
  // small K is memory-bound: short panels (8 rows of a chunk: 32 KiB) fit in L1;
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
    const int64_t cs = c0 + (c1 - c0) / (L * JS) * (L * JS);
    for (int64_t r0 = (m - 1) / panel * panel; r0 >= 0; r0 -= panel) {
      const int64_t r1 = std::min(m, r0 + panel);
      for (int64_t c = c0; c < cs; c += L * JS)
        tile_subtract<T, KG, JS>(F, out, D, A, r0, r1, c, P, stream);
      for (int64_t c = cs; c < c1; c += L)
        tile_subtract<T, KG, 1>(F, out, D, A, r0, r1, c, P, stream);
    }
  }
  if (stream) stream_fence();
}

// The chunks [q0, q1) for any 1 <= K <= kMaxColumns.
template <typename T>
METANORM_TARGET void run_range(const T* F, const T* A, const T* B, T* out, T* P, int64_t m,
                               int64_t D, int64_t K, int64_t dv, int64_t chunk, int64_t q0,
                               int64_t q1, bool stream) {
  switch (K) {
#define METANORM_CASE(kg)                                                    \
  case kg:                                                                   \
    run_chunks<T, kg>(F, A, B, out, P, m, D, dv, chunk, q0, q1, stream);     \
    break;
    METANORM_CASE(1) METANORM_CASE(2) METANORM_CASE(3) METANORM_CASE(4)
    METANORM_CASE(5) METANORM_CASE(6) METANORM_CASE(7) METANORM_CASE(8)
    METANORM_CASE(9) METANORM_CASE(10) METANORM_CASE(11) METANORM_CASE(12)
    METANORM_CASE(13) METANORM_CASE(14) METANORM_CASE(15) METANORM_CASE(16)
#undef METANORM_CASE
  }
}

// The last D mod L columns, one at a time.
template <typename T>
METANORM_TARGET void tail_columns(const T* F, const T* A, const T* B, T* out, T* P, int64_t m,
                                  int64_t D, int64_t K, int64_t dv) {
  for (int64_t j = dv; j < D; ++j) {
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

template <typename T>
void low_rank_residual_impl(const T* F, const T* A, const T* B, T* out, T* P, int64_t m,
                            int64_t D, int64_t K, bool streaming) {
  constexpr int L = kLanes<T>;
  // 4 KiB of each row per task (copying each chunk to a contiguous buffer for the second pass
  // measured slower, although rows at a power-of-two-like stride evict each other from cache)
  const int64_t chunk = 4096 / sizeof(T);
  const int64_t dv = D / L * L;  // the part done with full vectors
  // non-temporal stores need every row start aligned to a vector
  const bool stream =
      streaming && D % L == 0 && reinterpret_cast<uintptr_t>(out) % kVecBytes == 0;
  const int64_t nchunks = (dv + chunk - 1) / chunk;
  // the lambda is compiled for the default target; it only calls into this variant
  at::parallel_for(0, nchunks, 1, [&](int64_t q0, int64_t q1) {
    run_range<T>(F, A, B, out, P, m, D, K, dv, chunk, q0, q1, stream);
  });
  tail_columns<T>(F, A, B, out, P, m, D, K, dv);
}
