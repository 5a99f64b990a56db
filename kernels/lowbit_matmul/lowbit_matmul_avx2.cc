// AVX2 + FMA variant of the LowBitMatMul kernels. Compiled with -mavx2 -mfma
// (see CMakeLists.txt) and only called after a CPUID check.
#define ONNXSHRINK_LOWBIT_NAMESPACE lowbit_avx2

#include "lowbit_matmul_avx2_isa.h"
#include "lowbit_matmul_simd.h"
#include "lowbit_int8_avx2.h"

namespace onnxshrink {

bool lowbit_int8_takes_avx2(int bits, int64_t block) { return lowbit_avx2::int8_takes(bits, block); }
void lowbit_int8_prepare_avx2(const LbArgs& a, int64_t m0, int64_t m1) { lowbit_avx2::int8_prepare(a, m0, m1); }
void lowbit_int8_gemv_avx2(const LbArgs& a, int64_t n0, int64_t n1) { lowbit_avx2::int8_gemv(a, n0, n1); }

const LbKernels& lowbit_kernels_avx2() {
  static const LbKernels table =
      lowbit_avx2::kernels("avx2", &lowbit_int8_prepare_avx2, &lowbit_int8_gemv_avx2, &lowbit_int8_takes_avx2);
  return table;
}

}  // namespace onnxshrink
