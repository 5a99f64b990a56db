// AVX-512 VNNI gemv for float activations x 2-bit linear weights (M <
// kGemmMinRows). Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni
// and only called after a CPUID check (it serves the avx512_bf16 table).
//
// Why: through bf16 (lowbit_matmul_bf16.cc) every weight costs two products,
// hi and lo, at 32 per instruction, so 2 bits ran no faster than 4. Here each
// activation becomes two int8 digits of its block's scale: with amax the
// block's largest |x|, sx = amax / 127 and t = x / sx,
//   q1 = rint(t), q2 = rint(254 (t - q1)),   x ~ sx (q1 + q2 / 254),
// both digits within [-127, 127], the error at most amax / 64516 (2^-16 amax)
// per term: inside the op's 1e-4 contract, though coarser than bf16's 2^-17 |x|
// for the small values of a block with a large one. Then vpdpbusd multiplies
// 64 codes (u8) by 64 digits (s8) into int32 lanes, exactly: two instructions
// per 64 weights instead of four, and the codes need only a shift and a mask
// per plane, no table lookup.
//
// Layout: a span is 64 code bytes, 256 codes; plane p holds code 4 j + p in
// byte j (two bits each, masked out), and prepare_row lays out each plane's
// digits in that order. vpdpbusd lane i adds bytes 4i .. 4i + 3 of a plane,
// codes [16 i, 16 i + 16) over the four planes: one block per lane (blocks are
// multiples of 16), so scales and zero points apply per lane.
//   Y = bias + sum over lanes of scale * (sx / 254) * (254 D1 + D2 - zp Z),
// D1, D2 the lane's digit dot products, Z its sum of 254 q1 + q2.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lowbit_gemv_passes.h"
#include "lowbit_matmul_args.h"

namespace onnxshrink {
namespace {

constexpr int kPlanes = 4;
constexpr int64_t kSpan = 256;    // codes per 64 code bytes
constexpr float kDigit = 254.0f;  // |t - q1| <= 1/2 keeps rint(254 (t - q1)) within int8
// Per row and span, lanes [3][16]: sx / 254 of each lane's block, Z as a
// float, and -base * Z as an int32 (the default zero point's term, the start
// of D2's accumulator).
constexpr int64_t kLaneFloats = 48;

inline int64_t span_count(const LbArgs& a) { return (a.n_blocks * a.block + kSpan - 1) / kSpan; }

// Row x of A: digits [span][plane][q1, q2][64] and lanes [span][kLaneFloats].
void prepare_row(const LbArgs& a, const float* x, int64_t spans, int8_t* digits, float* lanes) {
  const int64_t kp = spans * kSpan;
  thread_local std::vector<int8_t> q1, q2;
  thread_local std::vector<float> sx;
  q1.assign(static_cast<size_t>(kp), 0);
  q2.assign(static_cast<size_t>(kp), 0);
  sx.assign(static_cast<size_t>(a.n_blocks), 0.0f);
  for (int64_t b = 0; b < a.n_blocks; ++b) {
    const int64_t k0 = b * a.block;
    auto load = [&](int64_t i) {
      const int64_t left = std::clamp<int64_t>(a.K - k0 - i, 0, 16);
      return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left) - 1u), x + k0 + i);
    };
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < a.block; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load(i)));
    const float amax = _mm512_reduce_max_ps(vmax);
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    sx[b] = amax / 127.0f;
    for (int64_t i = 0; i < a.block; i += 16) {
      const __m512 t = _mm512_mul_ps(load(i), inv);
      const __m512i d1 = _mm512_cvtps_epi32(t);  // nearest even
      const __m512 rest = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(d1)), _mm512_set1_ps(kDigit));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q1.data() + k0 + i), _mm512_cvtepi32_epi8(d1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q2.data() + k0 + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(rest)));
    }
  }
  const int base = 2;  // the default zero point of 2-bit codes
  for (int64_t s = 0; s < spans; ++s) {
    int8_t* span = digits + s * kSpan * 2;
    const int64_t k0 = s * kSpan;
    for (int p = 0; p < kPlanes; ++p) {
      for (int j = 0; j < 64; ++j) {
        span[(2 * p) * 64 + j] = q1[k0 + 4 * j + p];
        span[(2 * p + 1) * 64 + j] = q2[k0 + 4 * j + p];
      }
    }
    float* lane = lanes + s * kLaneFloats;
    for (int i = 0; i < 16; ++i) {
      const int64_t first = k0 + 16 * i, block = first / a.block;
      int32_t z = 0;
      for (int64_t k = first; k < first + 16; ++k) z += 254 * q1[k] + q2[k];
      lane[i] = block < a.n_blocks ? sx[block] / kDigit : 0.0f;
      lane[16 + i] = static_cast<float>(z);
      const int32_t start = -base * z;
      std::memcpy(lane + 32 + i, &start, 4);
    }
  }
}

// Rows [m, m + R) of Y, columns [n0, n1) C at a time, from the prepared rows;
// `padded_last` as lowbit_gemv_passes.h gives it (a span reads 64 bytes).
template <int R, int C, bool ZP>
void gemv_rows(const LbArgs& a, const uint8_t* padded_last, int64_t m, int64_t n0, int64_t n1) {
  const int64_t spans = span_count(a);
  const int64_t column_bytes = a.n_blocks * a.block_bytes;
  alignas(64) int32_t lane_block[16];
  for (int i = 0; i < 16; ++i) lane_block[i] = static_cast<int32_t>(a.block >= kSpan ? 0 : 16 * i / a.block);
  const __m512i lane_index = _mm512_load_si512(lane_block);
  const int64_t blocks_per_span = a.block >= kSpan ? 1 : kSpan / a.block;
  const __m512i two_bits = _mm512_set1_epi8(3);
  const int8_t* xd[R];
  const float* xl[R];
  for (int r = 0; r < R; ++r) {
    xd[r] = a.xdig + (m + r) * a.xdig_row;
    xl[r] = a.xdig_lanes + (m + r) * a.xdig_lanes_row;
  }
  for (int64_t n = n0; n < n1; n += C) {
    const uint8_t* col[C];
    const float* scales[C];
    const uint8_t* zps[C];
    __m512 total1[C][R], total2[C][R];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      col[c] = n + c == a.N - 1 ? padded_last : a.codes + (n + c) * column_bytes;
      scales[c] = a.scales + (n + c) * a.n_blocks;
      zps[c] = ZP ? a.zero_points + (n + c) * a.n_blocks : nullptr;
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) total1[c][r] = total2[c][r] = _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < spans; ++s) {
      const int64_t b0 = a.block >= kSpan ? s * kSpan / a.block : s * blocks_per_span;
      const int64_t valid = std::min<int64_t>(blocks_per_span, a.n_blocks - b0);
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const uint8_t* bytes = col[c] + s * 64;
        // The next pass's columns (C ahead) into L2, as in the BF16 kernel.
        _mm_prefetch(reinterpret_cast<const char*>(bytes + C * column_bytes), _MM_HINT_T1);
        if ((s & 1) == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(scales[c] + b0 + C * a.n_blocks), _MM_HINT_T1);
          if (ZP) _mm_prefetch(reinterpret_cast<const char*>(zps[c] + b0 + C * a.n_blocks), _MM_HINT_T1);
        }
        const __m512i v = _mm512_loadu_si512(bytes);
        const __m512i plane[kPlanes] = {_mm512_and_si512(v, two_bits),
                                        _mm512_and_si512(_mm512_srli_epi16(v, 2), two_bits),
                                        _mm512_and_si512(_mm512_srli_epi16(v, 4), two_bits),
                                        _mm512_and_si512(_mm512_srli_epi16(v, 6), two_bits)};
        // Lanes of blocks past the tensor's last read a zero scale (masked load).
        const __m512 scale = _mm512_permutexvar_ps(lane_index, _mm512_maskz_loadu_ps(mask, scales[c] + b0));
        __m512 zp = _mm512_setzero_ps();
        if (ZP) {
          const __m512i z = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, zps[c] + b0));
          zp = _mm512_cvtepi32_ps(_mm512_permutexvar_epi32(lane_index, z));
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const int8_t* d = xd[r] + s * kSpan * 2;
          const float* lane = xl[r] + s * kLaneFloats;
          __m512i d1 = _mm512_setzero_si512();
          // The default zero point's term starts D2's sum; explicit ones are subtracted below.
          __m512i d2 = ZP ? _mm512_setzero_si512() : _mm512_loadu_si512(lane + 32);
#pragma GCC unroll 4
          for (int p = 0; p < kPlanes; ++p) {
            d1 = _mm512_dpbusd_epi32(d1, plane[p], _mm512_loadu_si512(d + (2 * p) * 64));
            d2 = _mm512_dpbusd_epi32(d2, plane[p], _mm512_loadu_si512(d + (2 * p + 1) * 64));
          }
          const __m512 w = _mm512_mul_ps(scale, _mm512_loadu_ps(lane));
          __m512 second = _mm512_cvtepi32_ps(d2);
          if (ZP) second = _mm512_fnmadd_ps(zp, _mm512_loadu_ps(lane + 16), second);
          total1[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), w, total1[c][r]);
          total2[c][r] = _mm512_fmadd_ps(second, w, total2[c][r]);
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      const float bias = a.bias ? a.bias[n + c] : 0.0f;
      for (int r = 0; r < R; ++r) {
        const __m512 sum = _mm512_fmadd_ps(total1[c][r], _mm512_set1_ps(kDigit), total2[c][r]);
        a.y[(m + r) * a.N + n + c] = bias + _mm512_reduce_add_ps(sum);
      }
    }
  }
}

// gemv_rows for gemv_passes (a function template cannot be its argument).
struct DigitRows {
  template <int R, int C, bool ZP>
  static void rows(const LbArgs& a, const uint8_t* padded_last, int64_t m, int64_t n0, int64_t n1) {
    gemv_rows<R, C, ZP>(a, padded_last, m, n0, n1);
  }
};

}  // namespace

// Takes 2 bits, linear weights, blocks that tile a span evenly (one divides
// the other: 16 .. 512), M < kGemmMinRows. The rows live in buffers of the
// calling thread, which waits for the column tasks.
void lowbit_prepare_digits(LbArgs& a) {
  a.xdig = nullptr;
  if (a.codebook || a.bits != 2 || a.M >= kGemmMinRows) return;
  if (a.block % kSpan != 0 && kSpan % a.block != 0) return;
  thread_local std::vector<int8_t> digits;
  thread_local std::vector<float> lanes;
  const int64_t spans = span_count(a);
  a.xdig_row = spans * kSpan * 2;
  a.xdig_lanes_row = spans * kLaneFloats;
  digits.resize(static_cast<size_t>(a.M * a.xdig_row));
  lanes.resize(static_cast<size_t>(a.M * a.xdig_lanes_row));
  for (int64_t m = 0; m < a.M; ++m)
    prepare_row(a, a.a + m * a.K, spans, digits.data() + m * a.xdig_row, lanes.data() + m * a.xdig_lanes_row);
  a.xdig = digits.data();
  a.xdig_lanes = lanes.data();
}

void lowbit_gemv_digits(const LbArgs& a, int64_t n0, int64_t n1) { gemv_passes<DigitRows, 64>(a, n0, n1); }

}  // namespace onnxshrink
