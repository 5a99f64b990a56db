#include "op_common.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

namespace onnxshrink {

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

bool GetIntAttr(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t* v) {
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, v);
  if (st) {
    api->ReleaseStatus(st);
    return false;
  }
  return true;
}

bool GetStringAttr(const OrtApi* api, const OrtKernelInfo* info, const char* name, std::string* v) {
  size_t size = 0;
  OrtStatus* st = api->KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (!st) {
    std::vector<char> buf(size + 1, '\0');
    st = api->KernelInfoGetAttribute_string(info, name, buf.data(), &size);
    if (!st) *v = buf.data();
  }
  if (st) {
    api->ReleaseStatus(st);
    return false;
  }
  return true;
}

std::string NodeName(const OrtApi* api, const OrtKernelInfo* info) {
  size_t size = 0;
  if (OrtStatus* st = api->KernelInfo_GetNodeName(info, nullptr, &size)) {
    api->ReleaseStatus(st);
    return {};
  }
  std::vector<char> buf(size + 1, '\0');
  if (OrtStatus* st = api->KernelInfo_GetNodeName(info, buf.data(), &size)) {
    api->ReleaseStatus(st);
    return {};
  }
  return buf.data();
}

bool EnvFlag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

// Dispatch levels, lowest first; "avx512_vnni" and "avx512_bf16" add LowBitMatMul
// kernels for those extensions (every CPU with BF16 has VNNI).
static int IsaRank(const char* isa) {
  static const char* const kLevels[] = {"portable", "avx2", "avx512", "avx512_vnni", "avx512_bf16"};
  for (int i = 0; i < 5; ++i)
    if (std::strcmp(isa, kLevels[i]) == 0) return i;
  return 0;  // a name we do not know: the always-built fallback
}

bool IsaAllowed(const char* isa) {
  if (EnvFlag("ONNXSHRINK_FORCE_PORTABLE")) return false;
  const char* cap = std::getenv("ONNXSHRINK_MAX_ISA");
  if (!cap || !*cap) return true;
  return IsaRank(isa) <= IsaRank(cap);
}

Ort::Status MakeError(const std::string& msg, OrtErrorCode code) { return Ort::Status(msg.c_str(), code); }

OrtStatus* ReadOptionalInput(OrtKernelContext* ctx, size_t index, OpInput* out) {
  const OrtApi& api = Ort::GetApi();
  size_t count = 0;
  if (OrtStatus* st = api.KernelContext_GetInputCount(ctx, &count)) return st;
  if (index >= count) return nullptr;
  const OrtValue* v = nullptr;
  if (OrtStatus* st = api.KernelContext_GetInput(ctx, index, &v)) return st;
  if (!v) return nullptr;  // listed in the node as "": absent
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = api.GetTensorTypeAndShape(v, &info)) return st;
  size_t rank = 0;
  OrtStatus* st = api.GetDimensionsCount(info, &rank);
  if (!st) {
    out->shape.resize(rank);
    st = api.GetDimensions(info, out->shape.data(), rank);
  }
  if (!st) st = api.GetTensorElementType(info, &out->type);
  api.ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;
  void* data = nullptr;
  // GetTensorMutableData is the only raw-data getter in the 1.21 C API; we only read through it.
  if (OrtStatus* s2 = api.GetTensorMutableData(const_cast<OrtValue*>(v), &data)) return s2;
  out->data = data;
  out->present = true;
  return nullptr;
}

}  // namespace onnxshrink
