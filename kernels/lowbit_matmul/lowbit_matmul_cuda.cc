// LowBitMatMul for the CUDA execution provider (built only with
// -DONNXSHRINK_CUDA=ON). Same name, domain, attributes and validation as the
// CPU op; inputs and output live in device memory, shapes are host metadata.
#include <exception>
#include <string>

#include "lowbit_matmul.h"

namespace onnxshrink {

LowBitMatMulCuda::LowBitMatMulCuda(const OrtApi* api, const OrtKernelInfo* info) { attrs_.Parse(api, info); }

Ort::Status LowBitMatMulCuda::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& a,
                                      const Ort::Custom::Tensor<uint8_t>& codes, Ort::Custom::Tensor<float>& y) {
  try {
    if (!attrs_.error.empty()) return Ort::Status(attrs_.error.c_str(), ORT_INVALID_ARGUMENT);
    OpInput scales, zero_points, bias, codebook;
    if (OrtStatus* st = ReadOptionalInput(ctx, 2, &scales)) return Ort::Status(st);
    if (OrtStatus* st = ReadOptionalInput(ctx, 3, &zero_points)) return Ort::Status(st);
    if (OrtStatus* st = ReadOptionalInput(ctx, 4, &bias)) return Ort::Status(st);
    if (OrtStatus* st = ReadOptionalInput(ctx, 5, &codebook)) return Ort::Status(st);
    LbArgs args;
    const std::string err =
        ValidateLowBitMatMul(attrs_, a.Shape(), codes.Shape(), scales, zero_points, bias, codebook, &args);
    if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);
    std::vector<int64_t> out_shape = a.Shape();
    out_shape.back() = attrs_.N;
    float* out = y.Allocate(out_shape);
    if (args.M == 0 || args.N == 0) return Ort::Status(nullptr);
    args.a = a.Data();
    args.codes = codes.Data();
    args.y = out;
    void* stream = nullptr;
    if (OrtStatus* st = Ort::GetApi().KernelContext_GetGPUComputeStream(ctx, &stream)) return Ort::Status(st);
    const int rc = lowbit_matmul_cuda(args, stream);
    if (rc != 0) {
      return Ort::Status((attrs_.prefix + "(CUDA) kernel launch failed: " + lowbit_cuda_error_string(rc)).c_str(),
                         ORT_RUNTIME_EXCEPTION);
    }
    return Ort::Status(nullptr);
  } catch (const std::exception& e) {
    return Ort::Status((attrs_.prefix + "(CUDA) " + e.what()).c_str(), ORT_FAIL);
  }
}

}  // namespace onnxshrink
