// AVX2 + FMA variant of the SparseMatMul kernels. Compiled with -mavx2 -mfma
// (see CMakeLists.txt) and only called after a CPUID check.
#include <immintrin.h>

#include <cstdint>

#define ONNXSHRINK_SPMM_NAMESPACE spmm_avx2

namespace onnxshrink {
namespace spmm_avx2 {

struct Isa {
  static constexpr int W = 8;
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Eight scalar loads and inserts: on AMD Zen 3, vgatherdps is ~1.6x slower
  // per element than this (measured on the csr row kernel, 4096 x 4096).
  static F gather_u16(const float* x, const uint16_t* ix) {
    const __m128 lo = _mm_setr_ps(x[ix[0]], x[ix[1]], x[ix[2]], x[ix[3]]);
    const __m128 hi = _mm_setr_ps(x[ix[4]], x[ix[5]], x[ix[6]], x[ix[7]]);
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
  }
  // The 8 nonzeros of 4 consecutive 2:4 groups: x holds the groups' 16
  // activations, meta their 16-bit word. Two in-register permutes replace a
  // gather (much slower on AMD cores); vpermps reads only the low 3 index bits.
  static F select24(const float* x, const uint16_t* meta) {
    const __m256i word = _mm256_set1_epi32(*meta);
    const __m256i pos = _mm256_and_si256(_mm256_srlv_epi32(word, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                         _mm256_set1_epi32(3));
    const __m256i idx = _mm256_add_epi32(pos, _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4));
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), idx);      // groups 0, 1
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8), idx);  // groups 2, 3
    return _mm256_blend_ps(lo, hi, 0xF0);
  }
};

}  // namespace spmm_avx2
}  // namespace onnxshrink

#include "sparse_matmul_simd.h"

namespace onnxshrink {
const SpmmKernels& spmm_kernels_avx2() { return spmm_avx2::kernels("avx2"); }
}  // namespace onnxshrink
