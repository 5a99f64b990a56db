// LowBitMatMul kernels written once for any SIMD width. Each ISA translation
// unit (lowbit_matmul_avx2.cc, lowbit_matmul_avx512.cc) defines
// ONNXSHRINK_LOWBIT_NAMESPACE and, in that namespace, a `struct Isa` with the
// vector types and operations used below (notably `decode<BITS>`, which turns
// W packed codes into W int32 lanes), then includes this header; it is
// compiled with that ISA's -m flags and called only after a CPUID check.
//   gemv  M < kGemmMinRows (12): every code is decoded in registers, converted
//         (code - zero point, exact in int32) and multiplied into up to 4 rows
//         at once; one scale multiply per block. Reads each weight byte once:
//         at M = 1 this is bound by weight bandwidth.
//   gemm  M >= kGemmMinRows: a k-chunk of 2W columns is dequantized into a
//         float panel, then a 6 x 2W register-blocked kernel runs every row
//         of A over it, so decoding costs 1/M of the multiply.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lowbit_matmul_args.h"

#ifndef ONNXSHRINK_LOWBIT_NAMESPACE
#error "define ONNXSHRINK_LOWBIT_NAMESPACE before including lowbit_matmul_simd.h"
#endif

namespace onnxshrink {
namespace ONNXSHRINK_LOWBIT_NAMESPACE {

constexpr int W = Isa::W;
constexpr int64_t kPanel = 2 * W;  // gemm panel width (columns)
constexpr int kMr = 6;             // gemm rows per register block
using F = Isa::F;
using I = Isa::I;

inline float* scratch(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// Isa interface used below, for BITS in {2, 3, 4, 8}:
//   raw<BITS>(block, g)   codes [g W, g W + W) of a block in the low BITS bits of
//                         W int32 lanes (higher bits: garbage). May read up to
//                         3 bytes past the block (see `Blocks`).
//   linear<BITS>(raw)     float(code - base<BITS>()) per lane, exact.
//   Lut<BITS>::lookup(raw) codebook[code] per lane.
//   transpose_store(rows, dst, stride)  dst[i * stride + j] = rows[j][i], i, j < W.

// Block b of column n. raw() may read a few bytes past a block, which is
// harmless inside the tensor but not past its end, so the tensor's very last
// block is read from a zero-padded copy. No calls on the hot path: a call
// would make the compiler spill every vector accumulator around it.
struct Blocks {
  const uint8_t* codes;
  int64_t n_blocks, block_bytes, last_n, last_b;
  const uint8_t* padded_last;
  Blocks(const LbArgs& a, std::vector<uint8_t>& buffer)
      : codes(a.codes), n_blocks(a.n_blocks), block_bytes(a.block_bytes), last_n(a.N - 1), last_b(a.n_blocks - 1) {
    buffer.assign(static_cast<size_t>(block_bytes + 8), 0);
    if (a.N > 0 && a.n_blocks > 0)
      std::memcpy(buffer.data(), codes + (last_n * n_blocks + last_b) * block_bytes, static_cast<size_t>(block_bytes));
    padded_last = buffer.data();
  }
  const uint8_t* get(int64_t n, int64_t b) const {
    return (n == last_n && b == last_b) ? padded_last : codes + (n * n_blocks + b) * block_bytes;
  }
};

// ------------------------------------------------------------------ gemv

// Rows [m, m + R) of A (copied into xs, R rows of kp floats, zero past K;
// xsum[r * n_blocks + b] = sum of row r over block b), C columns at a time
// from n0 (n1 - n0 a multiple of C). Linear weights: sum_k (code - zp) x =
// sum_k (code - base) x - (zp - base) xsum, the first term vectorised per
// block and scaled once, the second a scalar (SHIFT: only when some zp differs
// from base). Block pointers advance by block_bytes; the tensor's last column
// comes from a zero-padded copy since raw() may read past a block's end.
template <int BITS, bool LUT, int R, int G, int C, bool SHIFT>
static void gemv_rows(const LbArgs& a, const uint8_t* padded_last_column, int64_t m, const float* xs, const float* xsum,
                      int64_t kp, int64_t n0, int64_t n1) {
  const int64_t groups = G ? G : a.block / W;
  const int default_zp = 1 << (BITS - 1);
  const int base = Isa::template base<BITS>();
  const int64_t column_bytes = a.n_blocks * a.block_bytes;
  for (int64_t n = n0; n < n1; n += C) {
    F total[C][R];
    float correction[C][R];
    const uint8_t* block[C];
    const float* scales[C];
    const uint8_t* zps[C];
    typename Isa::template Lut<BITS> lut[C];
    for (int c = 0; c < C; ++c) {
      for (int r = 0; r < R; ++r) {
        total[c][r] = Isa::zero();
        correction[c][r] = 0.0f;
      }
      block[c] = n + c == a.N - 1 ? padded_last_column : a.codes + (n + c) * column_bytes;
      scales[c] = a.scales + (n + c) * a.n_blocks;
      zps[c] = a.zero_points ? a.zero_points + (n + c) * a.n_blocks : nullptr;
      if (LUT) lut[c].load(a.codebook + (n + c) * a.codebook_stride);
    }
    for (int64_t b = 0; b < a.n_blocks; ++b) {
      const float* x = xs + b * a.block;
      if (LUT) {
        for (int64_t t = 0; t < groups; ++t) {
          for (int c = 0; c < C; ++c) {
            const F w = lut[c].lookup(Isa::template raw<BITS>(block[c], t));
            for (int r = 0; r < R; ++r) total[c][r] = Isa::fmadd(w, Isa::loadu(x + r * kp + t * W), total[c][r]);
          }
        }
      } else {
        F acc[C][R];
        for (int c = 0; c < C; ++c)
          for (int r = 0; r < R; ++r) acc[c][r] = Isa::zero();
        for (int64_t t = 0; t < groups; ++t) {
          F xv[R];
          for (int r = 0; r < R; ++r) xv[r] = Isa::loadu(x + r * kp + t * W);
          for (int c = 0; c < C; ++c) {
            const F w = Isa::template linear<BITS>(Isa::template raw<BITS>(block[c], t));
            for (int r = 0; r < R; ++r) acc[c][r] = Isa::fmadd(w, xv[r], acc[c][r]);
          }
        }
        for (int c = 0; c < C; ++c) {
          const float scale = scales[c][b];
          const F sv = Isa::set1(scale);
          for (int r = 0; r < R; ++r) total[c][r] = Isa::fmadd(acc[c][r], sv, total[c][r]);
          if (SHIFT) {
            const float shift = scale * static_cast<float>((zps[c] ? zps[c][b] : default_zp) - base);
            for (int r = 0; r < R; ++r) correction[c][r] += shift * xsum[r * a.n_blocks + b];
          }
        }
      }
      for (int c = 0; c < C; ++c) {
        // The next columns' codes and scales, one pass of C columns ahead: at
        // M = 1 the weights stream from DRAM and the hardware prefetcher alone
        // left them latency-bound (3 GB/s of the core's ~12, measured).
        Isa::prefetch(block[c] + C * column_bytes);
        Isa::prefetch(scales[c] + C * a.n_blocks + b);
        block[c] += a.block_bytes;
      }
    }
    for (int c = 0; c < C; ++c) {
      const float bias = a.bias ? a.bias[n + c] : 0.0f;
      for (int r = 0; r < R; ++r) a.y[(m + r) * a.N + n + c] = bias + (Isa::hsum(total[c][r]) - correction[c][r]);
    }
  }
}

// Two columns at a time where the registers allow (R <= 2), the odd one alone.
template <int BITS, bool LUT, int R, int G, bool SHIFT>
static void gemv_columns(const LbArgs& a, const uint8_t* padded_last_column, int64_t m, const float* xs,
                         const float* xsum, int64_t kp, int64_t n0, int64_t n1) {
  constexpr int C = R <= 2 ? 2 : 1;
  const int64_t paired = n0 + (n1 - n0) / C * C;
  gemv_rows<BITS, LUT, R, G, C, SHIFT>(a, padded_last_column, m, xs, xsum, kp, n0, paired);
  if (paired < n1) gemv_rows<BITS, LUT, R, G, 1, SHIFT>(a, padded_last_column, m, xs, xsum, kp, paired, n1);
}

template <int BITS, bool LUT, int R, int G>
static void gemv_shift(const LbArgs& a, const uint8_t* padded_last_column, int64_t m, const float* xs,
                       const float* xsum, int64_t kp, int64_t n0, int64_t n1) {
  const bool shift = !LUT && (a.zero_points || (1 << (BITS - 1)) != Isa::template base<BITS>());
  if (shift) gemv_columns<BITS, LUT, R, G, true>(a, padded_last_column, m, xs, xsum, kp, n0, n1);
  else gemv_columns<BITS, LUT, R, G, false>(a, padded_last_column, m, xs, xsum, kp, n0, n1);
}

template <int BITS, bool LUT, int R>
static void gemv_groups(const LbArgs& a, const uint8_t* padded_last_column, int64_t m, const float* xs,
                        const float* xsum, int64_t kp, int64_t n0, int64_t n1) {
  switch (a.block / W) {
    case 2: gemv_shift<BITS, LUT, R, 2>(a, padded_last_column, m, xs, xsum, kp, n0, n1); break;
    case 4: gemv_shift<BITS, LUT, R, 4>(a, padded_last_column, m, xs, xsum, kp, n0, n1); break;
    case 8: gemv_shift<BITS, LUT, R, 8>(a, padded_last_column, m, xs, xsum, kp, n0, n1); break;
    default: gemv_shift<BITS, LUT, R, 0>(a, padded_last_column, m, xs, xsum, kp, n0, n1); break;
  }
}

template <int BITS, bool LUT>
static void gemv_bits(const LbArgs& a, int64_t n0, int64_t n1) {
  thread_local std::vector<float> buffer, sums;
  thread_local std::vector<uint8_t> last_column;
  const int64_t column_bytes = a.n_blocks * a.block_bytes;
  if (n1 == a.N) {  // this task reads the tensor's last column: give it 8 bytes of zero padding
    last_column.assign(static_cast<size_t>(column_bytes + 8), 0);
    std::memcpy(last_column.data(), a.codes + (a.N - 1) * column_bytes, static_cast<size_t>(column_bytes));
  }
  const int64_t kp = a.n_blocks * a.block;  // whole blocks: the padding codes meet zeros
  for (int64_t m = 0; m < a.M;) {
    const int rows = static_cast<int>(std::min<int64_t>(4, a.M - m));
    float* xs = scratch(buffer, rows * kp);
    float* xsum = scratch(sums, rows * a.n_blocks);
    for (int r = 0; r < rows; ++r) {
      float* x = xs + r * kp;
      std::memcpy(x, a.a + (m + r) * a.K, static_cast<size_t>(a.K) * sizeof(float));
      std::fill(x + a.K, x + kp, 0.0f);
      for (int64_t b = 0; b < a.n_blocks; ++b) {
        float s = 0.0f;
        for (int64_t i = 0; i < a.block; ++i) s += x[b * a.block + i];
        xsum[r * a.n_blocks + b] = s;
      }
    }
    switch (rows) {
      case 4: gemv_groups<BITS, LUT, 4>(a, last_column.data(), m, xs, xsum, kp, n0, n1); break;
      case 3: gemv_groups<BITS, LUT, 3>(a, last_column.data(), m, xs, xsum, kp, n0, n1); break;
      case 2: gemv_groups<BITS, LUT, 2>(a, last_column.data(), m, xs, xsum, kp, n0, n1); break;
      default: gemv_groups<BITS, LUT, 1>(a, last_column.data(), m, xs, xsum, kp, n0, n1); break;
    }
    m += rows;
  }
}

// ------------------------------------------------------------------ gemm

// Dequantizes W[k0 : k0 + kc, p0 : p0 + nc] (k0 block-aligned) into
// panel[kc][kPanel], columns past nc zero: W columns at a time, W x W tiles
// transposed in registers so that the panel is written with vector stores.
template <int BITS, bool LUT>
static void dequantize_panel(const LbArgs& a, const Blocks& blocks, int64_t p0, int64_t nc, int64_t k0, int64_t kc,
                             float* panel) {
  const int default_zp = 1 << (BITS - 1);
  const int base = Isa::template base<BITS>();
  const int64_t groups_total = (kc + W - 1) / W;
  for (int64_t c0 = 0; c0 < kPanel; c0 += W) {
    typename Isa::template Lut<BITS> luts[W];
    if (LUT) {
      for (int j = 0; j < W; ++j)
        if (c0 + j < nc) luts[j].load(a.codebook + (p0 + c0 + j) * a.codebook_stride);
    }
    for (int64_t gi = 0; gi < groups_total; ++gi) {
      const int64_t k = k0 + gi * W;
      const int64_t b = k / a.block, t = (k % a.block) / W;
      F rows[W];
      for (int j = 0; j < W; ++j) {
        const int64_t n = p0 + c0 + j;
        if (c0 + j >= nc) {
          rows[j] = Isa::zero();
          continue;
        }
        const uint8_t* block = blocks.get(n, b);
        if (LUT) {
          rows[j] = luts[j].lookup(Isa::template raw<BITS>(block, t));
        } else {
          const int zp = a.zero_points ? a.zero_points[n * a.n_blocks + b] : default_zp;
          // (code - base - (zp - base)) * scale: exact integers, one multiply, like the reference.
          const F w = Isa::add(Isa::template linear<BITS>(Isa::template raw<BITS>(block, t)),
                               Isa::set1(static_cast<float>(base - zp)));
          rows[j] = Isa::mul(w, Isa::set1(a.scales[n * a.n_blocks + b]));
        }
      }
      Isa::transpose_store(rows, panel + gi * W * kPanel + c0, kPanel);
    }
  }
}

// C[MR rows, kPanel] (+)= A[MR rows, kc] x panel[kc, kPanel]; `first` starts
// from the bias instead of C. Columns past nc are computed but not stored.
template <int MR>
static void micro_kernel(const float* a, int64_t lda, const float* panel, int64_t kc, float* c, int64_t ldc,
                         int64_t nc, bool first, const float* bias_panel) {
  F acc[MR][2];
  for (int i = 0; i < MR; ++i) {
    if (first) {
      acc[i][0] = Isa::loadu(bias_panel);
      acc[i][1] = Isa::loadu(bias_panel + W);
    } else if (nc == kPanel) {
      acc[i][0] = Isa::loadu(c + i * ldc);
      acc[i][1] = Isa::loadu(c + i * ldc + W);
    } else {
      alignas(64) float tmp[kPanel] = {};
      std::copy(c + i * ldc, c + i * ldc + nc, tmp);
      acc[i][0] = Isa::loadu(tmp);
      acc[i][1] = Isa::loadu(tmp + W);
    }
  }
  for (int64_t kk = 0; kk < kc; ++kk) {
    const F b0 = Isa::loadu(panel + kk * kPanel);
    const F b1 = Isa::loadu(panel + kk * kPanel + W);
    for (int i = 0; i < MR; ++i) {
      const F av = Isa::set1(a[i * lda + kk]);
      acc[i][0] = Isa::fmadd(av, b0, acc[i][0]);
      acc[i][1] = Isa::fmadd(av, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    if (nc == kPanel) {
      Isa::storeu(c + i * ldc, acc[i][0]);
      Isa::storeu(c + i * ldc + W, acc[i][1]);
    } else {
      alignas(64) float tmp[kPanel];
      Isa::storeu(tmp, acc[i][0]);
      Isa::storeu(tmp + W, acc[i][1]);
      std::copy(tmp, tmp + nc, c + i * ldc);
    }
  }
}

template <int BITS, bool LUT>
static void gemm_bits(const LbArgs& a, int64_t n0, int64_t n1) {
  thread_local std::vector<float> panel_buf;
  thread_local std::vector<uint8_t> last_block;
  // k-chunks of whole blocks, ~256 deep: the panel (16-32 KB) stays in L1/L2
  // while every row of A streams over it.
  const int64_t kc_max = std::max<int64_t>(a.block, 256 / a.block * a.block);
  float* panel = scratch(panel_buf, (kc_max + W) * kPanel);
  alignas(64) float bias_panel[kPanel];
  const Blocks blocks(a, last_block);
  for (int64_t p0 = n0; p0 < n1; p0 += kPanel) {
    const int64_t nc = std::min<int64_t>(kPanel, n1 - p0);
    for (int64_t j = 0; j < kPanel; ++j) bias_panel[j] = (j < nc && a.bias) ? a.bias[p0 + j] : 0.0f;
    for (int64_t k0 = 0; k0 < a.K; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, a.K - k0);  // rows past K are never read from A
      dequantize_panel<BITS, LUT>(a, blocks, p0, nc, k0, kc, panel);
      const bool first = k0 == 0;
      int64_t m = 0;
      const float* arow = a.a + k0;
      float* crow = a.y + p0;
      for (; m + kMr <= a.M; m += kMr)
        micro_kernel<kMr>(arow + m * a.K, a.K, panel, kc, crow + m * a.N, a.N, nc, first, bias_panel);
      switch (a.M - m) {
        case 5: micro_kernel<5>(arow + m * a.K, a.K, panel, kc, crow + m * a.N, a.N, nc, first, bias_panel); break;
        case 4: micro_kernel<4>(arow + m * a.K, a.K, panel, kc, crow + m * a.N, a.N, nc, first, bias_panel); break;
        case 3: micro_kernel<3>(arow + m * a.K, a.K, panel, kc, crow + m * a.N, a.N, nc, first, bias_panel); break;
        case 2: micro_kernel<2>(arow + m * a.K, a.K, panel, kc, crow + m * a.N, a.N, nc, first, bias_panel); break;
        case 1: micro_kernel<1>(arow + m * a.K, a.K, panel, kc, crow + m * a.N, a.N, nc, first, bias_panel); break;
        default: break;
      }
    }
    if (a.K == 0) {  // no k-chunk ran: Y is the bias
      for (int64_t m = 0; m < a.M; ++m) std::copy(bias_panel, bias_panel + nc, a.y + m * a.N + p0);
    }
  }
}

// ------------------------------------------------------------------ dispatch on bits

template <bool LUT>
static void gemv_any(const LbArgs& a, int64_t n0, int64_t n1) {
  switch (a.bits) {
    case 2: gemv_bits<2, LUT>(a, n0, n1); break;
    case 3: gemv_bits<3, LUT>(a, n0, n1); break;
    case 4: gemv_bits<4, LUT>(a, n0, n1); break;
    default: gemv_bits<8, LUT>(a, n0, n1); break;
  }
}

template <bool LUT>
static void gemm_any(const LbArgs& a, int64_t n0, int64_t n1) {
  switch (a.bits) {
    case 2: gemm_bits<2, LUT>(a, n0, n1); break;
    case 3: gemm_bits<3, LUT>(a, n0, n1); break;
    case 4: gemm_bits<4, LUT>(a, n0, n1); break;
    default: gemm_bits<8, LUT>(a, n0, n1); break;
  }
}

static void gemv(const LbArgs& a, int64_t n0, int64_t n1) {
  if (a.codebook) gemv_any<true>(a, n0, n1);
  else gemv_any<false>(a, n0, n1);
}

static void gemm(const LbArgs& a, int64_t n0, int64_t n1) {
  if (a.codebook) gemm_any<true>(a, n0, n1);
  else gemm_any<false>(a, n0, n1);
}

// This ISA's float kernels with the given int8 ones (callers keep the table in a static).
static LbKernels kernels(const char* isa_name, void (*prepare_int8)(const LbArgs&, int64_t, int64_t),
                         void (*gemv_int8)(const LbArgs&, int64_t, int64_t), bool (*int8_takes)(int, int64_t)) {
  return LbKernels{isa_name, kPanel, &gemv, &gemm, prepare_int8, gemv_int8, int8_takes};
}

}  // namespace ONNXSHRINK_LOWBIT_NAMESPACE
}  // namespace onnxshrink
