// Portable (baseline ISA) SparseMatMul kernels. Always built and tested;
// ONNXSHRINK_FORCE_PORTABLE=1 selects them at run time. Plain loops that read
// like the numpy reference, with a few independent sums so that the compiler
// can keep more than one multiply-add in flight.
#include <algorithm>
#include <cstdint>

#include "sparse_matmul_args.h"

namespace onnxshrink {
namespace {

constexpr int64_t kTileRows = 4;
constexpr int64_t kMaxBlockN = 64;  // validated by the op

inline float bias_of(const SpmmArgs& a, int64_t n) { return a.bias ? a.bias[n] : 0.0f; }

void csr_rows(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.a + m * a.K;
    float* y = a.y + m * a.N;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t j1 = a.offsets[n + 1];
      int64_t j = a.offsets[n];
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (; j + 4 <= j1; j += 4) {
        s0 += a.values[j] * x[a.indices[j]];
        s1 += a.values[j + 1] * x[a.indices[j + 1]];
        s2 += a.values[j + 2] * x[a.indices[j + 2]];
        s3 += a.values[j + 3] * x[a.indices[j + 3]];
      }
      for (; j < j1; ++j) s0 += a.values[j] * x[a.indices[j]];
      y[n] = bias_of(a, n) + ((s0 + s1) + (s2 + s3));
    }
  }
}

void two_four_rows(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.a + m * a.K;
    float* y = a.y + m * a.N;
    for (int64_t n = n0; n < n1; ++n) {
      const float* v = a.values + n * a.groups * 2;
      const uint16_t* meta = a.indices + n * a.meta_words;
      float s0 = 0, s1 = 0;
      for (int64_t g = 0; g < a.groups; ++g) {
        const unsigned word = static_cast<unsigned>(meta[g >> 2]) >> (4 * (g & 3));
        s0 += v[2 * g] * x[4 * g + (word & 3)];
        s1 += v[2 * g + 1] * x[4 * g + ((word >> 2) & 3)];
      }
      y[n] = bias_of(a, n) + (s0 + s1);
    }
  }
}

void blocked_rows(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t bk = a.block_k, bn = a.block_n;
  float acc[kMaxBlockN];
  for (int64_t strip = n0 / bn; strip * bn < n1; ++strip) {
    const int64_t c0 = strip * bn;
    const int64_t width = std::min(bn, a.N - c0);
    for (int64_t m = m0; m < m1; ++m) {
      const float* x = a.a + m * a.K;
      for (int64_t c = 0; c < bn; ++c) acc[c] = c < width ? bias_of(a, c0 + c) : 0.0f;
      for (int64_t t = a.offsets[strip]; t < a.offsets[strip + 1]; ++t) {
        const int64_t k0 = static_cast<int64_t>(a.indices[t]) * bk;
        const int64_t kc = std::min(bk, a.K - k0);
        const float* v = a.values + t * bk * bn;
        for (int64_t kk = 0; kk < kc; ++kk) {
          const float xv = x[k0 + kk];
          for (int64_t c = 0; c < bn; ++c) acc[c] += xv * v[kk * bn + c];
        }
      }
      std::copy(acc, acc + width, a.y + m * a.N + c0);
    }
  }
}

void rows(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (a.format) {
    case SparseFormat::kCsr: csr_rows(a, m0, m1, n0, n1); break;
    case SparseFormat::kTwoFour: two_four_rows(a, m0, m1, n0, n1); break;
    case SparseFormat::kBlocked: blocked_rows(a, m0, m1, n0, n1); break;
  }
}

// Writes one column of a tile's results into Y (rows past M dropped).
inline void store_tile_column(const SpmmArgs& a, int64_t tile, int64_t n, const float* acc) {
  const int64_t m0 = tile * kTileRows;
  const int64_t count = std::min(kTileRows, a.M - m0);
  const float b = bias_of(a, n);
  for (int64_t r = 0; r < count; ++r) a.y[(m0 + r) * a.N + n] = acc[r] + b;
}

void tile(const SpmmArgs& a, int64_t tile_index, int64_t n0, int64_t n1) {
  const float* at = a.a_tiles + tile_index * a.K * kTileRows;
  for (int64_t n = n0; n < n1; ++n) {
    float acc[kTileRows] = {0, 0, 0, 0};
    if (a.format == SparseFormat::kCsr) {
      for (int64_t j = a.offsets[n]; j < a.offsets[n + 1]; ++j) {
        const float v = a.values[j];
        const float* p = at + static_cast<int64_t>(a.indices[j]) * kTileRows;
        for (int64_t r = 0; r < kTileRows; ++r) acc[r] += v * p[r];
      }
    } else {  // 2:4
      const float* v = a.values + n * a.groups * 2;
      const uint16_t* meta = a.indices + n * a.meta_words;
      for (int64_t g = 0; g < a.groups; ++g) {
        const unsigned word = static_cast<unsigned>(meta[g >> 2]) >> (4 * (g & 3));
        const float* p0 = at + (4 * g + (word & 3)) * kTileRows;
        const float* p1 = at + (4 * g + ((word >> 2) & 3)) * kTileRows;
        for (int64_t r = 0; r < kTileRows; ++r) acc[r] += v[2 * g] * p0[r] + v[2 * g + 1] * p1[r];
      }
    }
    store_tile_column(a, tile_index, n, acc);
  }
}

void pack_tile(const SpmmArgs& a, int64_t tile_index) {
  float* at = a.a_tiles + tile_index * a.K * kTileRows;
  const int64_t m0 = tile_index * kTileRows;
  for (int64_t r = 0; r < kTileRows; ++r) {
    const float* x = m0 + r < a.M ? a.a + (m0 + r) * a.K : nullptr;
    for (int64_t k = 0; k < a.K; ++k) at[k * kTileRows + r] = x ? x[k] : 0.0f;
  }
}

}  // namespace

const SpmmKernels& spmm_kernels_portable() {
  static const SpmmKernels kernels{"portable", kTileRows, &rows, &tile, &pack_tile};
  return kernels;
}

}  // namespace onnxshrink
