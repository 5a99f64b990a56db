// AVX-512 (F+BW) variant of the DequantizePacked row kernel. Compiled with
// -mavx512f -mavx512bw and only called after a CPUID check.
#include <immintrin.h>

#include <cstdint>

#define ONNXSHRINK_DQ_NAMESPACE avx512

namespace onnxshrink {
namespace avx512 {
static inline void convert_block(const uint8_t* q, int64_t n, int32_t zp, float scale, float* out) {
  const __m512i vzp = _mm512_set1_epi32(zp);
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i));
    const __m512i v = _mm512_sub_epi32(_mm512_cvtepu8_epi32(b), vzp);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(v), vs));
  }
  if (i < n) {  // masked tail: no scalar loop, no over-read
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m128i b = _mm_maskz_loadu_epi8(m, q + i);
    const __m512i v = _mm512_sub_epi32(_mm512_cvtepu8_epi32(b), vzp);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_cvtepi32_ps(v), vs));
  }
}
}  // namespace avx512
}  // namespace onnxshrink

#include "dequantize_packed_kernel.h"

namespace onnxshrink {
void dequantize_rows_avx512(const DqArgs& a, int64_t r0, int64_t r1) { avx512::dequantize_rows(a, r0, r1); }
}  // namespace onnxshrink
