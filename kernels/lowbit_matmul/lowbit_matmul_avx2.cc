// AVX2 + FMA variant of the LowBitMatMul kernels. Compiled with -mavx2 -mfma
// (see CMakeLists.txt) and only called after a CPUID check.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define ONNXSHRINK_LOWBIT_NAMESPACE lowbit_avx2

namespace onnxshrink {
namespace lowbit_avx2 {

struct Isa {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  // Codes [8 g, 8 g + 8): the 4 bytes at the group's first byte broadcast to
  // every lane (a single load), then a per-lane shift. Reads up to 2 bytes
  // past the group's bits (the caller pads the tensor's last block).
  template <int BITS>
  static I raw(const uint8_t* block, int64_t g) {
    if constexpr (BITS == 8) {
      return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + g * 8)));
    } else {
      int32_t word;
      std::memcpy(&word, block + g * BITS, 4);
      const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
      return _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts);
    }
  }

  // What linear() subtracts from each code.
  template <int BITS>
  static constexpr int base() { return BITS == 4 ? 0 : 1 << (BITS - 1); }

  // float(code - base): 2 and 3 bits by one in-register table lookup (vpermps
  // reads the low 3 index bits only, so the garbage above needs no mask; the
  // 2-bit table repeats to absorb bit 2): 3 instructions per 8 weights with
  // the multiply-add. 4 bits: mask and convert. 8 bits: subtract and convert.
  template <int BITS>
  static F linear(I r) {
    if constexpr (BITS == 2) {
      return _mm256_permutevar8x32_ps(_mm256_setr_ps(-2, -1, 0, 1, -2, -1, 0, 1), r);
    } else if constexpr (BITS == 3) {
      return _mm256_permutevar8x32_ps(_mm256_setr_ps(-4, -3, -2, -1, 0, 1, 2, 3), r);
    } else if constexpr (BITS == 4) {
      return _mm256_cvtepi32_ps(_mm256_and_si256(r, _mm256_set1_epi32(15)));
    } else {
      return _mm256_cvtepi32_ps(_mm256_sub_epi32(r, _mm256_set1_epi32(128)));
    }
  }

  // Codebook lookup: up to 8 entries in one register (one permute), 16 in
  // two (two permutes and a blend on bit 3), 256 by gather.
  template <int BITS>
  struct Lut {
    F lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    const float* table = nullptr;
    void load(const float* t) {
      if constexpr (BITS == 8) {
        table = t;
      } else {
        alignas(32) float tmp[16] = {};
        std::memcpy(tmp, t, sizeof(float) << BITS);  // the table has exactly 2^BITS entries
        if constexpr (BITS == 2) std::memcpy(tmp + 4, tmp, 4 * sizeof(float));  // bit 2 is garbage
        lo = _mm256_load_ps(tmp);
        hi = _mm256_load_ps(tmp + 8);
      }
    }
    F lookup(I r) const {
      if constexpr (BITS == 8) {
        return _mm256_i32gather_ps(table, r, 4);
      } else if constexpr (BITS == 4) {
        return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, r), _mm256_permutevar8x32_ps(hi, r),
                                _mm256_castsi256_ps(_mm256_slli_epi32(r, 28)));
      } else {
        return _mm256_permutevar8x32_ps(lo, r);
      }
    }
  };

  // dst[i * stride + j] = rows[j][i]: the classic 8 x 8 transpose.
  static void transpose_store(const F* rows, float* dst, int64_t stride) {
    const __m256 t0 = _mm256_unpacklo_ps(rows[0], rows[1]), t1 = _mm256_unpackhi_ps(rows[0], rows[1]);
    const __m256 t2 = _mm256_unpacklo_ps(rows[2], rows[3]), t3 = _mm256_unpackhi_ps(rows[2], rows[3]);
    const __m256 t4 = _mm256_unpacklo_ps(rows[4], rows[5]), t5 = _mm256_unpackhi_ps(rows[4], rows[5]);
    const __m256 t6 = _mm256_unpacklo_ps(rows[6], rows[7]), t7 = _mm256_unpackhi_ps(rows[6], rows[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst + 0 * stride, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + 1 * stride, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * stride, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * stride, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * stride, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * stride, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * stride, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * stride, _mm256_permute2f128_ps(u3, u7, 0x31));
  }
};

}  // namespace lowbit_avx2
}  // namespace onnxshrink

#include "lowbit_matmul_simd.h"

namespace onnxshrink {
namespace lowbit_avx2 {

// ------------------------------------------------------------------ accuracy_level 4 (int8 activations)
//
// 32 codes at a time become 32 bytes (decode32), in an order that depends on
// the width; prepare_int8 stores each 32-element chunk of xq in that same
// order, so one vpmaddubsw (u8 codes x s8 activations, pairs of products
// summed in int16: 2 * 15 * 127 cannot saturate) and one vpmaddwd do 32
// multiply-adds. 8-bit codes would saturate vpmaddubsw (2 * 255 * 127), so
// they take two 16-bit vpmaddwd instead.

// The code index held by byte p of a decoded 32-code chunk.
template <int BITS>
constexpr int chunk_code(int p) {
  if (BITS == 4) return p < 16 ? 2 * p : 2 * (p - 16) + 1;       // low nibbles, then high nibbles
  if (BITS == 2) return 4 * (p % 8) + p / 8;                        // bit-pair planes, one per qword
  if (BITS == 3) return 8 * ((p % 16) / 4) + 4 * (p / 16) + p % 4;  // 4 groups of 8, packed
  return p;
}

template <int BITS>
inline __m256i decode32(const uint8_t* chunk) {
  if constexpr (BITS == 4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk));
    const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
  } else if constexpr (BITS == 2) {
    int64_t w;
    std::memcpy(&w, chunk, 8);
    const __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x(w), _mm256_setr_epi64x(0, 2, 4, 6));
    return _mm256_and_si256(v, _mm256_set1_epi8(3));
  } else if constexpr (BITS == 3) {
    const __m256i seven = _mm256_set1_epi32(7);
    __m256i d[4];
    for (int g = 0; g < 4; ++g) d[g] = _mm256_and_si256(Isa::raw<3>(chunk, g), seven);
    return _mm256_packus_epi16(_mm256_packus_epi32(d[0], d[1]), _mm256_packus_epi32(d[2], d[3]));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
  }
}

// sum over the chunk of code * xq, as 8 int32 lanes.
template <int BITS>
inline __m256i dot32(__m256i codes, __m256i xq) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {
    const __m256i lo = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(codes)),
                                         _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xq)));
    const __m256i hi = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(codes, 1)),
                                         _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xq, 1)));
    return _mm256_add_epi32(lo, hi);
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xq), ones);
  }
}

template <int BITS>
void prepare_int8_bits(const LbArgs& a, int64_t m0, int64_t m1) {
  const int64_t kp = a.n_blocks * a.block;
  int perm[32];
  for (int p = 0; p < 32; ++p) perm[p] = chunk_code<BITS>(p);
  std::vector<int8_t> natural(static_cast<size_t>(a.block));
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.a + m * a.K;
    for (int64_t b = 0; b < a.n_blocks; ++b) {
      const int64_t k0 = b * a.block, count = std::min(a.block, a.K - k0);
      float amax = 0.0f;
      for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(x[k0 + i]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int64_t i = 0; i < a.block; ++i) {
        const int v = i < count ? static_cast<int>(std::nearbyint(x[k0 + i] * inv)) : 0;
        natural[i] = static_cast<int8_t>(v);
        sum += v;
      }
      int8_t* q = a.xq + m * kp + k0;
      for (int64_t c = 0; c < a.block; c += 32)
        for (int p = 0; p < 32; ++p) q[c + p] = natural[c + perm[p]];
      a.sx[m * a.n_blocks + b] = amax / 127.0f;
      a.xqsum[m * a.n_blocks + b] = sum;
    }
  }
}

// Rows [m, m + R), outputs [n0, n1). Per block, the zero point enters as an
// exact integer, (zp) * sum(xq), taken off one int32 lane before the convert.
template <int BITS, int R>
void gemv_int8_rows(const LbArgs& a, const uint8_t* padded_last_column, int64_t m, int64_t n0, int64_t n1) {
  const int64_t kp = a.n_blocks * a.block, chunks = a.block / 32, chunk_bytes = 4 * BITS;
  const int64_t column_bytes = a.n_blocks * a.block_bytes;
  const int32_t default_zp = 1 << (BITS - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* column = n == a.N - 1 ? padded_last_column : a.codes + n * column_bytes;
    const float* scales = a.scales + n * a.n_blocks;
    const uint8_t* zps = a.zero_points ? a.zero_points + n * a.n_blocks : nullptr;
    __m256 total[R];
    for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a.n_blocks; ++b) {
      const uint8_t* block = column + b * a.block_bytes;
      Isa::prefetch(block + column_bytes);
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m256i codes = decode32<BITS>(block + c * chunk_bytes);
        for (int r = 0; r < R; ++r) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m + r) * kp + b * a.block + c * 32));
          acc[r] = _mm256_add_epi32(acc[r], dot32<BITS>(codes, xv));
        }
      }
      const int32_t zp = zps ? zps[b] : default_zp;
      for (int r = 0; r < R; ++r) {
        const int64_t rb = (m + r) * a.n_blocks + b;
        const __m256i correction = _mm256_setr_epi32(zp * a.xqsum[rb], 0, 0, 0, 0, 0, 0, 0);
        const __m256 exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r], correction));
        total[r] = _mm256_fmadd_ps(exact, _mm256_set1_ps(scales[b] * a.sx[rb]), total[r]);
      }
    }
    const float bias = a.bias ? a.bias[n] : 0.0f;
    for (int r = 0; r < R; ++r) a.y[(m + r) * a.N + n] = bias + Isa::hsum(total[r]);
  }
}

template <int BITS>
void gemv_int8_bits(const LbArgs& a, int64_t n0, int64_t n1) {
  thread_local std::vector<uint8_t> last_column;
  const int64_t column_bytes = a.n_blocks * a.block_bytes;
  if (n1 == a.N) {  // decode32 may read a few bytes past a block: pad the tensor's last column
    last_column.assign(static_cast<size_t>(column_bytes + 8), 0);
    std::memcpy(last_column.data(), a.codes + (a.N - 1) * column_bytes, static_cast<size_t>(column_bytes));
  }
  for (int64_t m = 0; m < a.M;) {
    const int64_t rows = std::min<int64_t>(4, a.M - m);
    switch (rows) {
      case 4: gemv_int8_rows<BITS, 4>(a, last_column.data(), m, n0, n1); break;
      case 3: gemv_int8_rows<BITS, 3>(a, last_column.data(), m, n0, n1); break;
      case 2: gemv_int8_rows<BITS, 2>(a, last_column.data(), m, n0, n1); break;
      default: gemv_int8_rows<BITS, 1>(a, last_column.data(), m, n0, n1); break;
    }
    m += rows;
  }
}

}  // namespace lowbit_avx2

void lowbit_int8_prepare_avx2(const LbArgs& a, int64_t m0, int64_t m1) {
  switch (a.bits) {
    case 2: lowbit_avx2::prepare_int8_bits<2>(a, m0, m1); break;
    case 3: lowbit_avx2::prepare_int8_bits<3>(a, m0, m1); break;
    case 4: lowbit_avx2::prepare_int8_bits<4>(a, m0, m1); break;
    default: lowbit_avx2::prepare_int8_bits<8>(a, m0, m1); break;
  }
}

void lowbit_int8_gemv_avx2(const LbArgs& a, int64_t n0, int64_t n1) {
  switch (a.bits) {
    case 2: lowbit_avx2::gemv_int8_bits<2>(a, n0, n1); break;
    case 3: lowbit_avx2::gemv_int8_bits<3>(a, n0, n1); break;
    case 4: lowbit_avx2::gemv_int8_bits<4>(a, n0, n1); break;
    default: lowbit_avx2::gemv_int8_bits<8>(a, n0, n1); break;
  }
}

const LbKernels& lowbit_kernels_avx2() {
  return lowbit_avx2::kernels("avx2", &lowbit_int8_prepare_avx2, &lowbit_int8_gemv_avx2, 32);
}
}  // namespace onnxshrink
