// accuracy_level 4 (int8 activations) with AVX-512 VNNI on 256-bit vectors:
// the AVX2 int8 kernels (lowbit_int8_avx2.h) with vpdpbusd in place of
// vpmaddubsw + vpmaddwd, one instruction for 32 u8 x s8 products and their
// int32 sums instead of two. Compiled with -mavx2 -mfma -mavx512f -mavx512vl
// -mavx512vnni and used by the AVX-512 tables after a CPUID check.
#define ONNXSHRINK_LOWBIT_NAMESPACE lowbit_vnni
#define ONNXSHRINK_INT8_VNNI 1

#include "lowbit_matmul_avx2_isa.h"
#include "lowbit_int8_avx2.h"

namespace onnxshrink {

bool lowbit_int8_takes_vnni(int bits, int64_t block) { return lowbit_vnni::int8_takes(bits, block); }
void lowbit_int8_prepare_vnni(const LbArgs& a, int64_t m0, int64_t m1) { lowbit_vnni::int8_prepare(a, m0, m1); }
void lowbit_int8_gemv_vnni(const LbArgs& a, int64_t n0, int64_t n1) { lowbit_vnni::int8_gemv(a, n0, n1); }

}  // namespace onnxshrink
