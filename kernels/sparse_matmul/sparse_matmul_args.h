// Plain-data arguments of the SparseMatMul CPU kernels (no ORT types, so the
// ISA translation units and the CUDA launcher don't need ORT headers).
//
// Y[M, N] = A[M, K] x W[K, N] (+ bias[N]) with W stored sparse, column by
// column of W (one "row" of the compressed structure per output n):
//   csr      values f32 [nnz], indices u16 [nnz] (k of each nonzero),
//            offsets i32 [N + 1] (column n owns [offsets[n], offsets[n+1])).
//   blocked  W cut into tiles of block_k x block_n (k x n); only tiles with a
//            nonzero are stored: offsets i32 [ceil(N / block_n) + 1] per
//            column strip, indices u16 [tiles] (k / block_k of each tile),
//            values f32 [tiles, block_k, block_n] (k-major inside a tile,
//            zero padded past K and N).
//   2:4      at most 2 nonzeros in every group of 4 consecutive k:
//            values f32 [N, G, 2] with G = ceil(K / 4), meta u16
//            [N, ceil(G / 4)]: group g's two positions (0..3) are bits
//            [4(g%4), 4(g%4)+2) and [4(g%4)+2, 4(g%4)+4) of word g/4.
#pragma once

#include <cstdint>

namespace onnxshrink {

enum class SparseFormat : int32_t { kCsr = 0, kBlocked = 1, kTwoFour = 2 };

struct SpmmArgs {
  const float* a = nullptr;     // [M, K], row-major
  float* y = nullptr;           // [M, N]
  const float* bias = nullptr;  // [N] or null
  int64_t M = 0, K = 0, N = 0;
  SparseFormat format = SparseFormat::kCsr;
  const float* values = nullptr;
  const uint16_t* indices = nullptr;  // csr: k; blocked: k / block_k; 2:4: meta words
  const int32_t* offsets = nullptr;   // csr, blocked
  int64_t block_k = 1, block_n = 1;   // blocked
  int64_t groups = 0, meta_words = 0; // 2:4: G and ceil(G / 4)
  // Batched csr / 2:4 (M >= kTileMinRows): A transposed tile by tile,
  // [tiles][K][tile_rows], rows past M zero. Built by pack_tile.
  float* a_tiles = nullptr;
  int64_t tile_rows = 0;
};

// Below this many rows the kernels walk A row by row (one sparse dot per
// output); from it on, A is transposed into tiles once so that every nonzero
// is one broadcast and tile_rows multiply-adds on contiguous memory.
constexpr int64_t kTileMinRows = 4;

struct SpmmKernels {
  const char* isa;
  int64_t tile_rows;  // rows per transposed-A tile
  // Rows [m0, m1) of A, outputs [n0, n1) (block_n-aligned for blocked).
  void (*rows)(const SpmmArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // Transposed-A tile `tile` (csr and 2:4), outputs [n0, n1).
  void (*tile)(const SpmmArgs&, int64_t tile, int64_t n0, int64_t n1);
  // Fills tile `tile` of a_tiles.
  void (*pack_tile)(const SpmmArgs&, int64_t tile);
};

const SpmmKernels& spmm_kernels_portable();
#ifdef ONNXSHRINK_HAVE_AVX2
const SpmmKernels& spmm_kernels_avx2();
#endif
#ifdef ONNXSHRINK_HAVE_AVX512
const SpmmKernels& spmm_kernels_avx512();
#endif

// Best variant for this CPU, honouring ONNXSHRINK_FORCE_PORTABLE=1 (read on
// every call; called once per kernel instance).
const SpmmKernels& select_spmm_kernels();

#ifdef ONNXSHRINK_WITH_CUDA
// Launches on `stream` (a cudaStream_t); device pointers in `a`; `count` is
// the length of indices (csr, blocked). Returns 0 or a cudaError_t value.
int sparse_matmul_cuda(const SpmmArgs& device_args, int64_t count, void* stream);
const char* sparse_cuda_error_string(int err);
#endif

}  // namespace onnxshrink
