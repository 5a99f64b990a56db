// What the AVX-512 float gemvs (lowbit_matmul_bf16.cc, lowbit_matmul_digits.cc)
// do around their row kernels: the tensor's last column padded, passes of up to
// 4 rows, the zero-point choice, and columns in groups. Each TU includes it with
// its own ISA flags; everything here has internal linkage, so no copy compiled
// for one ISA can stand in for another's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lowbit_matmul_args.h"

namespace onnxshrink {
namespace {

// Kernel::rows<R, C, ZP>(a, padded_last, m, n0, n1) computes rows [m, m + R)
// of Y over columns [n0, n1), C at a time; `padded_last` is the tensor's last
// column followed by `kPad` zero bytes, because a span may read past a column's
// last block (into the next column, which meets zero activations; past the
// tensor's end it must not).
template <class Kernel, int R, bool ZP>
void gemv_columns(const LbArgs& a, const uint8_t* padded_last, int64_t m, int64_t n0, int64_t n1) {
  constexpr int C = R == 1 ? 4 : R == 2 ? 2 : 1;  // the accumulators fit the 32 registers
  const int64_t grouped = n0 + (n1 - n0) / C * C;
  Kernel::template rows<R, C, ZP>(a, padded_last, m, n0, grouped);
  if (grouped < n1) Kernel::template rows<R, 1, ZP>(a, padded_last, m, grouped, n1);
}

template <class Kernel, int R>
void gemv_rows_pass(const LbArgs& a, const uint8_t* padded_last, int64_t m, int64_t n0, int64_t n1) {
  if (a.zero_points) gemv_columns<Kernel, R, true>(a, padded_last, m, n0, n1);
  else gemv_columns<Kernel, R, false>(a, padded_last, m, n0, n1);
}

template <class Kernel, int64_t kPad>
void gemv_passes(const LbArgs& a, int64_t n0, int64_t n1) {
  thread_local std::vector<uint8_t> last_column;
  const int64_t column_bytes = a.n_blocks * a.block_bytes;
  if (n1 == a.N) {  // this task reads the tensor's last column
    last_column.assign(static_cast<size_t>(column_bytes + kPad), 0);
    std::memcpy(last_column.data(), a.codes + (a.N - 1) * column_bytes, static_cast<size_t>(column_bytes));
  }
  for (int64_t m = 0; m < a.M;) {
    const int rows = static_cast<int>(std::min<int64_t>(4, a.M - m));
    switch (rows) {
      case 4: gemv_rows_pass<Kernel, 4>(a, last_column.data(), m, n0, n1); break;
      case 3: gemv_rows_pass<Kernel, 3>(a, last_column.data(), m, n0, n1); break;
      case 2: gemv_rows_pass<Kernel, 2>(a, last_column.data(), m, n0, n1); break;
      default: gemv_rows_pass<Kernel, 1>(a, last_column.data(), m, n0, n1); break;
    }
    m += rows;
  }
}

}  // namespace
}  // namespace onnxshrink
