// AVX-512 (F) variant of the SparseMatMul kernels: the same algorithms as the
// AVX2 TU at 16 lanes. Compiled with -mavx512f -mavx512bw -mavx512vl -mfma and
// only called after a CPUID check.
#include <immintrin.h>

#include <cstdint>

#define ONNXSHRINK_SPMM_NAMESPACE spmm_avx512

namespace onnxshrink {
namespace spmm_avx512 {

struct Isa {
  static constexpr int W = 16;
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  // Two 256-bit gathers, not one 512-bit: on AMD Zen 4 the 512-bit gather made
  // the csr row kernel (M = 1, 4096 x 4096, 90% zeros) 10% slower than AVX2's.
  static F gather_u16(const float* x, const uint16_t* ix) {
    const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ix)));
    const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ix + 8)));
    const __m256 a = _mm256_i32gather_ps(x, lo, 4), b = _mm256_i32gather_ps(x, hi, 4);
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(b), 1));
  }
  // 8 consecutive 2:4 groups: 32 activations, two 16-bit meta words; one
  // two-source permute picks the 16 nonzeros' activations.
  static F select24(const float* x, const uint16_t* meta) {
    const uint32_t word = static_cast<uint32_t>(meta[0]) | (static_cast<uint32_t>(meta[1]) << 16);
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i pos = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts),
                                         _mm512_set1_epi32(3));
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    return _mm512_permutex2var_ps(_mm512_loadu_ps(x), _mm512_add_epi32(pos, base), _mm512_loadu_ps(x + 16));
  }
};

}  // namespace spmm_avx512
}  // namespace onnxshrink

#include "sparse_matmul_simd.h"

namespace onnxshrink {
const SpmmKernels& spmm_kernels_avx512() { return spmm_avx512::kernels("avx512"); }
}  // namespace onnxshrink
