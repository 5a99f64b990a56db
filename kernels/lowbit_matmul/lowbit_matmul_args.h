// Plain-data arguments of the LowBitMatMul CPU kernels (no ORT types, so the
// ISA translation units and the CUDA launcher don't need ORT headers).
//
// Y[M, N] = A[M, K] x W[K, N] (+ bias[N]). W is stored column by column in
// blocks of `block` consecutive k (MatMulNBits' layout):
//   codes   u8 [N, n_blocks, block * bits / 8]: each block's codes packed
//           LSB-first (code i at bits [i*bits, (i+1)*bits) of the block), the
//           last block padded (the padding is never used);
//   linear  W[k, n] = (code - zero_point[n, b]) * scale[n, b], b = k / block,
//           zero_point 2^(bits-1) when absent;
//   codebook W[k, n] = codebook[code] (one table [2^bits]) or
//           codebook[n, code] (a table per column [N, 2^bits]).
// accuracy_level 4 (linear weights only): each block of each row of A is
// first rounded to int8, xq = rint(x * (127 / amax)), sx = amax / 127 (amax:
// the block's largest |x|; 0 gives xq = 0), and
//   Y[m, n] = bias[n] + sum_b float(sum_k (code - zp) * xq) * (scale[n, b] * sx[m, b])
// with the inner sum exact in int32 (block_size <= 512) - as MatMulNBits'
// accuracy_level 4 does, for its speed, at any M.
#pragma once

#include <cstdint>

namespace onnxshrink {

struct LbArgs {
  const float* a = nullptr;     // [M, K], row-major
  float* y = nullptr;           // [M, N]
  const float* bias = nullptr;  // [N] or null
  int64_t M = 0, K = 0, N = 0;
  int bits = 0;                 // 2, 3, 4 or 8
  int64_t block = 0;            // multiple of 16
  int64_t n_blocks = 0;         // ceil(K / block)
  int64_t block_bytes = 0;      // block * bits / 8
  const uint8_t* codes = nullptr;
  const float* scales = nullptr;        // [N, n_blocks] (linear)
  const uint8_t* zero_points = nullptr; // [N, n_blocks] or null (linear)
  const float* codebook = nullptr;      // null: linear
  int64_t codebook_stride = 0;          // 0: one shared table; 2^bits: a table per column
  // accuracy_level 4: A as int8, filled by prepare_int8 before the gemv_int8
  // tasks run (layout chosen by the ISA that prepares it). Rows are
  // xq_blocks blocks apart (n_blocks rounded up to kInt8BlockGroup, the padding
  // zero) so that a kernel may read whole groups of blocks; the portable
  // kernels use the first n_blocks of each row.
  int64_t xq_blocks = 0;
  int8_t* xq = nullptr;      // [M, xq_blocks * block]
  float* sx = nullptr;       // [M, xq_blocks]
  int32_t* xqsum = nullptr;  // [M, xq_blocks]: sum of xq over the block
  // [M, xq_blocks]: float(2^(bits-1) * xqsum), the default zero point's term
  // (exact: |.| < 2^24), for kernels that subtract it after the convert.
  float* xqzp = nullptr;
  // Float activations prepared once per call by LbKernels::prepare_float (null
  // when that kernel set has none or does not take the case); the layout is
  // the preparing ISA's: rows xbf_row words apart, their sums xbf_sums_row apart.
  const uint16_t* xbf = nullptr;
  const float* xbf_sums = nullptr;
  int64_t xbf_row = 0, xbf_sums_row = 0;
  // The same for the int8-digit form (lowbit_matmul_digits.cc).
  const int8_t* xdig = nullptr;
  const float* xdig_lanes = nullptr;
  int64_t xdig_row = 0, xdig_lanes_row = 0;
};

// The AVX2 int8 kernel reduces the sums of 8 blocks into one vector at a time.
constexpr int64_t kInt8BlockGroup = 8;

// accuracy_level 4 needs block_size <= this: sums of (code - zp) * xq stay
// exact in int32 and in their float conversion (255 * 127 * 512 < 2^24).
constexpr int64_t kInt8MaxBlock = 512;

// From this many rows on, blocks of W are dequantized once into a float panel
// that a register-blocked multiply reuses for every row; below it, each code
// is decoded in registers and used right away, 4 rows at a time (the M = 1
// case). Measured crossover at 4096 x 4096: gemv 6.8 vs gemm 9.5 ms at 8 rows,
// 13.7 vs 11.9 at 16.
constexpr int64_t kGemmMinRows = 12;

struct LbKernels {
  const char* isa;
  int64_t panel;  // the gemm kernel wants column chunks that are multiples of this
  // All M rows, outputs [n0, n1): decode-and-multiply (M < kGemmMinRows).
  void (*gemv)(const LbArgs&, int64_t n0, int64_t n1);
  // All M rows, outputs [n0, n1): dequantized panels (M >= kGemmMinRows).
  void (*gemm)(const LbArgs&, int64_t n0, int64_t n1);
  // accuracy_level 4: quantizes rows [m0, m1) of A into xq / sx / xqsum,
  // then (all rows, outputs [n0, n1)) the integer dot products.
  void (*prepare_int8)(const LbArgs&, int64_t m0, int64_t m1);
  void (*gemv_int8)(const LbArgs&, int64_t n0, int64_t n1);
  // Whether gemv_int8 takes this width and block size; others use the portable one.
  bool (*int8_takes)(int bits, int64_t block);
  // Float activations, M < kGemmMinRows: rearranges A once per call, on the
  // calling thread, for `gemv` (sets a.xbf where it takes the case). Optional.
  void (*prepare_float)(LbArgs& a) = nullptr;
};

const LbKernels& lowbit_kernels_portable();
#ifdef ONNXSHRINK_HAVE_AVX2
const LbKernels& lowbit_kernels_avx2();
// accuracy_level 4 kernels of the AVX2 TU (also used by the AVX-512 table).
void lowbit_int8_prepare_avx2(const LbArgs&, int64_t m0, int64_t m1);
void lowbit_int8_gemv_avx2(const LbArgs&, int64_t n0, int64_t n1);
bool lowbit_int8_takes_avx2(int bits, int64_t block);
#endif
#ifdef ONNXSHRINK_HAVE_AVX512
const LbKernels& lowbit_kernels_avx512();
#endif
#ifdef ONNXSHRINK_HAVE_AVX512_VNNI
// The AVX2 int8 kernels with vpdpbusd (lowbit_matmul_vnni.cc), and the AVX-512
// table that uses them.
void lowbit_int8_prepare_vnni(const LbArgs&, int64_t m0, int64_t m1);
void lowbit_int8_gemv_vnni(const LbArgs&, int64_t n0, int64_t n1);
bool lowbit_int8_takes_vnni(int bits, int64_t block);
const LbKernels& lowbit_kernels_avx512_vnni();
#endif
#ifdef ONNXSHRINK_HAVE_AVX512_BF16
// The AVX-512 VNNI table with the float gemv of 4-bit linear weights on
// vdpbf16ps (lowbit_matmul_bf16.cc) and of 2-bit ones on vpdpbusd with int8
// digits (lowbit_matmul_digits.cc); other cases keep the AVX-512 F kernels.
// Built only with the VNNI TU: every CPU with AVX-512 BF16 has VNNI.
const LbKernels& lowbit_kernels_avx512_bf16();
void lowbit_prepare_bf16(LbArgs& a);                               // sets a.xbf where it takes the case
void lowbit_gemv_bf16(const LbArgs& a, int64_t n0, int64_t n1);    // needs a.xbf
void lowbit_prepare_digits(LbArgs& a);                             // sets a.xdig where it takes the case
void lowbit_gemv_digits(const LbArgs& a, int64_t n0, int64_t n1);  // needs a.xdig
#endif

// Best variant for this CPU, honouring ONNXSHRINK_FORCE_PORTABLE=1 (read on
// every call; called once per kernel instance).
const LbKernels& select_lowbit_kernels();

#ifdef ONNXSHRINK_WITH_CUDA
// Launches on `stream` (a cudaStream_t); device pointers in `a`; returns 0 or
// a cudaError_t value.
int lowbit_matmul_cuda(const LbArgs& device_args, void* stream);
const char* lowbit_cuda_error_string(int err);
#endif

}  // namespace onnxshrink
