// The AVX2 kernels' vector interface (`struct Isa`, see lowbit_matmul_simd.h),
// shared by the AVX2 translation unit and the VNNI one (lowbit_matmul_vnni.cc),
// which both define ONNXSHRINK_LOWBIT_NAMESPACE first.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#ifndef ONNXSHRINK_LOWBIT_NAMESPACE
#error "define ONNXSHRINK_LOWBIT_NAMESPACE before including lowbit_matmul_avx2_isa.h"
#endif

namespace onnxshrink {
namespace ONNXSHRINK_LOWBIT_NAMESPACE {

struct Isa {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  // Codes [8 g, 8 g + 8): the 4 bytes at the group's first byte broadcast to
  // every lane (a single load), then a per-lane shift. Reads up to 2 bytes
  // past the group's bits (the caller pads the tensor's last block).
  template <int BITS>
  static I raw(const uint8_t* block, int64_t g) {
    if constexpr (BITS == 8) {
      return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + g * 8)));
    } else {
      int32_t word;
      std::memcpy(&word, block + g * BITS, 4);
      const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
      return _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts);
    }
  }

  // What linear() subtracts from each code.
  template <int BITS>
  static constexpr int base() { return BITS == 4 ? 0 : 1 << (BITS - 1); }

  // float(code - base): 2 and 3 bits by one in-register table lookup (vpermps
  // reads the low 3 index bits only, so the garbage above needs no mask; the
  // 2-bit table repeats to absorb bit 2): 3 instructions per 8 weights with
  // the multiply-add. 4 bits: mask and convert. 8 bits: subtract and convert.
  template <int BITS>
  static F linear(I r) {
    if constexpr (BITS == 2) {
      return _mm256_permutevar8x32_ps(_mm256_setr_ps(-2, -1, 0, 1, -2, -1, 0, 1), r);
    } else if constexpr (BITS == 3) {
      return _mm256_permutevar8x32_ps(_mm256_setr_ps(-4, -3, -2, -1, 0, 1, 2, 3), r);
    } else if constexpr (BITS == 4) {
      return _mm256_cvtepi32_ps(_mm256_and_si256(r, _mm256_set1_epi32(15)));
    } else {
      return _mm256_cvtepi32_ps(_mm256_sub_epi32(r, _mm256_set1_epi32(128)));
    }
  }

  // Codebook lookup: up to 8 entries in one register (one permute), 16 in
  // two (two permutes and a blend on bit 3), 256 by gather.
  template <int BITS>
  struct Lut {
    F lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    const float* table = nullptr;
    void load(const float* t) {
      if constexpr (BITS == 8) {
        table = t;
      } else {
        alignas(32) float tmp[16] = {};
        std::memcpy(tmp, t, sizeof(float) << BITS);  // the table has exactly 2^BITS entries
        if constexpr (BITS == 2) std::memcpy(tmp + 4, tmp, 4 * sizeof(float));  // bit 2 is garbage
        lo = _mm256_load_ps(tmp);
        hi = _mm256_load_ps(tmp + 8);
      }
    }
    F lookup(I r) const {
      if constexpr (BITS == 8) {
        return _mm256_i32gather_ps(table, r, 4);
      } else if constexpr (BITS == 4) {
        return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, r), _mm256_permutevar8x32_ps(hi, r),
                                _mm256_castsi256_ps(_mm256_slli_epi32(r, 28)));
      } else {
        return _mm256_permutevar8x32_ps(lo, r);
      }
    }
  };

  // dst[i * stride + j] = rows[j][i]: the classic 8 x 8 transpose.
  static void transpose_store(const F* rows, float* dst, int64_t stride) {
    const __m256 t0 = _mm256_unpacklo_ps(rows[0], rows[1]), t1 = _mm256_unpackhi_ps(rows[0], rows[1]);
    const __m256 t2 = _mm256_unpacklo_ps(rows[2], rows[3]), t3 = _mm256_unpackhi_ps(rows[2], rows[3]);
    const __m256 t4 = _mm256_unpacklo_ps(rows[4], rows[5]), t5 = _mm256_unpackhi_ps(rows[4], rows[5]);
    const __m256 t6 = _mm256_unpacklo_ps(rows[6], rows[7]), t7 = _mm256_unpackhi_ps(rows[6], rows[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst + 0 * stride, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + 1 * stride, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * stride, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * stride, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * stride, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * stride, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * stride, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * stride, _mm256_permute2f128_ps(u3, u7, 0x31));
  }
};


}  // namespace ONNXSHRINK_LOWBIT_NAMESPACE
}  // namespace onnxshrink
