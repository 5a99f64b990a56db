// AVX-512 (F) variant of the LowBitMatMul kernels: the AVX2 algorithms at 16
// lanes. Compiled with -mavx512f -mavx512bw -mavx512vl -mfma and only called
// after a CPUID check. Activations stay float32 (the op's accuracy contract),
// so there is no int8 dot product here and VNNI is not used.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define ONNXSHRINK_LOWBIT_NAMESPACE lowbit_avx512

namespace onnxshrink {
namespace lowbit_avx512 {

struct Isa {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }

  // Codes [16 g, 16 g + 16): two 8-code groups, one per 256-bit half, each
  // from the 4 bytes at its first byte (as in the AVX2 TU).
  template <int BITS>
  static I raw(const uint8_t* block, int64_t g) {
    if constexpr (BITS == 8) {
      return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + g * 16)));
    } else {
      int32_t lo, hi;
      std::memcpy(&lo, block + 2 * g * BITS, 4);
      std::memcpy(&hi, block + (2 * g + 1) * BITS, 4);
      const __m512i shifts = _mm512_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS, 0,
                                               BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
      const __m512i word = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(lo)), _mm256_set1_epi32(hi), 1);
      return _mm512_srlv_epi32(word, shifts);
    }
  }

  template <int BITS>
  static constexpr int base() { return BITS == 8 ? 128 : 1 << (BITS - 1); }

  // float(code - base): up to 4 bits by one 16-entry permute (vpermps reads
  // the low 4 index bits; smaller tables repeat to absorb the garbage bits).
  template <int BITS>
  static F linear(I r) {
    if constexpr (BITS == 2) {
      return _mm512_permutexvar_ps(r, _mm512_setr_ps(-2, -1, 0, 1, -2, -1, 0, 1, -2, -1, 0, 1, -2, -1, 0, 1));
    } else if constexpr (BITS == 3) {
      return _mm512_permutexvar_ps(r, _mm512_setr_ps(-4, -3, -2, -1, 0, 1, 2, 3, -4, -3, -2, -1, 0, 1, 2, 3));
    } else if constexpr (BITS == 4) {
      return _mm512_permutexvar_ps(r, _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7));
    } else {
      return _mm512_cvtepi32_ps(_mm512_sub_epi32(r, _mm512_set1_epi32(128)));
    }
  }

  // Codebook lookup: up to 16 entries in one register (one permute), 256 by gather.
  template <int BITS>
  struct Lut {
    F table16 = _mm512_setzero_ps();
    const float* table = nullptr;
    void load(const float* t) {
      if constexpr (BITS == 8) {
        table = t;
      } else {
        alignas(64) float tmp[16];
        for (int i = 0; i < 16; ++i) tmp[i] = t[i & ((1 << BITS) - 1)];  // repeat: garbage bits select a copy
        table16 = _mm512_load_ps(tmp);
      }
    }
    F lookup(I r) const {
      if constexpr (BITS == 8) {
        return _mm512_i32gather_ps(r, table, 4);
      } else {
        return _mm512_permutexvar_ps(r, table16);
      }
    }
  };

  // dst[i * stride + j] = rows[j][i] for a 16 x 16 tile (through memory:
  // this path is not measured on the development machine, so it stays simple).
  static void transpose_store(const F* rows, float* dst, int64_t stride) {
    alignas(64) float tile[16][16];
    for (int j = 0; j < 16; ++j) _mm512_store_ps(tile[j], rows[j]);
    for (int i = 0; i < 16; ++i) {
      alignas(64) float column[16];
      for (int j = 0; j < 16; ++j) column[j] = tile[j][i];
      _mm512_storeu_ps(dst + i * stride, _mm512_load_ps(column));
    }
  }
};

}  // namespace lowbit_avx512
}  // namespace onnxshrink

#include "lowbit_matmul_simd.h"

namespace onnxshrink {
// accuracy_level 4 reuses the AVX2 integer kernels (every AVX-512 CPU has AVX2),
// with vpdpbusd where the CPU has VNNI.
const LbKernels& lowbit_kernels_avx512() {
  static const LbKernels table = lowbit_avx512::kernels("avx512", &lowbit_int8_prepare_avx2,
                                                        &lowbit_int8_gemv_avx2, &lowbit_int8_takes_avx2);
  return table;
}

#ifdef ONNXSHRINK_HAVE_AVX512_VNNI
const LbKernels& lowbit_kernels_avx512_vnni() {
  static const LbKernels table = lowbit_avx512::kernels("avx512_vnni", &lowbit_int8_prepare_vnni,
                                                        &lowbit_int8_gemv_vnni, &lowbit_int8_takes_vnni);
  return table;
}
#endif

#ifdef ONNXSHRINK_HAVE_AVX512_BF16
// Float activations, M < kGemmMinRows: 4 bits through bf16, 2 bits through
// int8 digits, the rest (and blocks those kernels leave) in float32.
static void prepare_float(LbArgs& a) {
  lowbit_prepare_bf16(a);
  lowbit_prepare_digits(a);
}

static void gemv_float(const LbArgs& a, int64_t n0, int64_t n1) {
  if (a.xbf) lowbit_gemv_bf16(a, n0, n1);
  else if (a.xdig) lowbit_gemv_digits(a, n0, n1);
  else lowbit_avx512::gemv(a, n0, n1);
}

const LbKernels& lowbit_kernels_avx512_bf16() {
  static const LbKernels table = [] {
    LbKernels t = lowbit_kernels_avx512_vnni();
    t.isa = "avx512_bf16";
    t.gemv = &gemv_float;
    t.prepare_float = &prepare_float;
    return t;
  }();
  return table;
}
#endif
}  // namespace onnxshrink
