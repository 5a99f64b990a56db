// Portable (baseline ISA) variant of the DequantizePacked row kernel. Always
// built; ONNXSHRINK_FORCE_PORTABLE=1 selects it at run time.
#include <cstdint>

#define ONNXSHRINK_DQ_NAMESPACE portable

namespace onnxshrink {
namespace portable {
static inline void convert_block(const uint8_t* q, int64_t n, int32_t zp, float scale, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<int32_t>(q[i]) - zp) * scale;
}
}  // namespace portable
}  // namespace onnxshrink

#include "dequantize_packed_kernel.h"

namespace onnxshrink {
void dequantize_rows_portable(const DqArgs& a, int64_t r0, int64_t r1) { portable::dequantize_rows(a, r0, r1); }
}  // namespace onnxshrink
