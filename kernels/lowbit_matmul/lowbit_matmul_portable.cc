// Portable (baseline ISA) LowBitMatMul kernel. Always built and tested;
// ONNXSHRINK_FORCE_PORTABLE=1 selects it at run time. Each column of W is
// dequantized once into a float buffer, exactly like the numpy reference
// (integer subtract, one float multiply), then used by every row of A.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lowbit_matmul_args.h"

namespace onnxshrink {
namespace {

// Code i of an LSB-first packed block (a code spans at most two bytes).
inline uint32_t code_at(const uint8_t* block, int64_t i, int bits, int64_t block_bytes) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  uint32_t v = block[byte];
  if (byte + 1 < block_bytes) v |= static_cast<uint32_t>(block[byte + 1]) << 8;
  return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

void dequantize_column(const LbArgs& a, int64_t n, float* w) {
  const int64_t default_zp = int64_t{1} << (a.bits - 1);
  const float* table = a.codebook ? a.codebook + n * a.codebook_stride : nullptr;
  for (int64_t b = 0; b < a.n_blocks; ++b) {
    const uint8_t* block = a.codes + (n * a.n_blocks + b) * a.block_bytes;
    const int64_t k0 = b * a.block;
    const int64_t count = std::min(a.block, a.K - k0);
    if (table) {
      for (int64_t i = 0; i < count; ++i) w[k0 + i] = table[code_at(block, i, a.bits, a.block_bytes)];
      continue;
    }
    const int64_t zp = a.zero_points ? a.zero_points[n * a.n_blocks + b] : default_zp;
    const float scale = a.scales[n * a.n_blocks + b];
    for (int64_t i = 0; i < count; ++i) {
      w[k0 + i] = static_cast<float>(static_cast<int64_t>(code_at(block, i, a.bits, a.block_bytes)) - zp) * scale;
    }
  }
}

void run(const LbArgs& a, int64_t n0, int64_t n1) {
  thread_local std::vector<float> column;
  column.resize(static_cast<size_t>(a.K));
  for (int64_t n = n0; n < n1; ++n) {
    dequantize_column(a, n, column.data());
    const float* w = column.data();
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.a + m * a.K;
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t k = 0;
      for (; k + 4 <= a.K; k += 4) {
        s0 += x[k] * w[k];
        s1 += x[k + 1] * w[k + 1];
        s2 += x[k + 2] * w[k + 2];
        s3 += x[k + 3] * w[k + 3];
      }
      for (; k < a.K; ++k) s0 += x[k] * w[k];
      a.y[m * a.N + n] = (a.bias ? a.bias[n] : 0.0f) + ((s0 + s1) + (s2 + s3));
    }
  }
}

// accuracy_level 4, in A's natural order: per block, amax, xq = rint(x * (127 / amax)).
void prepare_int8(const LbArgs& a, int64_t m0, int64_t m1) {
  const int64_t kp = a.xq_blocks * a.block;
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.a + m * a.K;
    for (int64_t b = 0; b < a.n_blocks; ++b) {
      const int64_t k0 = b * a.block, count = std::min(a.block, a.K - k0);
      float amax = 0.0f;
      for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(x[k0 + i]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int8_t* q = a.xq + m * kp + k0;
      int32_t sum = 0;
      for (int64_t i = 0; i < a.block; ++i) {
        const int v = i < count ? static_cast<int>(std::nearbyint(x[k0 + i] * inv)) : 0;
        q[i] = static_cast<int8_t>(v);
        sum += v;
      }
      a.sx[m * a.xq_blocks + b] = amax / 127.0f;
      a.xqsum[m * a.xq_blocks + b] = sum;
    }
  }
}

void gemv_int8(const LbArgs& a, int64_t n0, int64_t n1) {
  thread_local std::vector<int32_t> codes;
  const int64_t kp = a.xq_blocks * a.block;
  const int32_t default_zp = int32_t{1} << (a.bits - 1);
  codes.resize(static_cast<size_t>(a.n_blocks * a.block));
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < a.n_blocks; ++b) {
      const uint8_t* block = a.codes + (n * a.n_blocks + b) * a.block_bytes;
      for (int64_t i = 0; i < a.block; ++i) codes[b * a.block + i] = static_cast<int32_t>(code_at(block, i, a.bits, a.block_bytes));
    }
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* q = a.xq + m * kp;
      float acc = 0.0f;
      for (int64_t b = 0; b < a.n_blocks; ++b) {
        const int32_t zp = a.zero_points ? a.zero_points[n * a.n_blocks + b] : default_zp;
        int32_t sum = 0;
        for (int64_t i = b * a.block; i < (b + 1) * a.block; ++i) sum += (codes[i] - zp) * q[i];
        acc += static_cast<float>(sum) * (a.scales[n * a.n_blocks + b] * a.sx[m * a.xq_blocks + b]);
      }
      a.y[m * a.N + n] = (a.bias ? a.bias[n] : 0.0f) + acc;
    }
  }
}

bool takes_any(int, int64_t) { return true; }

}  // namespace

const LbKernels& lowbit_kernels_portable() {
  static const LbKernels kernels{"portable", 1, &run, &run, &prepare_int8, &gemv_int8, &takes_any};
  return kernels;
}

}  // namespace onnxshrink
