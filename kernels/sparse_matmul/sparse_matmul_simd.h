// SparseMatMul kernels written once for any SIMD width. Each ISA translation
// unit (sparse_matmul_avx2.cc, sparse_matmul_avx512.cc) defines
// ONNXSHRINK_SPMM_NAMESPACE and, in that namespace, a `struct Isa` with the
// vector type and the handful of operations used below, then includes this
// header; it is compiled with that ISA's -m flags and called only after a
// CPUID check. The algorithms are the portable TU's, vectorised:
//   rows  one sparse dot product per output: W nonzeros at a time, their
//         activations gathered by index (csr, 2:4); blocked tiles are dense,
//         so a tile is block_k broadcasts and block_n / W multiply-adds.
//   tile  A transposed once into [K][2W] tiles: each nonzero is one
//         broadcast and two multiply-adds on contiguous memory, for 2W rows.
#pragma once

#include <algorithm>
#include <cstdint>

#include "sparse_matmul_args.h"

#ifndef ONNXSHRINK_SPMM_NAMESPACE
#error "define ONNXSHRINK_SPMM_NAMESPACE before including sparse_matmul_simd.h"
#endif

namespace onnxshrink {
namespace ONNXSHRINK_SPMM_NAMESPACE {

constexpr int W = Isa::W;
constexpr int64_t kTileRows = 2 * W;
constexpr int64_t kPrefetch = 1024;  // elements ahead (a hint: past the end is harmless)
using F = Isa::F;

inline float bias_of(const SpmmArgs& a, int64_t n) { return a.bias ? a.bias[n] : 0.0f; }

// ------------------------------------------------------------------ row kernels
// Isa::gather_u16(x, ix) is {x[ix[0]], ..., x[ix[W-1]]}.

static void csr_rows(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.a + m * a.K;
    float* y = a.y + m * a.N;
    for (int64_t n = n0; n < n1; ++n) {
      const float* v = a.values;
      const uint16_t* ix = a.indices;
      const int64_t j1 = a.offsets[n + 1];
      int64_t j = a.offsets[n];
      // Four accumulators: the gathers of one step do not wait for the
      // previous step's multiply-add.
      F s0 = Isa::zero(), s1 = Isa::zero(), s2 = Isa::zero(), s3 = Isa::zero();
      for (; j + 4 * W <= j1; j += 4 * W) {
        // Values and indices stream from DRAM at moderate sparsity (30 MB at
        // 70% of 4096 x 4096): prefetching 4 KB ahead measured ~15% faster.
        for (int o = 0; o < 4 * W; o += 16) Isa::prefetch(v + j + kPrefetch + o);
        for (int o = 0; o < 4 * W; o += 32) Isa::prefetch(ix + j + kPrefetch + o);
        s0 = Isa::fmadd(Isa::loadu(v + j), Isa::gather_u16(x, ix + j), s0);
        s1 = Isa::fmadd(Isa::loadu(v + j + W), Isa::gather_u16(x, ix + j + W), s1);
        s2 = Isa::fmadd(Isa::loadu(v + j + 2 * W), Isa::gather_u16(x, ix + j + 2 * W), s2);
        s3 = Isa::fmadd(Isa::loadu(v + j + 3 * W), Isa::gather_u16(x, ix + j + 3 * W), s3);
      }
      for (; j + W <= j1; j += W) s0 = Isa::fmadd(Isa::loadu(v + j), Isa::gather_u16(x, ix + j), s0);
      float s = Isa::hsum(Isa::add(Isa::add(s0, s1), Isa::add(s2, s3)));
      for (; j < j1; ++j) s += v[j] * x[ix[j]];
      y[n] = bias_of(a, n) + s;
    }
  }
}

static void two_four_rows(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int64_t kGroups = W / 2;  // one lane per nonzero, two per group
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.a + m * a.K;
    float* y = a.y + m * a.N;
    for (int64_t n = n0; n < n1; ++n) {
      const float* v = a.values + n * a.groups * 2;
      const uint16_t* meta = a.indices + n * a.meta_words;
      F s0 = Isa::zero(), s1 = Isa::zero();
      // Vector steps only over groups that lie wholly inside K: select24 may
      // load all 4 activations of each group it covers.
      const int64_t full = a.K / 4;
      int64_t g = 0;
      for (; g + 2 * kGroups <= full; g += 2 * kGroups) {
        s0 = Isa::fmadd(Isa::loadu(v + 2 * g), Isa::select24(x + 4 * g, meta + g / 4), s0);
        s1 = Isa::fmadd(Isa::loadu(v + 2 * g + W), Isa::select24(x + 4 * (g + kGroups), meta + (g + kGroups) / 4), s1);
      }
      for (; g + kGroups <= full; g += kGroups) {
        s0 = Isa::fmadd(Isa::loadu(v + 2 * g), Isa::select24(x + 4 * g, meta + g / 4), s0);
      }
      float s = Isa::hsum(Isa::add(s0, s1));
      for (; g < a.groups; ++g) {
        const unsigned word = static_cast<unsigned>(meta[g >> 2]) >> (4 * (g & 3));
        s += v[2 * g] * x[4 * g + (word & 3)] + v[2 * g + 1] * x[4 * g + ((word >> 2) & 3)];
      }
      y[n] = bias_of(a, n) + s;
    }
  }
}

// Blocked, block_n == NV * W: R rows of A share every tile's loads.
template <int NV, int R>
static void blocked_strip(const SpmmArgs& a, int64_t m, int64_t strip) {
  const int64_t bk = a.block_k, bn = NV * W;
  const int64_t c0 = strip * bn;
  const int64_t width = std::min(bn, a.N - c0);
  F acc[R][NV];
  alignas(64) float init[NV * W];
  for (int64_t c = 0; c < bn; ++c) init[c] = c < width ? bias_of(a, c0 + c) : 0.0f;
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Isa::loadu(init + v * W);
  const float* x[R];
  for (int r = 0; r < R; ++r) x[r] = a.a + (m + r) * a.K;
  for (int64_t t = a.offsets[strip]; t < a.offsets[strip + 1]; ++t) {
    const int64_t k0 = static_cast<int64_t>(a.indices[t]) * bk;
    const int64_t kc = std::min(bk, a.K - k0);
    const float* w = a.values + t * bk * bn;
    for (int64_t kk = 0; kk < kc; ++kk, w += bn) {
      F wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Isa::loadu(w + v * W);
      for (int r = 0; r < R; ++r) {
        const F xv = Isa::set1(x[r][k0 + kk]);
        for (int v = 0; v < NV; ++v) acc[r][v] = Isa::fmadd(xv, wv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* y = a.y + (m + r) * a.N + c0;
    if (width == bn) {
      for (int v = 0; v < NV; ++v) Isa::storeu(y + v * W, acc[r][v]);
    } else {
      alignas(64) float out[NV * W];
      for (int v = 0; v < NV; ++v) Isa::storeu(out + v * W, acc[r][v]);
      std::copy(out, out + width, y);
    }
  }
}

template <int NV>
static void blocked_rows_nv(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t bn = NV * W;
  for (int64_t strip = n0 / bn; strip * bn < n1; ++strip) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) blocked_strip<NV, 4>(a, m, strip);
    for (; m < m1; ++m) blocked_strip<NV, 1>(a, m, strip);
  }
}

// Any other block_n: scalar, like the portable kernel.
static void blocked_rows_any(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t bk = a.block_k, bn = a.block_n;
  float acc[64];
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
        for (int64_t kk = 0; kk < kc; ++kk)
          for (int64_t c = 0; c < bn; ++c) acc[c] += x[k0 + kk] * v[kk * bn + c];
      }
      std::copy(acc, acc + width, a.y + m * a.N + c0);
    }
  }
}

static void rows(const SpmmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (a.format) {
    case SparseFormat::kCsr: csr_rows(a, m0, m1, n0, n1); break;
    case SparseFormat::kTwoFour: two_four_rows(a, m0, m1, n0, n1); break;
    case SparseFormat::kBlocked:
      if (a.block_n == W) blocked_rows_nv<1>(a, m0, m1, n0, n1);
      else if (a.block_n == 2 * W) blocked_rows_nv<2>(a, m0, m1, n0, n1);
      else blocked_rows_any(a, m0, m1, n0, n1);
      break;
  }
}

// ------------------------------------------------------------------ tile kernels

// acc_lo/acc_hi += v * at[k][0 : 2W]
#define ONNXSHRINK_SPMM_STEP(v, k, lo, hi)                            \
  do {                                                                \
    const F vv = Isa::set1(v);                                        \
    const float* p = at + static_cast<int64_t>(k) * kTileRows;        \
    lo = Isa::fmadd(vv, Isa::loadu(p), lo);                           \
    hi = Isa::fmadd(vv, Isa::loadu(p + W), hi);                       \
  } while (0)

static inline void store_tile_column(const SpmmArgs& a, int64_t tile_index, int64_t n, F lo, F hi) {
  alignas(64) float out[kTileRows];
  Isa::storeu(out, lo);
  Isa::storeu(out + W, hi);
  const int64_t m0 = tile_index * kTileRows;
  const int64_t count = std::min(kTileRows, a.M - m0);
  const float b = bias_of(a, n);
  float* y = a.y + m0 * a.N + n;
  for (int64_t r = 0; r < count; ++r) y[r * a.N] = out[r] + b;
}

static void tile(const SpmmArgs& a, int64_t tile_index, int64_t n0, int64_t n1) {
  const float* at = a.a_tiles + tile_index * a.K * kTileRows;
  for (int64_t n = n0; n < n1; ++n) {
    // Four independent pairs of accumulators hide the multiply-add latency.
    F a0 = Isa::zero(), a1 = Isa::zero(), b0 = Isa::zero(), b1 = Isa::zero();
    F c0 = Isa::zero(), c1 = Isa::zero(), d0 = Isa::zero(), d1 = Isa::zero();
    if (a.format == SparseFormat::kCsr) {
      const float* v = a.values;
      const uint16_t* ix = a.indices;
      const int64_t j1 = a.offsets[n + 1];
      int64_t j = a.offsets[n];
      for (; j + 4 <= j1; j += 4) {
        ONNXSHRINK_SPMM_STEP(v[j], ix[j], a0, a1);
        ONNXSHRINK_SPMM_STEP(v[j + 1], ix[j + 1], b0, b1);
        ONNXSHRINK_SPMM_STEP(v[j + 2], ix[j + 2], c0, c1);
        ONNXSHRINK_SPMM_STEP(v[j + 3], ix[j + 3], d0, d1);
      }
      for (; j < j1; ++j) ONNXSHRINK_SPMM_STEP(v[j], ix[j], a0, a1);
    } else {  // 2:4
      const float* v = a.values + n * a.groups * 2;
      const uint16_t* meta = a.indices + n * a.meta_words;
      int64_t g = 0;
      for (; g + 2 <= a.groups; g += 2) {
        const unsigned w0 = static_cast<unsigned>(meta[g >> 2]) >> (4 * (g & 3));
        const unsigned w1 = static_cast<unsigned>(meta[(g + 1) >> 2]) >> (4 * ((g + 1) & 3));
        ONNXSHRINK_SPMM_STEP(v[2 * g], 4 * g + (w0 & 3), a0, a1);
        ONNXSHRINK_SPMM_STEP(v[2 * g + 1], 4 * g + ((w0 >> 2) & 3), b0, b1);
        ONNXSHRINK_SPMM_STEP(v[2 * g + 2], 4 * g + 4 + (w1 & 3), c0, c1);
        ONNXSHRINK_SPMM_STEP(v[2 * g + 3], 4 * g + 4 + ((w1 >> 2) & 3), d0, d1);
      }
      for (; g < a.groups; ++g) {
        const unsigned w0 = static_cast<unsigned>(meta[g >> 2]) >> (4 * (g & 3));
        ONNXSHRINK_SPMM_STEP(v[2 * g], 4 * g + (w0 & 3), a0, a1);
        ONNXSHRINK_SPMM_STEP(v[2 * g + 1], 4 * g + ((w0 >> 2) & 3), b0, b1);
      }
    }
    store_tile_column(a, tile_index, n, Isa::add(Isa::add(a0, b0), Isa::add(c0, d0)),
                      Isa::add(Isa::add(a1, b1), Isa::add(c1, d1)));
  }
}
#undef ONNXSHRINK_SPMM_STEP

static void pack_tile(const SpmmArgs& a, int64_t tile_index) {
  float* at = a.a_tiles + tile_index * a.K * kTileRows;
  const int64_t m0 = tile_index * kTileRows;
  for (int64_t r = 0; r < kTileRows; ++r) {
    const float* x = m0 + r < a.M ? a.a + (m0 + r) * a.K : nullptr;
    for (int64_t k = 0; k < a.K; ++k) at[k * kTileRows + r] = x ? x[k] : 0.0f;
  }
}

static const SpmmKernels& kernels(const char* isa_name) {
  static const SpmmKernels table{isa_name, kTileRows, &rows, &tile, &pack_tile};
  return table;
}

}  // namespace ONNXSHRINK_SPMM_NAMESPACE
}  // namespace onnxshrink
