// CUDA kernel of DequantizePacked: one thread per output element. No ORT
// headers here; the ORT-facing op lives in dequantize_packed_cuda.cc.
#include <cuda_runtime.h>

#include <cstdint>

#include "dequantize_packed_args.h"

namespace onnxshrink {
namespace {

__global__ void DequantizePackedKernel(DqArgs a, int64_t codes_bytes, int64_t total) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const uint32_t mask = (1u << a.bits) - 1u;
  const int32_t default_zp = 1 << (a.bits - 1);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / a.cols;
    const int64_t c = i - r * a.cols;
    // A code (<= 8 bits) spans at most two bytes; the second is read only
    // when it exists, so the last code never reads past the buffer.
    const int64_t bit = i * a.bits;
    const int64_t byte = bit >> 3;
    uint32_t v = a.codes[byte];
    if (byte + 1 < codes_bytes) v |= static_cast<uint32_t>(a.codes[byte + 1]) << 8;
    const int32_t code = static_cast<int32_t>((v >> (bit & 7)) & mask);
    const int64_t sb = r * a.n_blocks + c / a.block_size;
    const int32_t zp = a.zero_points ? static_cast<int32_t>(a.zero_points[sb]) : default_zp;
    a.out[i] = __fmul_rn(static_cast<float>(code - zp), a.scales[sb]);  // no FMA contraction: match the CPU result
  }
}

}  // namespace

int dequantize_packed_cuda(const DqArgs& a, int64_t codes_bytes, void* stream) {
  const int64_t total = a.rows * a.cols;
  if (total == 0) return 0;
  constexpr int kThreads = 256;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride loop covers the rest
  DequantizePackedKernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      a, codes_bytes, total);
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace onnxshrink
