// ai.onnxshrink::LowBitMatMul — the ORT-facing part (attribute parsing,
// run-time validation, lite custom-op structs for the CPU and CUDA EPs).
// Layout and semantics: lowbit_matmul_args.h and docs/ops.md.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

#include "lowbit_matmul_args.h"
#include "op_common.h"

namespace onnxshrink {

constexpr const char* kLowBitMatMulName = "LowBitMatMul";

// Attributes, parsed once per kernel. Problems are kept in `error` and
// reported from Compute(): throwing from kernel creation would have to cross
// the C ABI into onnxruntime.
struct LbAttrs {
  int64_t K = 0, N = 0, bits = 0, block_size = 0;
  int64_t accuracy_level = 0;  // 4: int8 activations (linear weights); anything else: float32
  int64_t n_blocks = 0, block_bytes = 0;
  std::string prefix;  // "ai.onnxshrink.LowBitMatMul 'node': "
  std::string error;   // empty when the attributes are valid

  void Parse(const OrtApi* api, const OrtKernelInfo* info);
};

// Checks every shape and fills `args` (pointers and sizes, not `a`/`y`).
// Returns "" or a message that names the op, the input and what was expected.
std::string ValidateLowBitMatMul(const LbAttrs& attrs, const std::vector<int64_t>& a_shape,
                                 const std::vector<int64_t>& codes_shape, const OpInput& scales,
                                 const OpInput& zero_points, const OpInput& bias, const OpInput& codebook,
                                 LbArgs* args);

struct LowBitMatMulCpu {
  LowBitMatMulCpu(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& a,
                      const Ort::Custom::Tensor<uint8_t>& codes, Ort::Custom::Tensor<float>& y);

  LbAttrs attrs_;
  const LbKernels* kernels_ = nullptr;
};

#ifdef ONNXSHRINK_WITH_CUDA
struct LowBitMatMulCuda {
  LowBitMatMulCuda(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& a,
                      const Ort::Custom::Tensor<uint8_t>& codes, Ort::Custom::Tensor<float>& y);
  LbAttrs attrs_;
};
#endif

// Creates the op definitions (CPU, plus CUDA when built with it). The caller
// owns them and must keep them alive as long as any session uses them.
std::vector<Ort::Custom::OrtLiteCustomOp*> CreateLowBitMatMulOps();

}  // namespace onnxshrink
