// DequantizePacked for the CPU execution provider: attribute parsing, run-time
// validation, ISA dispatch and row-parallel execution.
#include "dequantize_packed.h"

#include <algorithm>
#include <exception>
#include <limits>
#include <sstream>

namespace onnxshrink {

namespace {

std::string Prefix() { return std::string("ai.onnxshrink.") + kDequantizePackedName + ": "; }

}  // namespace

void DqAttrs::Parse(const OrtApi* api, const OrtKernelInfo* info) {
  if (!GetIntAttr(api, info, "bits", &bits)) {
    error = Prefix() + "missing required int attribute 'bits'";
    return;
  }
  if (bits < 1 || bits > 8) {
    error = Prefix() + "attribute 'bits' must be in 1..8, got " + std::to_string(bits);
    return;
  }
  if (!GetIntAttr(api, info, "block_size", &block_size)) {
    error = Prefix() + "missing required int attribute 'block_size'";
    return;
  }
  if (block_size <= 0) {
    error = Prefix() + "attribute 'block_size' must be > 0, got " + std::to_string(block_size);
    return;
  }
  size_t n = 0;
  OrtStatus* st = api->KernelInfoGetAttributeArray_int64(info, "shape", nullptr, &n);
  if (!st) {
    shape.resize(n);
    if (n) st = api->KernelInfoGetAttributeArray_int64(info, "shape", shape.data(), &n);
  }
  if (st) {
    api->ReleaseStatus(st);
    error = Prefix() + "missing required ints attribute 'shape'";
    return;
  }
  if (shape.empty()) {
    error = Prefix() + "attribute 'shape' must have at least one dimension";
    return;
  }
  // rows * cols * bits must fit in int64 (bit offsets are computed in int64).
  const int64_t limit = std::numeric_limits<int64_t>::max() / 16;
  rows = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) {
      error = Prefix() + "attribute 'shape' has a negative dimension: " + ShapeStr(shape);
      return;
    }
    if (i + 1 < shape.size()) {
      if (shape[i] && rows > limit / shape[i]) {
        error = Prefix() + "attribute 'shape' is too large: " + ShapeStr(shape);
        return;
      }
      rows *= shape[i];
    }
  }
  cols = shape.back();
  if (cols && rows > limit / cols) {
    error = Prefix() + "attribute 'shape' is too large: " + ShapeStr(shape);
    return;
  }
  n_blocks = (cols + block_size - 1) / block_size;
}

std::string ValidateInputs(const DqAttrs& a, const std::vector<int64_t>& codes_shape,
                           const std::vector<int64_t>& scales_shape, bool has_zp,
                           const std::vector<int64_t>& zp_shape) {
  const std::vector<int64_t> want{a.rows, a.n_blocks};
  const int64_t need = (a.rows * a.cols * a.bits + 7) / 8;
  if (codes_shape.size() != 1) {
    return Prefix() + "input 'codes' must be 1-D, got shape " + ShapeStr(codes_shape);
  }
  if (codes_shape[0] != need) {
    std::ostringstream os;
    os << Prefix() << "input 'codes' has " << codes_shape[0] << " bytes but output shape " << ShapeStr(a.shape)
       << " at bits=" << a.bits << " needs " << need << " (ceil(" << a.rows * a.cols << " * " << a.bits << " / 8))";
    return os.str();
  }
  if (scales_shape != want) {
    return Prefix() + "input 'scales' must have shape " + ShapeStr(want) + " ([rows, ceil(cols / block_size)] for shape " +
           ShapeStr(a.shape) + ", block_size=" + std::to_string(a.block_size) + "), got " + ShapeStr(scales_shape);
  }
  if (has_zp && zp_shape != want) {
    return Prefix() + "input 'zero_points' must have shape " + ShapeStr(want) + " (same as 'scales'), got " +
           ShapeStr(zp_shape);
  }
  return {};
}

DqRowsFn select_dequantize_rows(const char** isa_name) {
  const char* name = "portable";
  DqRowsFn fn = &dequantize_rows_portable;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
#ifdef ONNXSHRINK_HAVE_AVX512
  if (IsaAllowed("avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    name = "avx512";
    fn = &dequantize_rows_avx512;
    if (isa_name) *isa_name = name;
    return fn;
  }
#endif
#ifdef ONNXSHRINK_HAVE_AVX2
  if (IsaAllowed("avx2") && __builtin_cpu_supports("avx2")) {
    name = "avx2";
    fn = &dequantize_rows_avx2;
  }
#endif
#endif
  if (isa_name) *isa_name = name;
  return fn;
}

DequantizePackedCpu::DequantizePackedCpu(const OrtApi* api, const OrtKernelInfo* info) {
  attrs_.Parse(api, info);
  // Dispatch is chosen per kernel instance, i.e. when a session is created, so
  // ONNXSHRINK_FORCE_PORTABLE / ONNXSHRINK_MAX_ISA only have to be set before creating the session.
  rows_fn_ = select_dequantize_rows(&isa_);
}

namespace {
struct ParallelJob {
  const DqArgs* args;
  DqRowsFn fn;
  int64_t rows_per_task;
};
void RunTask(void* user, size_t task) {
  const auto* job = static_cast<const ParallelJob*>(user);
  const int64_t r0 = static_cast<int64_t>(task) * job->rows_per_task;
  const int64_t r1 = std::min<int64_t>(r0 + job->rows_per_task, job->args->rows);
  if (r0 < r1) job->fn(*job->args, r0, r1);
}
}  // namespace

Ort::Status DequantizePackedCpu::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<uint8_t>& codes,
                                         const Ort::Custom::Tensor<float>& scales, Ort::Custom::Tensor<float>& out) {
  try {
    if (!attrs_.error.empty()) return MakeError(attrs_.error);
    OpInput zp;
    if (OrtStatus* st = ReadOptionalInput(ctx, 2, &zp)) return Ort::Status(st);
    const std::string err = ValidateInputs(attrs_, codes.Shape(), scales.Shape(), zp.data != nullptr, zp.shape);
    if (!err.empty()) return MakeError(err);

    float* y = out.Allocate(attrs_.shape);
    if (attrs_.rows == 0 || attrs_.cols == 0) return Ort::Status(nullptr);

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

    // Split rows into tasks of >= ~32K outputs and hand them to ORT's
    // intra-op thread pool; small tensors run inline.
    const int64_t total = a.rows * a.cols;
    constexpr int64_t kTaskElems = 1 << 15;
    int64_t tasks = std::min<int64_t>(a.rows, total / kTaskElems);
    if (tasks > 1) {
      ParallelJob job{&a, rows_fn_, (a.rows + tasks - 1) / tasks};
      tasks = (a.rows + job.rows_per_task - 1) / job.rows_per_task;
      OrtStatus* st = Ort::GetApi().KernelContext_ParallelFor(ctx, &RunTask, static_cast<size_t>(tasks), 0, &job);
      if (!st) return Ort::Status(nullptr);
      Ort::GetApi().ReleaseStatus(st);  // no thread pool available: fall through to serial
    }
    rows_fn_(a, 0, a.rows);
    return Ort::Status(nullptr);
  } catch (const Ort::Exception& e) {
    return MakeError(Prefix() + e.what(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return MakeError(Prefix() + e.what(), ORT_FAIL);
  }
}

std::vector<Ort::Custom::OrtLiteCustomOp*> CreateDequantizePackedOps() {
  std::vector<Ort::Custom::OrtLiteCustomOp*> ops;
  auto add = [&ops](Ort::Custom::OrtLiteCustomOp* op) {
    // Inputs 0/1 (codes, scales) come from Compute's typed arguments; input 2
    // (zero_points, optional) is declared here and read by hand in Compute.
    op->input_types_.push_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    ops.push_back(op);
  };
  add(Ort::Custom::CreateLiteCustomOp<DequantizePackedCpu>(kDequantizePackedName, "CPUExecutionProvider"));
#ifdef ONNXSHRINK_WITH_CUDA
  add(Ort::Custom::CreateLiteCustomOp<DequantizePackedCuda>(kDequantizePackedName, "CUDAExecutionProvider"));
#endif
  return ops;
}

}  // namespace onnxshrink
