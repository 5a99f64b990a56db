// SparseMatMul for the CPU execution provider: attribute parsing, run-time
// validation, ISA dispatch and parallel execution on ORT's intra-op pool.
#include "sparse_matmul.h"

#include <algorithm>
#include <cstdint>
#include <exception>

namespace onnxshrink {

namespace {

constexpr int64_t kMaxBlock = 64;       // block_k, block_n
constexpr int64_t kMaxIndex = 1 << 16;  // indices are uint16

const char* FormatName(SparseFormat f) {
  switch (f) {
    case SparseFormat::kCsr: return "csr";
    case SparseFormat::kBlocked: return "blocked";
    case SparseFormat::kTwoFour: return "2:4";
  }
  return "?";
}

// The data of input `index` when it is a constant initializer, else null.
const void* ConstantInputData(const OrtApi* api, const OrtKernelInfo* info, size_t index) {
  int is_constant = 0;
  const OrtValue* value = nullptr;
  if (OrtStatus* st = api->KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value)) {
    api->ReleaseStatus(st);
    return nullptr;
  }
  if (!is_constant || !value) return nullptr;
  void* data = nullptr;
  if (OrtStatus* st = api->GetTensorMutableData(const_cast<OrtValue*>(value), &data)) {
    api->ReleaseStatus(st);
    return nullptr;
  }
  return data;
}

int64_t NumElements(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

}  // namespace

void SpmmAttrs::Parse(const OrtApi* api, const OrtKernelInfo* info) {
  const std::string node = NodeName(api, info);
  prefix = std::string("ai.onnxshrink.") + kSparseMatMulName + (node.empty() ? "" : " '" + node + "'") + ": ";
  if (!GetIntAttr(api, info, "K", &K) || !GetIntAttr(api, info, "N", &N)) {
    error = prefix + "missing required int attributes 'K' and 'N' (W is [K, N])";
    return;
  }
  if (K < 0 || N < 0) {
    error = prefix + "attributes 'K' and 'N' must be >= 0, got K=" + std::to_string(K) + ", N=" + std::to_string(N);
    return;
  }
  std::string fmt = "csr";
  GetStringAttr(api, info, "format", &fmt);
  if (fmt == "csr") {
    format = SparseFormat::kCsr;
  } else if (fmt == "blocked") {
    format = SparseFormat::kBlocked;
  } else if (fmt == "2:4") {
    format = SparseFormat::kTwoFour;
  } else {
    error = prefix + "attribute 'format' must be 'csr', 'blocked' or '2:4', got '" + fmt + "'";
    return;
  }
  if (format == SparseFormat::kBlocked) {
    if (!GetIntAttr(api, info, "block_k", &block_k) || !GetIntAttr(api, info, "block_n", &block_n)) {
      error = prefix + "format 'blocked' needs int attributes 'block_k' and 'block_n'";
      return;
    }
    if (block_k < 1 || block_k > kMaxBlock || block_n < 1 || block_n > kMaxBlock) {
      error = prefix + "attributes 'block_k' and 'block_n' must be in 1.." + std::to_string(kMaxBlock) +
              ", got block_k=" + std::to_string(block_k) + ", block_n=" + std::to_string(block_n);
      return;
    }
    if ((K + block_k - 1) / block_k > kMaxIndex) {
      error = prefix + "K / block_k must be <= 65536 (tile indices are uint16), got K=" + std::to_string(K);
    }
  } else if (format == SparseFormat::kCsr && K > kMaxIndex) {
    error = prefix + "format 'csr' needs K <= 65536 (indices are uint16), got K=" + std::to_string(K);
  }
}

std::string ValidateSparseMatMul(const SpmmAttrs& at, const std::vector<int64_t>& a_shape,
                                 const std::vector<int64_t>& values_shape, const OpInput& indices,
                                 const OpInput& offsets, const OpInput& bias, bool check_structure,
                                 SpmmArgs* args) {
  const std::string& p = at.prefix;
  if (a_shape.empty() || a_shape.back() != at.K) {
    return p + "input 'A' must have shape [..., K] with K=" + std::to_string(at.K) + ", got " + ShapeStr(a_shape);
  }
  if (bias.present && bias.shape != std::vector<int64_t>{at.N}) {
    return p + "input 'bias' must have shape [N] = [" + std::to_string(at.N) + "], got " + ShapeStr(bias.shape);
  }
  if (!indices.present) {
    return p + "input 'indices' (uint16) is required for format '" + FormatName(at.format) + "'";
  }
  args->M = NumElements(std::vector<int64_t>(a_shape.begin(), a_shape.end() - 1));
  args->K = at.K;
  args->N = at.N;
  args->format = at.format;
  args->bias = static_cast<const float*>(bias.data);
  args->indices = static_cast<const uint16_t*>(indices.data);
  args->block_k = at.block_k;
  args->block_n = at.block_n;

  if (at.format == SparseFormat::kTwoFour) {
    if (offsets.present) return p + "format '2:4' takes no 'offsets' input (leave it empty)";
    const int64_t groups = (at.K + 3) / 4, words = (groups + 3) / 4;
    const std::vector<int64_t> want_values{at.N, groups, 2}, want_meta{at.N, words};
    if (values_shape != want_values) {
      return p + "input 'values' must have shape [N, ceil(K/4), 2] = " + ShapeStr(want_values) + " for format '2:4', got " +
             ShapeStr(values_shape);
    }
    if (indices.shape != want_meta) {
      return p + "input 'indices' (2:4 positions) must have shape [N, ceil(ceil(K/4)/4)] = " + ShapeStr(want_meta) +
             ", got " + ShapeStr(indices.shape);
    }
    args->groups = groups;
    args->meta_words = words;
    // Only a partial last group can point past K; its positions are checked
    // on every call (N reads), the rest cannot be out of range. (Not on the
    // CUDA provider, where the kernel skips such positions instead.)
    if (check_structure && at.K % 4) {
      const int64_t last = groups - 1, limit = at.K % 4;
      for (int64_t n = 0; n < at.N; ++n) {
        const unsigned word = static_cast<unsigned>(args->indices[n * words + last / 4]) >> (4 * (last % 4));
        if (static_cast<int64_t>(word & 3) >= limit || static_cast<int64_t>((word >> 2) & 3) >= limit) {
          return p + "input 'indices': column " + std::to_string(n) + " has a 2:4 position past K=" + std::to_string(at.K) +
                 " in its last group";
        }
      }
    }
    return {};
  }

  // csr and blocked: offsets over columns (csr) or column strips (blocked).
  const int64_t rows = at.format == SparseFormat::kCsr ? at.N : (at.N + at.block_n - 1) / at.block_n;
  if (!offsets.present) return p + "input 'offsets' (int32) is required for format '" + FormatName(at.format) + "'";
  if (offsets.shape != std::vector<int64_t>{rows + 1}) {
    return p + "input 'offsets' must have shape [" + std::to_string(rows + 1) + "] (" +
           (at.format == SparseFormat::kCsr ? "N + 1" : "ceil(N / block_n) + 1") + "), got " + ShapeStr(offsets.shape);
  }
  if (indices.shape.size() != 1) return p + "input 'indices' must be 1-D, got shape " + ShapeStr(indices.shape);
  const int64_t count = indices.shape[0];
  if (at.format == SparseFormat::kCsr) {
    if (values_shape != std::vector<int64_t>{count}) {
      return p + "input 'values' must have shape [nnz] = [" + std::to_string(count) + "] (as 'indices'), got " +
             ShapeStr(values_shape);
    }
  } else {
    const std::vector<int64_t> want{count, at.block_k, at.block_n};
    if (values_shape != want) {
      return p + "input 'values' must have shape [tiles, block_k, block_n] = " + ShapeStr(want) + ", got " +
             ShapeStr(values_shape);
    }
  }
  args->offsets = static_cast<const int32_t*>(offsets.data);
  if (!check_structure) return {};
  const int32_t* off = args->offsets;
  if (off[0] != 0 || off[rows] != count) {
    return p + "input 'offsets' must start at 0 and end at the number of " +
           (at.format == SparseFormat::kCsr ? "nonzeros" : "tiles") + " (" + std::to_string(count) + "), got " +
           std::to_string(off[0]) + " .. " + std::to_string(off[rows]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (off[r + 1] < off[r]) return p + "input 'offsets' must not decrease (at position " + std::to_string(r + 1) + ")";
  }
  const int64_t limit = at.format == SparseFormat::kCsr ? at.K : (at.K + at.block_k - 1) / at.block_k;
  const uint16_t* ix = args->indices;
  uint16_t top = 0;
  for (int64_t j = 0; j < count; ++j) top = std::max(top, ix[j]);  // branch-free scan, vectorises
  if (count && top >= limit) {
    const int64_t bad = std::find_if(ix, ix + count, [limit](uint16_t v) { return v >= limit; }) - ix;
    return p + "input 'indices' has " + std::to_string(ix[bad]) + " at position " + std::to_string(bad) + ", not below " +
           (at.format == SparseFormat::kCsr ? "K = " : "ceil(K / block_k) = ") + std::to_string(limit);
  }
  return {};
}

const SpmmKernels& select_spmm_kernels() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
#ifdef ONNXSHRINK_HAVE_AVX512
  if (IsaAllowed("avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return spmm_kernels_avx512();
  }
#endif
#ifdef ONNXSHRINK_HAVE_AVX2
  if (IsaAllowed("avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return spmm_kernels_avx2();
#endif
#endif
  return spmm_kernels_portable();
}

SparseMatMulCpu::SparseMatMulCpu(const OrtApi* api, const OrtKernelInfo* info) {
  attrs_.Parse(api, info);
  // Dispatch is chosen per kernel instance, i.e. when a session is created.
  kernels_ = &select_spmm_kernels();
  const_indices_ = ConstantInputData(api, info, 2);
  const_offsets_ = ConstantInputData(api, info, 3);
}

namespace {

// Work of one task: rows [m0, m1) or one transposed tile, columns [n0, n1).
struct Job {
  const SpmmArgs* args;
  const SpmmKernels* kernels;
  const std::vector<int64_t>* bounds;  // column chunk boundaries
  int64_t chunks;
  bool tiled;
};

void RunChunk(void* user, size_t task) {
  const auto* job = static_cast<const Job*>(user);
  const int64_t t = static_cast<int64_t>(task);
  const int64_t chunk = t % job->chunks;
  const int64_t n0 = (*job->bounds)[chunk], n1 = (*job->bounds)[chunk + 1];
  if (n0 >= n1) return;
  if (job->tiled) {
    job->kernels->tile(*job->args, t / job->chunks, n0, n1);
  } else {
    job->kernels->rows(*job->args, 0, job->args->M, n0, n1);
  }
}

void RunPack(void* user, size_t task) {
  const auto* job = static_cast<const Job*>(user);
  job->kernels->pack_tile(*job->args, static_cast<int64_t>(task));
}

// Runs fn over `tasks` on ORT's intra-op pool (serially when there is none).
void ParallelFor(OrtKernelContext* ctx, void (*fn)(void*, size_t), int64_t tasks, Job* job) {
  if (tasks > 1) {
    OrtStatus* st = Ort::GetApi().KernelContext_ParallelFor(ctx, fn, static_cast<size_t>(tasks), 0, job);
    if (!st) return;
    Ort::GetApi().ReleaseStatus(st);  // no thread pool: run serially
  }
  for (int64_t t = 0; t < tasks; ++t) fn(job, static_cast<size_t>(t));
}

// Column chunk boundaries with about equal work (nonzeros plus a per-column
// cost) in each; blocked chunks are whole column strips.
std::vector<int64_t> ColumnChunks(const SpmmArgs& a, int64_t rows_per_task) {
  const int64_t unit = a.format == SparseFormat::kBlocked ? a.block_n : 1;
  const int64_t units = (a.N + unit - 1) / unit;
  auto work_of = [&](int64_t u) -> int64_t {
    switch (a.format) {
      case SparseFormat::kCsr: return a.offsets[u + 1] - a.offsets[u] + 8;
      case SparseFormat::kBlocked: return (a.offsets[u + 1] - a.offsets[u]) * a.block_k * a.block_n + 8;
      case SparseFormat::kTwoFour: return 2 * a.groups + 8;
    }
    return 1;
  };
  int64_t total = 0;
  for (int64_t u = 0; u < units; ++u) total += work_of(u);
  // ~32K multiply-adds a task at least; ORT batches tasks over its threads.
  constexpr int64_t kTaskWork = 1 << 15;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({units, 256, total * rows_per_task / kTaskWork}));
  std::vector<int64_t> bounds{0};
  int64_t done = 0;
  for (int64_t u = 0; u < units; ++u) {
    done += work_of(u);
    if (done * chunks >= total * static_cast<int64_t>(bounds.size()) && static_cast<int64_t>(bounds.size()) < chunks) {
      bounds.push_back(std::min(a.N, (u + 1) * unit));
    }
  }
  if (bounds.back() != a.N) bounds.push_back(a.N);
  return bounds;
}

}  // namespace

Ort::Status SparseMatMulCpu::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& a,
                                     const Ort::Custom::Tensor<float>& values, Ort::Custom::Tensor<float>& y) {
  try {
    if (!attrs_.error.empty()) return MakeError(attrs_.error);
    OpInput indices, offsets, bias;
    if (OrtStatus* st = ReadOptionalInput(ctx, 2, &indices)) return Ort::Status(st);
    if (OrtStatus* st = ReadOptionalInput(ctx, 3, &offsets)) return Ort::Status(st);
    if (OrtStatus* st = ReadOptionalInput(ctx, 4, &bias)) return Ort::Status(st);

    const bool constant = indices.data && indices.data == const_indices_ &&
                          (attrs_.format == SparseFormat::kTwoFour || (offsets.data && offsets.data == const_offsets_));
    const bool check = !(constant && structure_checked_.load(std::memory_order_acquire)) ||
                       attrs_.format == SparseFormat::kTwoFour;  // its check is O(N): always
    SpmmArgs args;
    const std::string err = ValidateSparseMatMul(attrs_, a.Shape(), values.Shape(), indices, offsets, bias, check, &args);
    if (!err.empty()) return MakeError(err);
    if (constant && check) structure_checked_.store(true, std::memory_order_release);

    std::vector<int64_t> out_shape = a.Shape();
    out_shape.back() = attrs_.N;
    float* out = y.Allocate(out_shape);
    if (args.M == 0 || args.N == 0) return Ort::Status(nullptr);
    args.a = a.Data();
    args.values = values.Data();
    args.y = out;

    const bool tiled = args.format != SparseFormat::kBlocked && args.M >= kTileMinRows;
    Job job{&args, kernels_, nullptr, 1, tiled};
    // The transposed tiles live in a per-thread buffer of the calling thread,
    // reused across runs; pool threads only read it while this call waits.
    thread_local std::vector<float> tile_buffer;
    int64_t tiles = 1;
    if (tiled) {
      args.tile_rows = kernels_->tile_rows;
      tiles = (args.M + args.tile_rows - 1) / args.tile_rows;
      // 64-byte aligned: a 16-row tile row is then exactly one cache line.
      tile_buffer.resize(static_cast<size_t>(tiles * args.K * args.tile_rows + 16));
      const uintptr_t raw = reinterpret_cast<uintptr_t>(tile_buffer.data());
      args.a_tiles = reinterpret_cast<float*>((raw + 63) & ~uintptr_t{63});
      ParallelFor(ctx, &RunPack, tiles, &job);
    }
    const std::vector<int64_t> bounds = ColumnChunks(args, tiled ? args.tile_rows : args.M);
    job.bounds = &bounds;
    job.chunks = static_cast<int64_t>(bounds.size()) - 1;
    ParallelFor(ctx, &RunChunk, tiles * job.chunks, &job);
    return Ort::Status(nullptr);
  } catch (const Ort::Exception& e) {
    return MakeError(attrs_.prefix + e.what(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return MakeError(attrs_.prefix + e.what(), ORT_FAIL);
  }
}

std::vector<Ort::Custom::OrtLiteCustomOp*> CreateSparseMatMulOps() {
  std::vector<Ort::Custom::OrtLiteCustomOp*> ops;
  auto add = [&ops](Ort::Custom::OrtLiteCustomOp* op) {
    // Inputs 0/1 (A, values) come from Compute's typed arguments; the rest
    // depend on the format, are declared here and read by hand in Compute.
    op->input_types_.push_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16);  // 2: indices / 2:4 positions
    op->input_types_.push_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32);   // 3: offsets
    op->input_types_.push_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);   // 4: bias
    ops.push_back(op);
  };
  add(Ort::Custom::CreateLiteCustomOp<SparseMatMulCpu>(kSparseMatMulName, "CPUExecutionProvider"));
#ifdef ONNXSHRINK_WITH_CUDA
  add(Ort::Custom::CreateLiteCustomOp<SparseMatMulCuda>(kSparseMatMulName, "CUDAExecutionProvider"));
#endif
  return ops;
}

}  // namespace onnxshrink
