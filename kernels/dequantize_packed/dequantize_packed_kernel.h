// CPU row kernel of DequantizePacked, shared by every ISA variant.
//
// This header has no ORT dependency. Each ISA translation unit
// (dequantize_packed_portable.cc, *_avx2.cc, *_avx512.cc) defines
// ONNXSHRINK_DQ_NAMESPACE and an inline `convert_block()` before including it,
// and is compiled with its own -m flags, so the unpack loops below get
// auto-vectorised for that ISA while the portable copy stays baseline.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dequantize_packed_args.h"

#ifndef ONNXSHRINK_DQ_NAMESPACE
#error "define ONNXSHRINK_DQ_NAMESPACE before including dequantize_packed_kernel.h"
#endif

namespace onnxshrink {
namespace ONNXSHRINK_DQ_NAMESPACE {

// Codes are unpacked into a small stack buffer per chunk, then converted.
constexpr int64_t kChunk = 512;

// Unpacks `n` codes of width `bits` starting at absolute bit `bitpos` of the
// LSB-first stream. Reads only the bytes that hold those codes, so it never
// touches memory past the validated end of `codes`.
static inline void unpack_generic(const uint8_t* codes, int64_t bitpos, int64_t n, int bits,
                                  uint8_t* dst) {
  const uint8_t* p = codes + (bitpos >> 3);
  const int skip = static_cast<int>(bitpos & 7);
  const uint32_t mask = (1u << bits) - 1u;
  uint64_t acc = static_cast<uint64_t>(*p++) >> skip;
  int have = 8 - skip;
  for (int64_t i = 0; i < n; ++i) {
    if (have < bits) {  // bits <= 8, so one more byte is always enough
      acc |= static_cast<uint64_t>(*p++) << have;
      have += 8;
    }
    dst[i] = static_cast<uint8_t>(acc & mask);
    acc >>= bits;
    have -= bits;
  }
}

// Byte-aligned fast paths for the widths that divide 8: branch-free loops the
// compiler can vectorise. `n` must be a multiple of the codes per byte.
static inline void unpack_aligned4(const uint8_t* src, int64_t n, uint8_t* dst) {
  for (int64_t i = 0; i < n / 2; ++i) {
    const uint8_t b = src[i];
    dst[2 * i] = b & 0x0F;
    dst[2 * i + 1] = b >> 4;
  }
}
static inline void unpack_aligned2(const uint8_t* src, int64_t n, uint8_t* dst) {
  for (int64_t i = 0; i < n / 4; ++i) {
    const uint8_t b = src[i];
    dst[4 * i] = b & 3;
    dst[4 * i + 1] = (b >> 2) & 3;
    dst[4 * i + 2] = (b >> 4) & 3;
    dst[4 * i + 3] = b >> 6;
  }
}
static inline void unpack_aligned1(const uint8_t* src, int64_t n, uint8_t* dst) {
  for (int64_t i = 0; i < n / 8; ++i) {
    const uint8_t b = src[i];
    for (int k = 0; k < 8; ++k) dst[8 * i + k] = (b >> k) & 1;
  }
}

// Unpacks n codes at bitpos into dst; returns a pointer to the codes (for
// bits == 8 that is the input itself, no copy).
static inline const uint8_t* unpack(const uint8_t* codes, int64_t bitpos, int64_t n, int bits,
                                    uint8_t* dst) {
  if (bits == 8) return codes + (bitpos >> 3);
  if ((bitpos & 7) == 0 && (bits == 4 || bits == 2 || bits == 1)) {
    const int per_byte = 8 / bits;
    const int64_t n_fast = n - n % per_byte;
    const uint8_t* src = codes + (bitpos >> 3);
    if (bits == 4) unpack_aligned4(src, n_fast, dst);
    else if (bits == 2) unpack_aligned2(src, n_fast, dst);
    else unpack_aligned1(src, n_fast, dst);
    if (n_fast < n) unpack_generic(codes, bitpos + n_fast * bits, n - n_fast, bits, dst + n_fast);
    return dst;
  }
  unpack_generic(codes, bitpos, n, bits, dst);
  return dst;
}

// Rows [r0, r1). out = float(code - zp) * scale, computed exactly like the
// numpy reference (integer subtract, one float multiply, no FMA) so results
// are bit-identical.
static void dequantize_rows(const DqArgs& a, int64_t r0, int64_t r1) {
  alignas(64) uint8_t buf[kChunk];
  const int32_t default_zp = 1 << (a.bits - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row_bit = r * a.cols * a.bits;
    const float* srow = a.scales + r * a.n_blocks;
    const uint8_t* zrow = a.zero_points ? a.zero_points + r * a.n_blocks : nullptr;
    float* orow = a.out + r * a.cols;
    for (int64_t b = 0; b < a.n_blocks; ++b) {
      const int64_t c0 = b * a.block_size;
      const int64_t c1 = (c0 + a.block_size < a.cols) ? c0 + a.block_size : a.cols;
      const int32_t zp = zrow ? static_cast<int32_t>(zrow[b]) : default_zp;
      const float scale = srow[b];
      for (int64_t c = c0; c < c1; c += kChunk) {
        const int64_t n = (c1 - c < kChunk) ? c1 - c : kChunk;
        const uint8_t* q = unpack(a.codes, row_bit + c * a.bits, n, a.bits, buf);
        convert_block(q, n, zp, scale, orow + c);
      }
    }
  }
}

}  // namespace ONNXSHRINK_DQ_NAMESPACE
}  // namespace onnxshrink
