// AVX-512 BF16 gemv for float activations x 4-bit linear weights (M <
// kGemmMinRows). Compiled with -mavx512f -mavx512bw -mavx512bf16 and only
// called after a CPUID check. (2 bits: lowbit_matmul_digits.cc.)
//
// Why: the AVX-512 F gemv converts every code to float32 and spends about
// nine instructions per 16 weights on it, so at M = 1 it ran at half the
// speed the weight bytes allow. Here a "span" of 128 codes (64 bytes) is 32
// words of 4 codes each; a shift per plane puts code 4 j + p in the low bits of
// word j, one vpermw turns every word into the bf16 value (code - 8), exact
// for these small integers, and vdpbf16ps multiplies 32 of them at once.
//
// Accuracy: the op promises float32 activations, and bf16 keeps only 8 bits,
// so every activation is split into two bf16 parts, x = hi + lo (hi rounded
// from x, lo from x - hi). hi + lo carries 16 significant bits, and both
// products are accumulated in float32: the error per term is ~2^-17 |x w|,
// well inside the op's 1e-4 contract. It costs two vdpbf16ps per 32 weights,
// which is what two float32 FMAs would cost; the gain is in the decoding.
//
// Activation order: prepare_row() lays out each span's activations so that
// plane p's word j meets code 4 j + p. vdpbf16ps lane i adds words 2i and
// 2i + 1, that is codes [8 i, 8 i + 8): each lane stays inside one block
// (blocks are multiples of 16 codes), so scales and zero points apply per
// lane, gathered by one permute.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lowbit_gemv_passes.h"
#include "lowbit_matmul_args.h"

namespace onnxshrink {
namespace {

// A span: 128 codes in 64 bytes, as 32 words of 4 codes.
constexpr int kPlanes = 4;
constexpr int64_t kSpan = 128;
constexpr int64_t kSpanBytes = 64;
constexpr int kBase = 8;  // the default zero point of 4-bit codes

inline int64_t span_count(const LbArgs& a) { return (a.n_blocks * a.block + kSpan - 1) / kSpan; }

// One row of A in span order: out [span][plane][hi, lo][32] bf16 (zero past
// K) and, for zero points, sums [span][16]: the sum of x over lane i's codes.
void prepare_row(const float* x, int64_t K, int64_t spans, uint16_t* out, float* sums) {
  constexpr int P = kPlanes;
  constexpr int64_t S = kSpan;
  alignas(64) float natural[S];
  alignas(64) uint16_t hi[S], lo[S];
  for (int64_t s = 0; s < spans; ++s) {
    const int64_t k0 = s * S;
    for (int64_t i = 0; i < S; i += 16) {
      const int64_t left = std::clamp<int64_t>(K - k0 - i, 0, 16);
      const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left) - 1u), x + k0 + i);
      const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));  // nearest even
      const __m512 h_value = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      const __m256i l = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_sub_ps(v, h_value)));
      _mm512_store_ps(natural + i, v);
      _mm256_store_si256(reinterpret_cast<__m256i*>(hi + i), h);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lo + i), l);
    }
    uint16_t* span = out + s * S * 2;
    for (int p = 0; p < P; ++p) {
      for (int w = 0; w < 32; ++w) {
        span[(2 * p) * 32 + w] = hi[P * w + p];
        span[(2 * p + 1) * 32 + w] = lo[P * w + p];
      }
    }
    if (sums) {
      for (int lane = 0; lane < 16; ++lane) {
        float sum = 0.0f;
        for (int i = 0; i < 2 * P; ++i) sum += natural[2 * P * lane + i];
        sums[s * 16 + lane] = sum;
      }
    }
  }
}

// The bf16 bits of a small integer (exact).
inline uint16_t bf16_of(int v) {
  const float f = static_cast<float>(v);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

// vpermw table: entry j is bf16(float((j mod 16) - 8)). vpermw reads 5 index
// bits; the bit above the code is a neighbour's, and the repeat absorbs it.
__m512i code_table() {
  alignas(64) uint16_t t[32];
  for (int j = 0; j < 32; ++j) t[j] = bf16_of((j & 15) - kBase);
  return _mm512_load_si512(t);
}

// Rows [m, m + R) of Y, columns [n0, n1) C at a time, from the prepared rows;
// `padded_last` as lowbit_gemv_passes.h gives it (a span reads 64 bytes).
template <int R, int C, bool ZP>
void gemv_rows(const LbArgs& a, const uint8_t* padded_last, int64_t m, int64_t n0, int64_t n1) {
  constexpr int P = kPlanes;
  constexpr int64_t S = kSpan;
  const __m512i table = code_table();
  const int64_t spans = span_count(a);
  const int64_t column_bytes = a.n_blocks * a.block_bytes;
  // Lane i's block within its span, and the first block of span s.
  const int64_t lane_codes = 2 * P;
  alignas(64) int32_t lane_block[16];
  for (int i = 0; i < 16; ++i) lane_block[i] = static_cast<int32_t>(a.block >= S ? 0 : lane_codes * i / a.block);
  const __m512i lane_index = _mm512_load_si512(lane_block);
  const int64_t blocks_per_span = a.block >= S ? 1 : S / a.block;
  const __m512 base_f = _mm512_set1_ps(static_cast<float>(kBase));

  const uint16_t* xw[R];
  const float* xl[R];
  for (int r = 0; r < R; ++r) {
    xw[r] = a.xbf + (m + r) * a.xbf_row;
    xl[r] = ZP ? a.xbf_sums + (m + r) * a.xbf_sums_row : nullptr;
  }
  for (int64_t n = n0; n < n1; n += C) {
    const uint8_t* col[C];
    const float* scales[C];
    const uint8_t* zps[C];
    __m512 total[C][R];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      col[c] = n + c == a.N - 1 ? padded_last : a.codes + (n + c) * column_bytes;
      scales[c] = a.scales + (n + c) * a.n_blocks;
      zps[c] = ZP ? a.zero_points + (n + c) * a.n_blocks : nullptr;
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) total[c][r] = _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < spans; ++s) {
      const int64_t b0 = a.block >= S ? s * S / a.block : s * blocks_per_span;
      const int64_t valid = std::min<int64_t>(blocks_per_span, a.n_blocks - b0);
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
      // One accumulator per (column, row), fresh each span: the spans' chains
      // of vdpbf16ps are independent, so they overlap.
      __m512 acc[C][R];
      __m512i words[C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const uint8_t* bytes = col[c] + s * kSpanBytes;
        words[c] = _mm512_loadu_si512(bytes);
        // The next pass's columns (C ahead), codes and scales, a cache line
        // at a time, into L2: at M = 1 the weights stream from DRAM. Measured
        // at 4096 x 4096, 4 bits, caches flushed: no prefetch 1.03-1.12 ms,
        // into L1 (T0) 0.82-0.89, into L2 (T1) 0.51-0.57 (compute alone: 0.46).
        _mm_prefetch(reinterpret_cast<const char*>(bytes + C * column_bytes), _MM_HINT_T1);
        if ((s & 3) == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(scales[c] + b0 + C * a.n_blocks), _MM_HINT_T1);
          if (ZP) _mm_prefetch(reinterpret_cast<const char*>(zps[c] + b0 + C * a.n_blocks), _MM_HINT_T1);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
      }
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        __m512bh w[C];
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) {
          const __m512i plane = p == 0 ? words[c] : _mm512_srli_epi16(words[c], 4 * p);
          w[c] = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(plane, table));
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const uint16_t* xp = xw[r] + (s * P + p) * 64;
          const __m512bh hi = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xp));
          const __m512bh lo = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xp + 32));
#pragma GCC unroll 4
          for (int c = 0; c < C; ++c) {
            acc[c][r] = _mm512_dpbf16_ps(acc[c][r], w[c], hi);
            acc[c][r] = _mm512_dpbf16_ps(acc[c][r], w[c], lo);
          }
        }
      }
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        // Lanes of blocks past the tensor's last read a zero scale (masked load).
        const __m512 scale = _mm512_permutexvar_ps(lane_index, _mm512_maskz_loadu_ps(mask, scales[c] + b0));
        __m512 shift = _mm512_setzero_ps();
        if (ZP) {  // (zp - base) per lane: sum (code - zp) x = sum (code - base) x - (zp - base) sum x
          const __m512i z = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, zps[c] + b0));
          shift = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_permutexvar_epi32(lane_index, z)), base_f);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          __m512 dot = acc[c][r];
          if (ZP) dot = _mm512_fnmadd_ps(shift, _mm512_loadu_ps(xl[r] + s * 16), dot);
          total[c][r] = _mm512_fmadd_ps(dot, scale, total[c][r]);
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      const float bias = a.bias ? a.bias[n + c] : 0.0f;
      for (int r = 0; r < R; ++r) a.y[(m + r) * a.N + n + c] = bias + _mm512_reduce_add_ps(total[c][r]);
    }
  }
}

// gemv_rows for gemv_passes (a function template cannot be its argument).
struct Bf16Rows {
  template <int R, int C, bool ZP>
  static void rows(const LbArgs& a, const uint8_t* padded_last, int64_t m, int64_t n0, int64_t n1) {
    gemv_rows<R, C, ZP>(a, padded_last, m, n0, n1);
  }
};

}  // namespace

void lowbit_gemv_bf16(const LbArgs& a, int64_t n0, int64_t n1) { gemv_passes<Bf16Rows, 64>(a, n0, n1); }

// Takes 4 bits, linear weights, blocks that tile a span evenly (one divides
// the other: 16, 32, 64, 128, ...), M < kGemmMinRows. The rows live in
// buffers of the calling thread, which waits for the column tasks.
void lowbit_prepare_bf16(LbArgs& a) {
  a.xbf = nullptr;
  if (a.codebook || a.bits != 4 || a.M >= kGemmMinRows) return;  // 2 bits: lowbit_matmul_digits.cc
  if (a.block % kSpan != 0 && kSpan % a.block != 0) return;
  thread_local std::vector<uint16_t> words;
  thread_local std::vector<float> sums;
  const int64_t spans = span_count(a);
  a.xbf_row = spans * kSpan * 2;
  a.xbf_sums_row = a.zero_points ? spans * 16 : 0;
  words.resize(static_cast<size_t>(a.M * a.xbf_row));
  sums.resize(static_cast<size_t>(a.M * a.xbf_sums_row));
  for (int64_t m = 0; m < a.M; ++m) {
    uint16_t* out = words.data() + m * a.xbf_row;
    float* row_sums = a.zero_points ? sums.data() + m * a.xbf_sums_row : nullptr;
    prepare_row(a.a + m * a.K, a.K, spans, out, row_sums);
  }
  a.xbf = words.data();
  a.xbf_sums = sums.data();
}

}  // namespace onnxshrink
