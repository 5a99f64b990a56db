// Plain-data arguments of the DequantizePacked CPU kernels (no ORT types, so
// the ISA translation units and the CUDA launcher don't need ORT headers).
#pragma once

#include <cstdint>

namespace onnxshrink {

struct DqArgs {
  const uint8_t* codes = nullptr;        // packed LSB-first code stream
  const float* scales = nullptr;         // [rows, n_blocks]
  const uint8_t* zero_points = nullptr;  // [rows, n_blocks] or null
  float* out = nullptr;                  // [rows, cols]
  int bits = 0;
  int64_t block_size = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t n_blocks = 0;
};

using DqRowsFn = void (*)(const DqArgs&, int64_t row_begin, int64_t row_end);

// One entry point per ISA; the AVX ones exist only when compiled in.
void dequantize_rows_portable(const DqArgs&, int64_t, int64_t);
#ifdef ONNXSHRINK_HAVE_AVX2
void dequantize_rows_avx2(const DqArgs&, int64_t, int64_t);
#endif
#ifdef ONNXSHRINK_HAVE_AVX512
void dequantize_rows_avx512(const DqArgs&, int64_t, int64_t);
#endif

// Picks the best variant for this CPU, honouring ONNXSHRINK_FORCE_PORTABLE=1.
// Reads the environment on every call (done once per kernel instance).
DqRowsFn select_dequantize_rows(const char** isa_name);

#ifdef ONNXSHRINK_WITH_CUDA
// Launches on `stream` (a cudaStream_t); returns 0 or a cudaError_t value.
int dequantize_packed_cuda(const DqArgs& device_args, int64_t codes_bytes, void* stream);
const char* cuda_error_string(int err);
#endif

}  // namespace onnxshrink
