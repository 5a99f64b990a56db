// ai.onnxshrink::DequantizePacked — the ORT-facing part (attribute parsing,
// run-time validation, lite custom-op structs for the CPU and CUDA EPs).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

#include "dequantize_packed_args.h"
#include "op_common.h"

namespace onnxshrink {

constexpr const char* kDequantizePackedName = "DequantizePacked";

// Attributes, parsed once per kernel. Attribute problems are stored in
// `error` and reported from Compute(): throwing from kernel creation would
// have to cross the C ABI into onnxruntime.
struct DqAttrs {
  int64_t bits = 0;
  int64_t block_size = 0;
  std::vector<int64_t> shape;
  int64_t rows = 0, cols = 0, n_blocks = 0;
  std::string error;  // empty when the attributes are valid

  void Parse(const OrtApi* api, const OrtKernelInfo* info);
};

// Checks the input tensors against the attributes and fills the DqArgs shape
// fields; returns an empty string or an error message naming the op.
std::string ValidateInputs(const DqAttrs& attrs, const std::vector<int64_t>& codes_shape,
                           const std::vector<int64_t>& scales_shape, bool has_zero_points,
                           const std::vector<int64_t>& zero_points_shape);

struct DequantizePackedCpu {
  DequantizePackedCpu(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<uint8_t>& codes,
                      const Ort::Custom::Tensor<float>& scales, Ort::Custom::Tensor<float>& out);

  DqAttrs attrs_;
  DqRowsFn rows_fn_ = nullptr;
  const char* isa_ = "portable";
};

#ifdef ONNXSHRINK_WITH_CUDA
struct DequantizePackedCuda {
  DequantizePackedCuda(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<uint8_t>& codes,
                      const Ort::Custom::Tensor<float>& scales, Ort::Custom::Tensor<float>& out);
  DqAttrs attrs_;
};
#endif

// Creates the op definitions (CPU, plus CUDA when built with it). The caller
// owns them and must keep them alive as long as any session uses them.
std::vector<Ort::Custom::OrtLiteCustomOp*> CreateDequantizePackedOps();

}  // namespace onnxshrink
