// DequantizePacked for the CUDA execution provider (built only with
// -DONNXSHRINK_CUDA=ON). Same name, domain, attributes and validation as the
// CPU op; inputs and output live in device memory, shapes are host metadata.
#include <exception>
#include <string>

#include "dequantize_packed.h"

namespace onnxshrink {

DequantizePackedCuda::DequantizePackedCuda(const OrtApi* api, const OrtKernelInfo* info) { attrs_.Parse(api, info); }

Ort::Status DequantizePackedCuda::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<uint8_t>& codes,
                                          const Ort::Custom::Tensor<float>& scales, Ort::Custom::Tensor<float>& out) {
  try {
    if (!attrs_.error.empty()) return MakeError(attrs_.error);
    OpInput zp;
    if (OrtStatus* st = ReadOptionalInput(ctx, 2, &zp)) return Ort::Status(st);
    const std::string err = ValidateInputs(attrs_, codes.Shape(), scales.Shape(), zp.data != nullptr, zp.shape);
    if (!err.empty()) return MakeError(err);
    float* y = out.Allocate(attrs_.shape);
    if (attrs_.rows == 0 || attrs_.cols == 0) return Ort::Status(nullptr);

    void* stream = nullptr;
    if (OrtStatus* st = Ort::GetApi().KernelContext_GetGPUComputeStream(ctx, &stream)) return Ort::Status(st);

    DqArgs a;
    a.codes = codes.Data();
    a.scales = scales.Data();
    a.zero_points = static_cast<const uint8_t*>(zp.data);
    a.out = y;
    a.bits = static_cast<int>(attrs_.bits);
    a.block_size = attrs_.block_size;
    a.rows = attrs_.rows;
    a.cols = attrs_.cols;
    a.n_blocks = attrs_.n_blocks;
    const int rc = dequantize_packed_cuda(a, codes.Shape()[0], stream);
    if (rc != 0) {
      return MakeError(std::string("ai.onnxshrink.DequantizePacked (CUDA): kernel launch failed: ") + cuda_error_string(rc),
                       ORT_RUNTIME_EXCEPTION);
    }
    return Ort::Status(nullptr);
  } catch (const std::exception& e) {
    return MakeError(std::string("ai.onnxshrink.DequantizePacked (CUDA): ") + e.what(), ORT_FAIL);
  }
}

}  // namespace onnxshrink
