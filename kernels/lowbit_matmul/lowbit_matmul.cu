// CUDA kernel of LowBitMatMul: one thread per output element, decoding the
// column's codes block by block. No ORT headers here; the ORT-facing op lives
// in lowbit_matmul_cuda.cc. Codes are never out of range, so there is nothing
// to check on the device.
#include <cuda_runtime.h>

#include <cstdint>

#include "lowbit_matmul_args.h"

namespace onnxshrink {
namespace {

__global__ void LowBitMatMulKernel(LbArgs a) {
  const int64_t total = a.M * a.N;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const uint32_t mask = (1u << a.bits) - 1u;
  const int default_zp = 1 << (a.bits - 1);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t m = i / a.N, n = i - m * a.N;
    const float* x = a.a + m * a.K;
    const float* table = a.codebook ? a.codebook + n * a.codebook_stride : nullptr;
    float s = 0.0f;
    for (int64_t b = 0; b < a.n_blocks; ++b) {
      const uint8_t* block = a.codes + (n * a.n_blocks + b) * a.block_bytes;
      const int64_t k0 = b * a.block;
      const int64_t count = a.K - k0 < a.block ? a.K - k0 : a.block;
      const int zp = a.zero_points ? a.zero_points[n * a.n_blocks + b] : default_zp;
      const float scale = table ? 1.0f : a.scales[n * a.n_blocks + b];
      float part = 0.0f;
      for (int64_t j = 0; j < count; ++j) {
        const int64_t bit = j * a.bits, byte = bit >> 3;
        uint32_t v = block[byte];
        if (byte + 1 < a.block_bytes) v |= static_cast<uint32_t>(block[byte + 1]) << 8;  // never past the block
        const uint32_t code = (v >> (bit & 7)) & mask;
        const float w = table ? table[code] : static_cast<float>(static_cast<int>(code) - zp);
        part = fmaf(w, x[k0 + j], part);
      }
      s = fmaf(part, scale, s);
    }
    a.y[i] = s + (a.bias ? a.bias[n] : 0.0f);
  }
}

}  // namespace

int lowbit_matmul_cuda(const LbArgs& a, void* stream) {
  const int64_t total = a.M * a.N;
  if (total == 0) return 0;
  constexpr int kThreads = 256;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride loop covers the rest
  LowBitMatMulKernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  return static_cast<int>(cudaGetLastError());
}

const char* lowbit_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace onnxshrink
