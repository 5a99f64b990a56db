// SparseMatMul for the CUDA execution provider (built only with
// -DONNXSHRINK_CUDA=ON). Same name, domain, attributes and shape checks as
// the CPU op; inputs and output live in device memory, shapes are host
// metadata, and the kernel skips out-of-range indices (see sparse_matmul.cu).
#include <exception>
#include <string>

#include "sparse_matmul.h"

namespace onnxshrink {

SparseMatMulCuda::SparseMatMulCuda(const OrtApi* api, const OrtKernelInfo* info) { attrs_.Parse(api, info); }

Ort::Status SparseMatMulCuda::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& a,
                                      const Ort::Custom::Tensor<float>& values, Ort::Custom::Tensor<float>& y) {
  try {
    if (!attrs_.error.empty()) return Ort::Status(attrs_.error.c_str(), ORT_INVALID_ARGUMENT);
    OpInput indices, offsets, bias;
    if (OrtStatus* st = ReadOptionalInput(ctx, 2, &indices)) return Ort::Status(st);
    if (OrtStatus* st = ReadOptionalInput(ctx, 3, &offsets)) return Ort::Status(st);
    if (OrtStatus* st = ReadOptionalInput(ctx, 4, &bias)) return Ort::Status(st);
    SpmmArgs args;
    const std::string err = ValidateSparseMatMul(attrs_, a.Shape(), values.Shape(), indices, offsets, bias,
                                                 /*check_structure=*/false, &args);
    if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);
    std::vector<int64_t> out_shape = a.Shape();
    out_shape.back() = attrs_.N;
    float* out = y.Allocate(out_shape);
    if (args.M == 0 || args.N == 0) return Ort::Status(nullptr);
    args.a = a.Data();
    args.values = values.Data();
    args.y = out;
    void* stream = nullptr;
    if (OrtStatus* st = Ort::GetApi().KernelContext_GetGPUComputeStream(ctx, &stream)) return Ort::Status(st);
    const int64_t count = attrs_.format == SparseFormat::kTwoFour ? 0 : indices.shape[0];
    const int rc = sparse_matmul_cuda(args, count, stream);
    if (rc != 0) {
      return Ort::Status((attrs_.prefix + "(CUDA) kernel launch failed: " + sparse_cuda_error_string(rc)).c_str(),
                         ORT_RUNTIME_EXCEPTION);
    }
    return Ort::Status(nullptr);
  } catch (const std::exception& e) {
    return Ort::Status((attrs_.prefix + "(CUDA) " + e.what()).c_str(), ORT_FAIL);
  }
}

}  // namespace onnxshrink
