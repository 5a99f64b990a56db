// AVX2 variant of the DequantizePacked row kernel. This file is compiled with
// -mavx2 (see CMakeLists.txt) and only called after a CPUID check.
#include <immintrin.h>

#include <cstdint>

#define ONNXSHRINK_DQ_NAMESPACE avx2

namespace onnxshrink {
namespace avx2 {
static inline void convert_block(const uint8_t* q, int64_t n, int32_t zp, float scale, float* out) {
  const __m256i vzp = _mm256_set1_epi32(zp);
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    // 8 codes -> int32 lanes; subtract in integer, convert, one multiply
    // (no FMA) so the result matches the scalar/numpy reference bit for bit.
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
    const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(b), vzp);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(v), vs));
  }
  for (; i < n; ++i) out[i] = static_cast<float>(static_cast<int32_t>(q[i]) - zp) * scale;
}
}  // namespace avx2
}  // namespace onnxshrink

#include "dequantize_packed_kernel.h"

namespace onnxshrink {
void dequantize_rows_avx2(const DqArgs& a, int64_t r0, int64_t r1) { avx2::dequantize_rows(a, r0, r1); }
}  // namespace onnxshrink
