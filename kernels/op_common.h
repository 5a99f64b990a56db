// Helpers every op's ORT-facing code shares: attribute reading, optional
// inputs, error statuses and shape text for messages.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

namespace onnxshrink {

// "[2, 3]" for messages.
std::string ShapeStr(const std::vector<int64_t>& shape);

// Attribute `name` into `*v`; false (and the status released) when absent.
bool GetIntAttr(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t* v);
bool GetStringAttr(const OrtApi* api, const OrtKernelInfo* info, const char* name, std::string* v);

// The node's name, or "" when ORT cannot give it.
std::string NodeName(const OrtApi* api, const OrtKernelInfo* info);

// An environment variable set to anything but "" or "0".
bool EnvFlag(const char* name);

// Whether run-time dispatch may pick `isa` ("avx2", "avx512", "avx512_vnni" or "avx512_bf16"):
// ONNXSHRINK_FORCE_PORTABLE=1 allows none; ONNXSHRINK_MAX_ISA=portable|avx2|avx512|avx512_vnni|
// avx512_bf16 caps the choice, so one machine can compare its ISAs (the CPU flags are checked
// separately).
bool IsaAllowed(const char* isa);

Ort::Status MakeError(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT);

// One optional input read by hand: lite ops cannot see an input that the node
// lists as "" (empty name) without dereferencing a null value.
struct OpInput {
  const void* data = nullptr;
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  bool present = false;
};

// Reads input `index` if the node has it (absent: `out` left as is).
OrtStatus* ReadOptionalInput(OrtKernelContext* ctx, size_t index, OpInput* out);

}  // namespace onnxshrink
