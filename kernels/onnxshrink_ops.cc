// Entry point of the onnxshrink custom-op library (domain "ai.onnxshrink").
//
// The library is NOT linked against libonnxruntime: the runtime that loads it
// (e.g. the onnxruntime Python wheel) hands us its API table through
// RegisterCustomOps, and the C++ wrapper is initialised from that
// (ORT_API_MANUAL_INIT, defined for every TU by CMakeLists.txt). We compile
// against older headers than the runtime; the C API is versioned and
// ABI-stable, so asking for ORT_API_VERSION of the headers is safe.
#include <mutex>
#include <vector>

#include "onnxruntime_cxx_api.h"
#include "onnxruntime_lite_custom_op.h"

#include "dequantize_packed/dequantize_packed.h"
#include "lowbit_matmul/lowbit_matmul.h"
#include "sparse_matmul/sparse_matmul.h"

#if defined(_WIN32)
#define ONNXSHRINK_EXPORT __declspec(dllexport)
#else
#define ONNXSHRINK_EXPORT __attribute__((visibility("default")))
#endif

namespace {

constexpr const char* kDomain = "ai.onnxshrink";

// The domain and op definitions are created once and deliberately never
// freed: sessions keep raw pointers to them, and releasing the domain from a
// static destructor at exit could call into an already-unloaded onnxruntime.
struct Registry {
  OrtCustomOpDomain* domain = nullptr;
  std::vector<Ort::Custom::OrtLiteCustomOp*> ops;
};

std::once_flag g_once;
Registry* g_registry = nullptr;
OrtStatus* g_init_error = nullptr;  // kept (never released) so every caller sees it

OrtStatus* CopyStatus(const OrtApi* api, OrtStatus* st) {
  return api->CreateStatus(api->GetErrorCode(st), api->GetErrorMessage(st));
}

}  // namespace

extern "C" {

ONNXSHRINK_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    // Runtime older than our headers: report through the oldest API table.
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 ? v1->CreateStatus(ORT_FAIL, "onnxshrink_ops: onnxruntime is older than the headers it was built with")
              : nullptr;
  }
  Ort::InitApi(api);

  std::call_once(g_once, [api] {
    try {
      auto* reg = new Registry();
      reg->ops = onnxshrink::CreateDequantizePackedOps();
      for (auto* op : onnxshrink::CreateSparseMatMulOps()) reg->ops.push_back(op);
      for (auto* op : onnxshrink::CreateLowBitMatMulOps()) reg->ops.push_back(op);
      if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &reg->domain)) {
        g_init_error = st;
        return;
      }
      for (auto* op : reg->ops) {
        if (OrtStatus* st = api->CustomOpDomain_Add(reg->domain, op)) {
          g_init_error = st;
          return;
        }
      }
      g_registry = reg;
    } catch (const std::exception& e) {
      g_init_error = api->CreateStatus(ORT_FAIL, e.what());
    }
  });
  if (g_init_error) return CopyStatus(api, g_init_error);
  return api->AddCustomOpDomain(options, g_registry->domain);
}

// Diagnostic: which CPU kernel variant a session created now would use
// ("portable", "avx2" or "avx512"). Used by the tests via ctypes.
ONNXSHRINK_EXPORT const char* OnnxShrinkSelectedIsa(void) {
  const char* name = "portable";
  onnxshrink::select_dequantize_rows(&name);
  return name;
}

// The same for SparseMatMul and LowBitMatMul, which need FMA besides AVX2.
ONNXSHRINK_EXPORT const char* OnnxShrinkSparseMatMulIsa(void) { return onnxshrink::select_spmm_kernels().isa; }
ONNXSHRINK_EXPORT const char* OnnxShrinkLowBitMatMulIsa(void) { return onnxshrink::select_lowbit_kernels().isa; }

}  // extern "C"
