// LowBitMatMul accuracy_level 4 (int8 activations) on 256-bit vectors, written
// once for two translation units: lowbit_matmul_avx2.cc (vpmaddubsw +
// vpmaddwd) and lowbit_matmul_vnni.cc (ONNXSHRINK_INT8_VNNI: vpdpbusd, which
// does both in one instruction, with int32 sums and no int16 stage). Each
// defines ONNXSHRINK_LOWBIT_NAMESPACE and includes lowbit_matmul_avx2_isa.h
// first. Entry points: int8_takes, int8_prepare, int8_gemv.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lowbit_matmul_args.h"

namespace onnxshrink {
namespace ONNXSHRINK_LOWBIT_NAMESPACE {

// The codes are read 32 bytes at a time (a "span": 128 codes at 2 bits, 64 at
// 4; 3 and 8 bits take 32 codes, 12 or 32 bytes). A 2- or 4-bit span splits
// into bit planes by one shift and one mask each: byte p of plane s holds code
// (8 / BITS) * p + s. prepare_int8 stores each span's activations in that
// same order, so one vpmaddubsw per plane (u8 codes x s8 activations, pairs
// summed in int16) and one vpmaddwd per span do all the multiply-adds, with no
// shuffle. 8-bit codes would saturate vpmaddubsw (2 * 255 * 127), so they take
// two 16-bit vpmaddwd instead.
//
// The block sums then stay in int32 lanes until 8 blocks of a column are done:
// a few vphaddd fold them into one vector, lane j = block j, so the zero point
// correction, the int -> float convert and the scale multiply are one vector
// op each per 8 blocks (scales[n, b..b+8] and sx[m, b..b+8] are contiguous)
// instead of scalar work per block, the cost that dominated at block 32.

// The helpers below pass vectors by pointer; unless inlined, GCC sends them
// through memory (and it does not always inline the group lambdas at -O3).
#define LB_INLINE inline __attribute__((always_inline))
#define LB_INLINE_LAMBDA __attribute__((always_inline))

template <int BITS>
constexpr int64_t span_codes() { return BITS == 2 ? 128 : BITS == 4 ? 64 : 32; }
template <int BITS>
constexpr int64_t span_bytes() { return span_codes<BITS>() * BITS / 8; }
template <int BITS>
constexpr int planes() { return BITS == 2 || BITS == 4 ? 8 / BITS : 1; }

// Blocks per span (1 when a block spans several): a span must not straddle
// blocks unevenly, so the block is a multiple of the span or divides it.
template <int BITS>
constexpr int64_t blocks_per_span(int64_t block) { return block >= span_codes<BITS>() ? 1 : span_codes<BITS>() / block; }

// 3 bits, 32 codes in 12 bytes: four groups of 8 codes packed to bytes; the
// code index held by byte p.
constexpr int code3_at(int p) { return 8 * ((p % 16) / 4) + 4 * (p / 16) + p % 4; }

// The code (position in its span) that the activation at xq offset i of a span meets.
template <int BITS>
constexpr int span_code(int i) {
  if (BITS == 2 || BITS == 4) return (8 / BITS) * (i % 32) + i / 32;  // plane i / 32, byte i % 32
  if (BITS == 3) return code3_at(i);
  return i;
}

// The span's codes as bytes, plane by plane.
template <int BITS>
LB_INLINE void decode_span(const uint8_t* p, __m256i* plane) {
  if constexpr (BITS == 2 || BITS == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i mask = _mm256_set1_epi8((1 << BITS) - 1);
    plane[0] = _mm256_and_si256(v, mask);
    // 16-bit shifts: the bits that cross into the next byte are masked off.
    if constexpr (BITS == 2) {
      // One of the three shifts as a multiply-high (v * 2^12 >> 16 = v >> 4):
      // it runs on the multiply pipes, which leaves the shift pipes less busy
      // (measured 2% at 4096 x 4096).
      plane[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), mask);
      plane[2] = _mm256_and_si256(_mm256_mulhi_epu16(v, _mm256_set1_epi16(1 << 12)), mask);
      plane[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), mask);
    } else {
      plane[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
  } else if constexpr (BITS == 3) {
    const __m256i seven = _mm256_set1_epi32(7);
    __m256i d[4];
    for (int g = 0; g < 4; ++g) d[g] = _mm256_and_si256(Isa::raw<3>(p, g), seven);
    plane[0] = _mm256_packus_epi16(_mm256_packus_epi32(d[0], d[1]), _mm256_packus_epi32(d[2], d[3]));
  } else {
    plane[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
}

// sum of code * xq over the span as 8 int32 lanes (lane j covers bytes
// [4j, 4j + 4) of every plane). int16 pair sums of all planes stay below
// 2^15: 4-bit 2 planes * 2 * 15 * 127, 2-bit 4 * 2 * 3 * 127.
template <int BITS>
LB_INLINE __m256i dot_span(const __m256i* plane, const int8_t* xq) {
  auto x = [xq](int s) LB_INLINE_LAMBDA { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * s)); };
#ifdef ONNXSHRINK_INT8_VNNI
  // vpdpbusd: u8 codes x s8 activations, 4 products a lane into int32 (no
  // saturation), the same lanes as vpmaddubsw + vpmaddwd; 8-bit codes too.
  constexpr int kPlaneCount = BITS == 2 || BITS == 4 ? planes<BITS>() : 1;
  __m256i sum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), plane[0], x(0));
  for (int s = 1; s < kPlaneCount; ++s) sum = _mm256_dpbusd_epi32(sum, plane[s], x(s));
  return sum;
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {
    const __m256i xv = x(0);
    const __m256i lo = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(plane[0])),
                                         _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xv)));
    const __m256i hi = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(plane[0], 1)),
                                         _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xv, 1)));
    return _mm256_add_epi32(lo, hi);
  } else {
    __m256i pairs = _mm256_maddubs_epi16(plane[0], x(0));
    for (int s = 1; s < planes<BITS>(); ++s) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(plane[s], x(s)));
    return _mm256_madd_epi16(pairs, ones);
  }
#endif
}

// The int16 pair sums of dot_span, before vpmaddwd (2 and 4 bits).
template <int BITS>
LB_INLINE __m256i pairs_span(const __m256i* plane, const int8_t* xq) {
  auto x = [xq](int s) LB_INLINE_LAMBDA { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * s)); };
  __m256i pairs = _mm256_maddubs_epi16(plane[0], x(0));
  for (int s = 1; s < planes<BITS>(); ++s) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(plane[s], x(s)));
  return pairs;
}

// Exact int32 sums of code * xq over the 8 blocks starting at `codes` (one
// column), lane j = block j, for R rows at once (each span decoded once).
// xq[r]: row r's activations at the first of those blocks. G blocks per span:
//   G = 1: a vector per block (its spans added), folded by a vphaddd tree;
//   G = 2: lanes 0-3 / 4-7 of a span belong to its 2 blocks;
//   G = 4: lane pairs belong to its 4 blocks.
// Only the first `valid` blocks are read (the column's last group may be
// partial); the others' sums are zero.
template <int BITS, int G, int R>
LB_INLINE void group_sums(const uint8_t* codes, const int8_t* const* xq, int64_t block, int64_t valid, __m256i* out) {
  constexpr int64_t SC = span_codes<BITS>(), SB = span_bytes<BITS>();
  __m256i plane[planes<BITS>()];
  auto span = [&](int64_t i, __m256i* v) LB_INLINE_LAMBDA {  // span i of the group, for every row
    decode_span<BITS>(codes + i * SB, plane);
    for (int r = 0; r < R; ++r) v[r] = dot_span<BITS>(plane, xq[r] + i * SC);
  };
  if constexpr (G == 1) {
    const int64_t spans = block / SC;
    auto block_vector = [&](int64_t j, __m256i* v) LB_INLINE_LAMBDA {
      if (j >= valid) {
        for (int r = 0; r < R; ++r) v[r] = _mm256_setzero_si256();
        return;
      }
      span(j * spans, v);
      for (int64_t i = 1; i < spans; ++i) {
        __m256i t[R];
        span(j * spans + i, t);
        for (int r = 0; r < R; ++r) v[r] = _mm256_add_epi32(v[r], t[r]);
      }
    };
    // hadd(V0, V1) = [V0 01, V0 23, V1 01, V1 23 | V0 45, V0 67, V1 45, V1 67];
    // two more levels leave [V0 .. V3 low halves | V0 .. V3 high halves].
    // Written out so that everything stays in registers.
    __m256i v0[R], v1[R], h0[R], h1[R], q0[R];
    block_vector(0, v0);
    block_vector(1, v1);
    for (int r = 0; r < R; ++r) h0[r] = _mm256_hadd_epi32(v0[r], v1[r]);
    block_vector(2, v0);
    block_vector(3, v1);
    for (int r = 0; r < R; ++r) q0[r] = _mm256_hadd_epi32(h0[r], _mm256_hadd_epi32(v0[r], v1[r]));
    block_vector(4, v0);
    block_vector(5, v1);
    for (int r = 0; r < R; ++r) h0[r] = _mm256_hadd_epi32(v0[r], v1[r]);
    block_vector(6, v0);
    block_vector(7, v1);
    for (int r = 0; r < R; ++r) {
      h1[r] = _mm256_hadd_epi32(h0[r], _mm256_hadd_epi32(v0[r], v1[r]));  // V4 .. V7, as q0
      out[r] = _mm256_add_epi32(_mm256_permute2x128_si256(q0[r], h1[r], 0x20),
                                _mm256_permute2x128_si256(q0[r], h1[r], 0x31));
    }
  } else if constexpr (G == 2) {
#ifdef ONNXSHRINK_INT8_VNNI
    // Span i: int32 lanes 0-3 block 2i, 4-7 block 2i + 1. Three vphaddd
    // leave [b0, b2, b4, b6 | b1, b3, b5, b7], as the int16 route below.
    auto span32 = [&](int64_t i, __m256i* v) LB_INLINE_LAMBDA {
      if (2 * i >= valid) {
        for (int r = 0; r < R; ++r) v[r] = _mm256_setzero_si256();
        return;
      }
      span(i, v);
    };
    __m256i s0[R], s1[R], h01[R];
    span32(0, s0);
    span32(1, s1);
    for (int r = 0; r < R; ++r) h01[r] = _mm256_hadd_epi32(s0[r], s1[r]);
    span32(2, s0);
    span32(3, s1);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int r = 0; r < R; ++r) {
      out[r] = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(h01[r], _mm256_hadd_epi32(s0[r], s1[r])), order);
    }
#else
    // Span i: int16 lanes 0-7 block 2i, 8-15 block 2i + 1 (4 products each).
    // Three vphaddw (16 products a lane at most: 16 * 15 * 127 < 2^15) and a
    // vpmaddwd leave [b0, b2, b4, b6 | b1, b3, b5, b7] in int32.
    auto span16 = [&](int64_t i, __m256i* v) LB_INLINE_LAMBDA {
      if (2 * i >= valid) {
        for (int r = 0; r < R; ++r) v[r] = _mm256_setzero_si256();
        return;
      }
      decode_span<BITS>(codes + i * SB, plane);
      for (int r = 0; r < R; ++r) v[r] = pairs_span<BITS>(plane, xq[r] + i * SC);
    };
    __m256i s0[R], s1[R], h01[R];
    span16(0, s0);
    span16(1, s1);
    for (int r = 0; r < R; ++r) h01[r] = _mm256_hadd_epi16(s0[r], s1[r]);
    span16(2, s0);
    span16(3, s1);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; ++r) {
      const __m256i q = _mm256_hadd_epi16(h01[r], _mm256_hadd_epi16(s0[r], s1[r]));
      out[r] = _mm256_permutevar8x32_epi32(_mm256_madd_epi16(q, ones), order);
    }
#endif
  } else {
#ifdef ONNXSHRINK_INT8_VNNI
    // Span i: int32 lane pairs, blocks 4i .. 4i + 3 (2-bit only). One vphaddd
    // leaves [b0, b1, b4, b5 | b2, b3, b6, b7], as the int16 route below.
    __m256i s0[R], s1[R];
    span(0, s0);
    if (valid > 4) {
      span(1, s1);
    } else {
      for (int r = 0; r < R; ++r) s1[r] = _mm256_setzero_si256();
    }
    const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    for (int r = 0; r < R; ++r) out[r] = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(s0[r], s1[r]), order);
#else
    // Span i: int16 lanes in fours, blocks 4i .. 4i + 3 (8 products each,
    // 2-bit only). One vphaddw and a vpmaddwd leave [b0, b1, b4, b5 | b2, b3, b6, b7].
    __m256i s0[R], s1[R];
    decode_span<BITS>(codes, plane);
    for (int r = 0; r < R; ++r) s0[r] = pairs_span<BITS>(plane, xq[r]);
    if (valid > 4) {
      decode_span<BITS>(codes + SB, plane);
      for (int r = 0; r < R; ++r) s1[r] = pairs_span<BITS>(plane, xq[r] + SC);
    } else {
      for (int r = 0; r < R; ++r) s1[r] = _mm256_setzero_si256();
    }
    const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7), ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; ++r) {
      out[r] = _mm256_permutevar8x32_epi32(_mm256_madd_epi16(_mm256_hadd_epi16(s0[r], s1[r]), ones), order);
    }
#endif
  }
}

// One span's activations from natural order into the planes' order: q[i] =
// natural[span_code(i)]. 2 and 4 bits are byte de-interleaves (one vpshufb per
// 16 bytes, then qword moves); a scalar loop here cost 1 us per 384-wide row,
// more than the multiply-adds of a 384 x 384 layer at 24 rows.
template <int BITS>
LB_INLINE void reorder_span(const int8_t* natural, int8_t* q) {
  auto load = [natural](int i) LB_INLINE_LAMBDA {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(natural + 32 * i));
  };
  auto store = [q](int i, __m256i v) LB_INLINE_LAMBDA {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * i), v);
  };
  if constexpr (BITS == 4) {
    // Each 16 bytes -> [8 even | 8 odd]; qwords [e0 o0 e1 o1] -> [e0 e1 o0 o1].
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(load(0), split), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(load(1), split), 0xD8);
    store(0, _mm256_permute2x128_si256(lo, hi, 0x20));  // codes 0, 2, .., 62
    store(1, _mm256_permute2x128_si256(lo, hi, 0x31));  // codes 1, 3, .., 63
  } else if constexpr (BITS == 2) {
    // Each 16 bytes -> dwords [i%4 == 0, 1, 2, 3]; then an 8 x 4 dword transpose:
    // plane s takes dword s of each of the 8 16-byte pieces, in order.
    const __m256i split = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                           0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i pair = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // qword s = (piece 2j, 2j+1) dword s
    __m256i v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(load(i), split), pair);
    const __m256i lo01 = _mm256_unpacklo_epi64(v[0], v[1]), hi01 = _mm256_unpackhi_epi64(v[0], v[1]);
    const __m256i lo23 = _mm256_unpacklo_epi64(v[2], v[3]), hi23 = _mm256_unpackhi_epi64(v[2], v[3]);
    store(0, _mm256_permute2x128_si256(lo01, lo23, 0x20));
    store(1, _mm256_permute2x128_si256(hi01, hi23, 0x20));
    store(2, _mm256_permute2x128_si256(lo01, lo23, 0x31));
    store(3, _mm256_permute2x128_si256(hi01, hi23, 0x31));
  } else if constexpr (BITS == 8) {
    store(0, load(0));
  } else {
    for (int i = 0; i < span_codes<BITS>(); ++i) q[i] = natural[span_code<BITS>(i)];
  }
}

// The spans' activation order, per row: per block amax, xq = rint(x * inv)
// (vcvtps2dq rounds to nearest even, as nearbyint in the default mode),
// rows padded with zero blocks up to xq_blocks.
template <int BITS>
void prepare_int8_bits(const LbArgs& a, int64_t m0, int64_t m1) {
  constexpr int64_t SC = span_codes<BITS>();
  const int64_t kp = a.xq_blocks * a.block;
  thread_local std::vector<int8_t> natural;
  natural.resize(static_cast<size_t>(kp));
  alignas(32) float padded[kInt8MaxBlock];
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.a + m * a.K;
    float* sx = a.sx + m * a.xq_blocks;
    int32_t* xqsum = a.xqsum + m * a.xq_blocks;
    float* xqzp = a.xqzp + m * a.xq_blocks;
    for (int64_t b = 0; b < a.n_blocks; ++b) {
      const int64_t k0 = b * a.block, count = std::min(a.block, a.K - k0);
      const float* src = x + k0;
      if (count < a.block) {  // the tensor's last, partial block: zeros past K
        std::memcpy(padded, src, static_cast<size_t>(count) * sizeof(float));
        std::fill(padded + count, padded + a.block, 0.0f);
        src = padded;
      }
      const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      __m256 vmax = _mm256_setzero_ps();
      for (int64_t i = 0; i < a.block; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(src + i), abs_mask));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t i = 0; i < a.block; i += 32) {
        __m256i q[4];
        for (int j = 0; j < 4; ++j) {
          q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + i + 8 * j), inv));
          sum = _mm256_add_epi32(sum, q[j]);
        }
        // |q| <= 127: the saturating packs are exact; they interleave 128-bit
        // lanes, which the qword permute undoes.
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(natural.data() + k0 + i),
                            _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      sx[b] = amax / 127.0f;
      xqsum[b] = _mm_cvtsi128_si32(s4);
      xqzp[b] = static_cast<float>(xqsum[b] * (1 << (BITS - 1)));
    }
    const int64_t k_used = a.n_blocks * a.block;
    std::fill(natural.begin() + k_used, natural.end(), int8_t{0});
    std::fill(sx + a.n_blocks, sx + a.xq_blocks, 0.0f);
    std::fill(xqsum + a.n_blocks, xqsum + a.xq_blocks, 0);
    std::fill(xqzp + a.n_blocks, xqzp + a.xq_blocks, 0.0f);
    int8_t* q = a.xq + m * kp;
    for (int64_t k0 = 0; k0 < kp; k0 += SC) reorder_span<BITS>(natural.data() + k0, q + k0);
  }
}

// Rows [m, m + R), outputs [n0, n1). Per 8 blocks of a column: the block sums
// (group_sums), minus zp * sum(xq) (exact, in int32), converted to float once
// and multiplied by scale * sx.
constexpr int64_t kPrefetchBytes = 2048;

template <int BITS, int G, int R, bool ZP>
void gemv_int8_rows(const LbArgs& a, const uint8_t* padded, int64_t first_padded, int64_t m, int64_t n0, int64_t n1) {
  constexpr int64_t kGroup = kInt8BlockGroup;
  // Locals, not loads through `a` in the hot loop.
  const int64_t block = a.block, n_blocks = a.n_blocks, block_bytes = a.block_bytes;
  const int64_t column_bytes = n_blocks * block_bytes, group_bytes = kGroup * block_bytes;
  const int64_t full = n_blocks / kGroup * kGroup;
  const uint8_t* const codes = a.codes;
  const float* const scales = a.scales;
  const uint8_t* const zero_points = a.zero_points;
  const int8_t* xq_row[R];
  const float* sx_row[R];
  const int32_t* xqsum_row[R];
  const float* xqzp_row[R];
  for (int r = 0; r < R; ++r) {
    xq_row[r] = a.xq + (m + r) * a.xq_blocks * block;
    sx_row[r] = a.sx + (m + r) * a.xq_blocks;
    xqsum_row[r] = a.xqsum + (m + r) * a.xq_blocks;
    xqzp_row[r] = a.xqzp + (m + r) * a.xq_blocks;
  }
  // The column's last, partial group reads its codes in place (spans that
  // end past the column meet zero activations) and takes its scales by a
  // masked load; zero points are bytes, so they are copied.
  const int64_t left = n_blocks - full;
  const __m256i tail_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(left)),
                                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  alignas(8) uint8_t tail_zps[kGroup] = {};
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* column = n >= first_padded ? padded + (n - first_padded) * column_bytes : codes + n * column_bytes;
    const float* column_scales = scales + n * n_blocks;
    const uint8_t* column_zps = ZP ? zero_points + n * n_blocks : nullptr;
    __m256 total[R];
    for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
    auto group = [&](const uint8_t* group_codes, __m256 scale, const uint8_t* zp, int64_t b, int64_t valid) LB_INLINE_LAMBDA {
      const int8_t* xq[R];
      for (int r = 0; r < R; ++r) xq[r] = xq_row[r] + b * block;
      __m256i sums[R];
      group_sums<BITS, G, R>(group_codes, xq, block, valid, sums);
      const __m256i zpv = ZP ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp))) : __m256i{};
      for (int r = 0; r < R; ++r) {
        // sum((code - zp) * xq) = sum(code * xq) - zp * sum(xq), in int32 with
        // zero points; the default one's term comes precomputed as a float
        // (both terms are integers below 2^24, so the float subtraction is exact).
        __m256 exact;
        if constexpr (ZP) {
          const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xqsum_row[r] + b));
          exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums[r], _mm256_mullo_epi32(zpv, xs)));
        } else {
          exact = _mm256_sub_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_loadu_ps(xqzp_row[r] + b));
        }
        total[r] = _mm256_fmadd_ps(exact, _mm256_mul_ps(scale, _mm256_loadu_ps(sx_row[r] + b)), total[r]);
      }
    };
    for (int64_t b = 0; b < full; b += kGroup) {
      const uint8_t* group_codes = column + b * block_bytes;
      // The codes stream from DRAM at M = 1; the hardware prefetcher alone
      // leaves bandwidth unused (measured 0.73 -> 0.61 ms at 4-bit 4096 x
      // 4096 with this, 2 KB ahead, each cache line of the group).
      for (int64_t o = 0; o < group_bytes; o += 64) Isa::prefetch(group_codes + kPrefetchBytes + o);
      group(group_codes, _mm256_loadu_ps(column_scales + b), ZP ? column_zps + b : nullptr, b, kGroup);
    }
    if (left) {
      if (ZP) std::copy(column_zps + full, column_zps + n_blocks, tail_zps);
      group(column + full * block_bytes, _mm256_maskload_ps(column_scales + full, tail_mask), tail_zps, full, left);
    }
    const float bias = a.bias ? a.bias[n] : 0.0f;
    for (int r = 0; r < R; ++r) a.y[(m + r) * a.N + n] = bias + Isa::hsum(total[r]);
  }
}

// Rows that share each decoded span (measured: 8 rows in the VNNI build,
// with its 32 registers, ran 0.7-0.75x as fast as 4 at 4096 x 4096, M = 24 and 64).
constexpr int64_t kInt8Rows = 4;

template <int BITS, int G, bool ZP>
void gemv_int8_groups(const LbArgs& a, const uint8_t* padded, int64_t first_padded, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < a.M;) {
    const int64_t rows = std::min<int64_t>(kInt8Rows, a.M - m);
    switch (rows) {
      case 4: gemv_int8_rows<BITS, G, 4, ZP>(a, padded, first_padded, m, n0, n1); break;
      case 3: gemv_int8_rows<BITS, G, 3, ZP>(a, padded, first_padded, m, n0, n1); break;
      case 2: gemv_int8_rows<BITS, G, 2, ZP>(a, padded, first_padded, m, n0, n1); break;
      default: gemv_int8_rows<BITS, G, 1, ZP>(a, padded, first_padded, m, n0, n1); break;
    }
    m += rows;
  }
}

template <int BITS, int G>
void gemv_int8_groups(const LbArgs& a, int64_t n0, int64_t n1) {
  // A span may read up to 32 bytes (3 bits: 13) from its start, past the end
  // of a column's last, partial group: the tensor's last columns, those
  // within 64 bytes of its end, are read from a zero-padded copy.
  thread_local std::vector<uint8_t> padded;
  const int64_t column_bytes = a.n_blocks * a.block_bytes;
  const int64_t first_padded = std::max<int64_t>(0, a.N - (64 + column_bytes - 1) / std::max<int64_t>(column_bytes, 1));
  if (n1 > first_padded) {
    const size_t bytes = static_cast<size_t>((a.N - first_padded) * column_bytes);
    padded.assign(bytes + 64, 0);
    std::memcpy(padded.data(), a.codes + first_padded * column_bytes, bytes);
  }
  if (a.zero_points) gemv_int8_groups<BITS, G, true>(a, padded.data(), first_padded, n0, n1);
  else gemv_int8_groups<BITS, G, false>(a, padded.data(), first_padded, n0, n1);
}

template <int BITS>
void gemv_int8_bits(const LbArgs& a, int64_t n0, int64_t n1) {
  switch (blocks_per_span<BITS>(a.block)) {
    case 4: if constexpr (BITS == 2) gemv_int8_groups<BITS, 4>(a, n0, n1); break;
    case 2: if constexpr (BITS == 2 || BITS == 4) gemv_int8_groups<BITS, 2>(a, n0, n1); break;
    default: gemv_int8_groups<BITS, 1>(a, n0, n1); break;
  }
}

template <int BITS>
bool takes(int64_t block) {
  return block % 32 == 0 && block <= kInt8MaxBlock && (block % span_codes<BITS>() == 0 || span_codes<BITS>() % block == 0);
}


inline bool int8_takes(int bits, int64_t block) {
  switch (bits) {
    case 2: return takes<2>(block);
    case 3: return takes<3>(block);
    case 4: return takes<4>(block);
    default: return takes<8>(block);
  }
}

inline void int8_prepare(const LbArgs& a, int64_t m0, int64_t m1) {
  switch (a.bits) {
    case 2: prepare_int8_bits<2>(a, m0, m1); break;
    case 3: prepare_int8_bits<3>(a, m0, m1); break;
    case 4: prepare_int8_bits<4>(a, m0, m1); break;
    default: prepare_int8_bits<8>(a, m0, m1); break;
  }
}

inline void int8_gemv(const LbArgs& a, int64_t n0, int64_t n1) {
  switch (a.bits) {
    case 2: gemv_int8_bits<2>(a, n0, n1); break;
    case 3: gemv_int8_bits<3>(a, n0, n1); break;
    case 4: gemv_int8_bits<4>(a, n0, n1); break;
    default: gemv_int8_bits<8>(a, n0, n1); break;
  }
}

}  // namespace ONNXSHRINK_LOWBIT_NAMESPACE
}  // namespace onnxshrink
