// ai.onnxshrink::SparseMatMul — the ORT-facing part (attribute parsing,
// run-time validation, lite custom-op structs for the CPU and CUDA EPs).
// Formats and layouts: sparse_matmul_args.h and docs/ops.md.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

#include "op_common.h"
#include "sparse_matmul_args.h"

namespace onnxshrink {

constexpr const char* kSparseMatMulName = "SparseMatMul";

// Attributes, parsed once per kernel. Problems are kept in `error` and
// reported from Compute(): throwing from kernel creation would have to cross
// the C ABI into onnxruntime.
struct SpmmAttrs {
  int64_t K = 0, N = 0;
  SparseFormat format = SparseFormat::kCsr;
  int64_t block_k = 1, block_n = 1;
  std::string prefix;  // "ai.onnxshrink.SparseMatMul 'node': "
  std::string error;   // empty when the attributes are valid

  void Parse(const OrtApi* api, const OrtKernelInfo* info);
};

// Checks shapes (and, when `check_structure`, every index and offset, so the
// kernels never read out of bounds; host memory only) and fills the pointers
// of `args`.
// Returns "" or a message that names the op, the input and what was expected.
std::string ValidateSparseMatMul(const SpmmAttrs& attrs, const std::vector<int64_t>& a_shape,
                                 const std::vector<int64_t>& values_shape, const OpInput& indices,
                                 const OpInput& offsets, const OpInput& bias, bool check_structure,
                                 SpmmArgs* args);

struct SparseMatMulCpu {
  SparseMatMulCpu(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& a,
                      const Ort::Custom::Tensor<float>& values, Ort::Custom::Tensor<float>& y);

  SpmmAttrs attrs_;
  const SpmmKernels* kernels_ = nullptr;
  // Indices and offsets that are constant initializers are checked once, on
  // the first run that sees these exact buffers.
  const void* const_indices_ = nullptr;
  const void* const_offsets_ = nullptr;
  std::atomic<bool> structure_checked_{false};
};

#ifdef ONNXSHRINK_WITH_CUDA
struct SparseMatMulCuda {
  SparseMatMulCuda(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& a,
                      const Ort::Custom::Tensor<float>& values, Ort::Custom::Tensor<float>& y);
  SpmmAttrs attrs_;
};
#endif

// Creates the op definitions (CPU, plus CUDA when built with it). The caller
// owns them and must keep them alive as long as any session uses them.
std::vector<Ort::Custom::OrtLiteCustomOp*> CreateSparseMatMulOps();

}  // namespace onnxshrink
