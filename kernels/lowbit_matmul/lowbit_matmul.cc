// LowBitMatMul for the CPU execution provider: attribute parsing, run-time
// validation, ISA dispatch and parallel execution on ORT's intra-op pool.
#include "lowbit_matmul.h"

#include <algorithm>
#include <exception>

namespace onnxshrink {

void LbAttrs::Parse(const OrtApi* api, const OrtKernelInfo* info) {
  const std::string node = NodeName(api, info);
  prefix = std::string("ai.onnxshrink.") + kLowBitMatMulName + (node.empty() ? "" : " '" + node + "'") + ": ";
  if (!GetIntAttr(api, info, "K", &K) || !GetIntAttr(api, info, "N", &N)) {
    error = prefix + "missing required int attributes 'K' and 'N' (W is [K, N])";
    return;
  }
  if (K < 0 || N < 0) {
    error = prefix + "attributes 'K' and 'N' must be >= 0, got K=" + std::to_string(K) + ", N=" + std::to_string(N);
    return;
  }
  if (!GetIntAttr(api, info, "bits", &bits) || (bits != 2 && bits != 3 && bits != 4 && bits != 8)) {
    error = prefix + "int attribute 'bits' must be 2, 3, 4 or 8" + (bits ? ", got " + std::to_string(bits) : "");
    return;
  }
  if (!GetIntAttr(api, info, "block_size", &block_size) || block_size < 16 || block_size % 16 || block_size > (1 << 20)) {
    error = prefix + "int attribute 'block_size' must be a positive multiple of 16" +
            (block_size ? ", got " + std::to_string(block_size) : "");
    return;
  }
  n_blocks = (K + block_size - 1) / block_size;
  block_bytes = block_size * bits / 8;
  if (GetIntAttr(api, info, "accuracy_level", &accuracy_level) && (accuracy_level < 0 || accuracy_level > 4)) {
    error = prefix + "attribute 'accuracy_level' must be in 0..4 (4: int8 activations), got " + std::to_string(accuracy_level);
    return;
  }
  if (accuracy_level == 4 && block_size > kInt8MaxBlock) {
    error = prefix + "accuracy_level 4 needs block_size <= " + std::to_string(kInt8MaxBlock) + ", got " +
            std::to_string(block_size);
  }
}

std::string ValidateLowBitMatMul(const LbAttrs& at, const std::vector<int64_t>& a_shape,
                                 const std::vector<int64_t>& codes_shape, const OpInput& scales,
                                 const OpInput& zero_points, const OpInput& bias, const OpInput& codebook,
                                 LbArgs* args) {
  const std::string& p = at.prefix;
  if (a_shape.empty() || a_shape.back() != at.K) {
    return p + "input 'A' must have shape [..., K] with K=" + std::to_string(at.K) + ", got " + ShapeStr(a_shape);
  }
  const std::vector<int64_t> want_codes{at.N, at.n_blocks, at.block_bytes};
  if (codes_shape != want_codes) {
    return p + "input 'codes' must have shape [N, ceil(K / block_size), block_size * bits / 8] = " + ShapeStr(want_codes) +
           ", got " + ShapeStr(codes_shape);
  }
  const std::vector<int64_t> per_block{at.N, at.n_blocks};
  if (codebook.present) {
    const int64_t entries = int64_t{1} << at.bits;
    if (codebook.shape != std::vector<int64_t>{entries} && codebook.shape != std::vector<int64_t>{at.N, entries}) {
      return p + "input 'codebook' must have shape [2^bits] = [" + std::to_string(entries) + "] or [N, 2^bits] = [" +
             std::to_string(at.N) + ", " + std::to_string(entries) + "], got " + ShapeStr(codebook.shape);
    }
    if (scales.present || zero_points.present) {
      return p + "with a 'codebook' the weights are its entries: leave 'scales' and 'zero_points' empty";
    }
    args->codebook = static_cast<const float*>(codebook.data);
    args->codebook_stride = codebook.shape.size() == 2 ? entries : 0;
  } else {
    if (!scales.present) return p + "input 'scales' (float [N, ceil(K / block_size)]) is required without a 'codebook'";
    if (scales.shape != per_block) {
      return p + "input 'scales' must have shape [N, ceil(K / block_size)] = " + ShapeStr(per_block) + ", got " +
             ShapeStr(scales.shape);
    }
    if (zero_points.present && zero_points.shape != per_block) {
      return p + "input 'zero_points' must have shape [N, ceil(K / block_size)] = " + ShapeStr(per_block) + ", got " +
             ShapeStr(zero_points.shape);
    }
    args->scales = static_cast<const float*>(scales.data);
    args->zero_points = static_cast<const uint8_t*>(zero_points.data);
  }
  if (bias.present && bias.shape != std::vector<int64_t>{at.N}) {
    return p + "input 'bias' must have shape [N] = [" + std::to_string(at.N) + "], got " + ShapeStr(bias.shape);
  }
  args->bias = static_cast<const float*>(bias.data);
  int64_t m = 1;
  for (size_t i = 0; i + 1 < a_shape.size(); ++i) m *= a_shape[i];
  args->M = m;
  args->K = at.K;
  args->N = at.N;
  args->bits = static_cast<int>(at.bits);
  args->block = at.block_size;
  args->n_blocks = at.n_blocks;
  args->block_bytes = at.block_bytes;
  return {};
}

const LbKernels& select_lowbit_kernels() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
#ifdef ONNXSHRINK_HAVE_AVX512
  if (IsaAllowed("avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
#ifdef ONNXSHRINK_HAVE_AVX512_VNNI
    if (IsaAllowed("avx512_vnni") && __builtin_cpu_supports("avx512vnni")) {
#ifdef ONNXSHRINK_HAVE_AVX512_BF16
      if (IsaAllowed("avx512_bf16") && __builtin_cpu_supports("avx512bf16")) return lowbit_kernels_avx512_bf16();
#endif
      return lowbit_kernels_avx512_vnni();
    }
#endif
    return lowbit_kernels_avx512();
  }
#endif
#ifdef ONNXSHRINK_HAVE_AVX2
  if (IsaAllowed("avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return lowbit_kernels_avx2();
#endif
#endif
  return lowbit_kernels_portable();
}

LowBitMatMulCpu::LowBitMatMulCpu(const OrtApi* api, const OrtKernelInfo* info) {
  attrs_.Parse(api, info);
  // Dispatch is chosen per kernel instance, i.e. when a session is created.
  kernels_ = &select_lowbit_kernels();
}

namespace {

struct Job {
  const LbArgs* args;
  void (*fn)(const LbArgs&, int64_t, int64_t);
  int64_t chunk;  // columns per task
};

void RunChunk(void* user, size_t task) {
  const auto* job = static_cast<const Job*>(user);
  const int64_t n0 = static_cast<int64_t>(task) * job->chunk;
  const int64_t n1 = std::min(n0 + job->chunk, job->args->N);
  if (n0 < n1) job->fn(*job->args, n0, n1);
}

struct RowJob {
  const LbArgs* args;
  void (*fn)(const LbArgs&, int64_t, int64_t);
  int64_t chunk;  // rows per task
};

void RunRows(void* user, size_t task) {
  const auto* job = static_cast<const RowJob*>(user);
  const int64_t m0 = static_cast<int64_t>(task) * job->chunk;
  const int64_t m1 = std::min(m0 + job->chunk, job->args->M);
  if (m0 < m1) job->fn(*job->args, m0, m1);
}

// Runs fn over `tasks` on ORT's intra-op pool (serially when there is none).
template <typename J>
void ParallelFor(OrtKernelContext* ctx, void (*fn)(void*, size_t), int64_t tasks, J* job) {
  if (tasks > 1) {
    OrtStatus* st = Ort::GetApi().KernelContext_ParallelFor(ctx, fn, static_cast<size_t>(tasks), 0, job);
    if (!st) return;
    Ort::GetApi().ReleaseStatus(st);  // no thread pool: run serially
  }
  for (int64_t t = 0; t < tasks; ++t) fn(job, static_cast<size_t>(t));
}

}  // namespace

Ort::Status LowBitMatMulCpu::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& a,
                                     const Ort::Custom::Tensor<uint8_t>& codes, Ort::Custom::Tensor<float>& y) {
  try {
    if (!attrs_.error.empty()) return MakeError(attrs_.error);
    OpInput scales, zero_points, bias, codebook;
    if (OrtStatus* st = ReadOptionalInput(ctx, 2, &scales)) return Ort::Status(st);
    if (OrtStatus* st = ReadOptionalInput(ctx, 3, &zero_points)) return Ort::Status(st);
    if (OrtStatus* st = ReadOptionalInput(ctx, 4, &bias)) return Ort::Status(st);
    if (OrtStatus* st = ReadOptionalInput(ctx, 5, &codebook)) return Ort::Status(st);
    LbArgs args;
    const std::string err =
        ValidateLowBitMatMul(attrs_, a.Shape(), codes.Shape(), scales, zero_points, bias, codebook, &args);
    if (!err.empty()) return MakeError(err);

    std::vector<int64_t> out_shape = a.Shape();
    out_shape.back() = attrs_.N;
    float* out = y.Allocate(out_shape);
    if (args.M == 0 || args.N == 0) return Ort::Status(nullptr);
    args.a = a.Data();
    args.codes = codes.Data();
    args.y = out;

    // accuracy_level 4: int8 activations at every M, the numerics MatMulNBits'
    // level 4 has. 4-bit 4096 x 4096 at 12..128 rows: 1.3-2.9x the float
    // panel path (lower's cost model keeps MatMulNBits where it is faster).
    const bool int8 = attrs_.accuracy_level == 4 && !args.codebook;
    const LbKernels& kernels =
        int8 && !kernels_->int8_takes(args.bits, args.block) ? lowbit_kernels_portable() : *kernels_;
    // int8 activations: A is quantized once per call (rows in parallel) into
    // buffers of the calling thread that the column tasks then read.
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> sx;
    thread_local std::vector<int32_t> xqsum;
    thread_local std::vector<float> xqzp;
    if (int8) {
      args.xq_blocks = (args.n_blocks + kInt8BlockGroup - 1) / kInt8BlockGroup * kInt8BlockGroup;
      xq.resize(static_cast<size_t>(args.M * args.xq_blocks * args.block));
      sx.resize(static_cast<size_t>(args.M * args.xq_blocks));
      xqsum.resize(static_cast<size_t>(args.M * args.xq_blocks));
      xqzp.resize(static_cast<size_t>(args.M * args.xq_blocks));
      args.xq = xq.data();
      args.sx = sx.data();
      args.xqsum = xqsum.data();
      args.xqzp = xqzp.data();
      RowJob rows{&args, kernels.prepare_int8, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(args.K, 1))};
      ParallelFor(ctx, &RunRows, (args.M + rows.chunk - 1) / rows.chunk, &rows);
    }
    const bool gemm = !int8 && args.M >= kGemmMinRows;
    if (!int8 && !gemm && kernels.prepare_float) kernels.prepare_float(args);
    // Tasks of >= ~128K multiply-adds (at most 64; ORT batches them over its
    // threads); gemm chunks are whole panels.
    const int64_t align = gemm ? kernels.panel : 8;
    const int64_t work = args.M * std::max<int64_t>(args.K, 1) * args.N;
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(64, work >> 17));
    int64_t chunk = (args.N + tasks - 1) / tasks;
    chunk = (chunk + align - 1) / align * align;
    Job job{&args, int8 ? kernels.gemv_int8 : (gemm ? kernels.gemm : kernels.gemv), chunk};
    ParallelFor(ctx, &RunChunk, (args.N + chunk - 1) / chunk, &job);
    return Ort::Status(nullptr);
  } catch (const Ort::Exception& e) {
    return MakeError(attrs_.prefix + e.what(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return MakeError(attrs_.prefix + e.what(), ORT_FAIL);
  }
}

std::vector<Ort::Custom::OrtLiteCustomOp*> CreateLowBitMatMulOps() {
  std::vector<Ort::Custom::OrtLiteCustomOp*> ops;
  auto add = [&ops](Ort::Custom::OrtLiteCustomOp* op) {
    // Inputs 0/1 (A, codes) come from Compute's typed arguments; the optional
    // ones are declared here and read by hand in Compute.
    op->input_types_.push_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);  // 2: scales
    op->input_types_.push_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);  // 3: zero_points
    op->input_types_.push_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);  // 4: bias
    op->input_types_.push_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);  // 5: codebook
    ops.push_back(op);
  };
  add(Ort::Custom::CreateLiteCustomOp<LowBitMatMulCpu>(kLowBitMatMulName, "CPUExecutionProvider"));
#ifdef ONNXSHRINK_WITH_CUDA
  add(Ort::Custom::CreateLiteCustomOp<LowBitMatMulCuda>(kLowBitMatMulName, "CUDAExecutionProvider"));
#endif
  return ops;
}

}  // namespace onnxshrink
