// CUDA kernels of SparseMatMul: one thread per output element, every format.
// No ORT headers here; the ORT-facing op lives in sparse_matmul_cuda.cc.
// The host cannot check indices in device memory, so the kernels skip any
// index, position or offset that is out of range instead of reading past a
// buffer (the CPU op reports such inputs as errors).
#include <cuda_runtime.h>

#include <cstdint>

#include "sparse_matmul_args.h"

namespace onnxshrink {
namespace {

__device__ inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

__global__ void SparseMatMulKernel(SpmmArgs a, int64_t count) {
  const int64_t total = a.M * a.N;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t m = i / a.N, n = i - m * a.N;
    const float* x = a.a + m * a.K;
    float s = a.bias ? a.bias[n] : 0.0f;
    if (a.format == SparseFormat::kCsr) {
      const int64_t j0 = clamp64(a.offsets[n], 0, count), j1 = clamp64(a.offsets[n + 1], j0, count);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t k = a.indices[j];
        if (k < a.K) s = fmaf(a.values[j], x[k], s);
      }
    } else if (a.format == SparseFormat::kTwoFour) {
      const float* v = a.values + n * a.groups * 2;
      const uint16_t* meta = a.indices + n * a.meta_words;
      for (int64_t g = 0; g < a.groups; ++g) {
        const unsigned word = static_cast<unsigned>(meta[g >> 2]) >> (4 * (g & 3));
        const int64_t k0 = 4 * g + (word & 3), k1 = 4 * g + ((word >> 2) & 3);
        if (k0 < a.K) s = fmaf(v[2 * g], x[k0], s);
        if (k1 < a.K) s = fmaf(v[2 * g + 1], x[k1], s);
      }
    } else {  // blocked
      const int64_t strip = n / a.block_n, c = n - strip * a.block_n;
      const int64_t t0 = clamp64(a.offsets[strip], 0, count), t1 = clamp64(a.offsets[strip + 1], t0, count);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = static_cast<int64_t>(a.indices[t]) * a.block_k;
        const float* w = a.values + t * a.block_k * a.block_n + c;
        for (int64_t kk = 0; kk < a.block_k && k0 + kk < a.K; ++kk) s = fmaf(w[kk * a.block_n], x[k0 + kk], s);
      }
    }
    a.y[i] = s;
  }
}

}  // namespace

int sparse_matmul_cuda(const SpmmArgs& a, int64_t count, void* stream) {
  const int64_t total = a.M * a.N;
  if (total == 0) return 0;
  constexpr int kThreads = 256;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride loop covers the rest
  SparseMatMulKernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a, count);
  return static_cast<int>(cudaGetLastError());
}

const char* sparse_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace onnxshrink
