// restora's C kernels as torch operators with C++ kernels, so the dispatcher calls them without a round trip
// into Python. A compiled decoding step calls restora::int4_amx_mm 210 times on SmolLM2-135M: through a Python
// kernel each call cost ~9 us of overhead, through this one ~1.5 us.
//
// This file knows no kernel code: restora.native loads the C kernels (int4_amx.c, attention_cpu.c, dequant4.c)
// and hands their entry points to restora_native_set(); an operator whose kernel was not handed over raises.
// The operators' schemas and fake (shape) implementations are defined in Python (restora.quant.int4_kernel,
// restora.attention_kernel).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

using Int4Gemm = int (*)(const void*, const void*, const void*, const void*, void*, int, int, int, int, int);
using AttentionDecode = int (*)(const void*, const void*, const void*, const void*, void*, int, int, int, int, int,
                                int, long, long, long, long, long, long, long, long, long, long, long, float, int);

using Dequant4 = int (*)(const void*, const void*, const void*, const void*, void*, int, int, int, int, int, int);

Int4Gemm int4_gemm = nullptr;
AttentionDecode attention_decode = nullptr;
Dequant4 dequant4 = nullptr;

at::Tensor int4_amx_mm(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales_zeros,
                       const at::Tensor& levels_in, int64_t out_features, int64_t group) {
  TORCH_CHECK(int4_gemm != nullptr, "restora::int4_amx_mm: the int4 kernel is not available here");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "restora::int4_amx_mm: x must be (M, K) bf16");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor levels = levels_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, out_features}, x.options());
  const int rc = int4_gemm(x.data_ptr(), packed.data_ptr(), scales_zeros.data_ptr(), levels.data_ptr(), y.data_ptr(),
                           static_cast<int>(M), static_cast<int>(out_features), static_cast<int>(K),
                           static_cast<int>(group), at::get_num_threads());
  TORCH_CHECK(rc == 0, "restora::int4_amx_mm: no memory for the widened codes or row sums of a (", out_features,
              ", ", K, ") layer");
  return y;
}

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& values,
                     const at::Tensor& mask_in, double scale) {
  TORCH_CHECK(attention_decode != nullptr, "restora::attention_decode: the native attention kernel is not available");
  const at::Tensor q = q_in.stride(-1) == 1 ? q_in : q_in.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = keys.size(1), E = keys.size(2);
  at::Tensor mask = mask_in.expand({B, 1, T, E});
  if (mask.stride(-1) != 1) mask = mask.contiguous();
  at::Tensor out = at::empty({B, T, Hq, D}, q.options());
  const int rc = attention_decode(q.data_ptr(), keys.data_ptr(), values.data_ptr(), mask.data_ptr(), out.data_ptr(),
                                  static_cast<int>(B), static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(T),
                                  static_cast<int>(E), static_cast<int>(D), q.stride(0), q.stride(1), q.stride(2),
                                  keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1),
                                  values.stride(2), mask.stride(0), mask.stride(2), static_cast<float>(scale),
                                  at::get_num_threads());
  TORCH_CHECK(rc == 0, "restora::attention_decode: no memory for the scores of ", E, " keys");
  return out;
}

// mode 0 (uniform): a fp16 scales, b uint8 zeros; mode 1 (code table): a fp32 absmax, levels fp32 (16,)
at::Tensor dequantize4(const at::Tensor& codes_in, const at::Tensor& a_in, const at::Tensor& b_in,
                       const at::Tensor& levels_in, int64_t in_features, int64_t group, int64_t mode, bool high_first) {
  TORCH_CHECK(dequant4 != nullptr, "restora::dequantize4: the kernel is not available here");
  const int64_t rows = codes_in.size(0), groups = in_features / group;
  TORCH_CHECK(codes_in.scalar_type() == at::kByte && codes_in.dim() == 2 && codes_in.size(1) == in_features / 2,
              "restora::dequantize4: codes must be uint8 (", rows, ", ", in_features / 2, ")");
  TORCH_CHECK(a_in.scalar_type() == (mode == 0 ? at::kHalf : at::kFloat) && a_in.numel() == rows * groups,
              "restora::dequantize4: scales must be ", (mode == 0 ? "float16" : "float32"), " with ", rows * groups,
              " values");
  TORCH_CHECK(mode != 0 || (b_in.scalar_type() == at::kByte && b_in.numel() == rows * groups),
              "restora::dequantize4: zeros must be uint8 with ", rows * groups, " values");
  const at::Tensor codes = codes_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor levels = levels_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({rows, in_features}, codes.options().dtype(at::kBFloat16));
  dequant4(codes.data_ptr(), a.data_ptr(), b.data_ptr(), levels.data_ptr(), out.data_ptr(), static_cast<int>(rows),
           static_cast<int>(in_features), static_cast<int>(group), static_cast<int>(mode), high_first ? 1 : 0,
           at::get_num_threads());
  return out;
}

}  // namespace

// Point operator `op` (its name without the namespace) at its C kernel. 0, or -1 for an unknown operator.
extern "C" int restora_native_set(const char* op, void* kernel) {
  if (std::strcmp(op, "int4_amx_mm") == 0) {
    int4_gemm = reinterpret_cast<Int4Gemm>(kernel);
  } else if (std::strcmp(op, "attention_decode") == 0) {
    attention_decode = reinterpret_cast<AttentionDecode>(kernel);
  } else if (std::strcmp(op, "dequantize4") == 0) {
    dequant4 = reinterpret_cast<Dequant4>(kernel);
  } else {
    return -1;
  }
  return 0;
}

TORCH_LIBRARY_IMPL(restora, CPU, m) {
  m.impl("int4_amx_mm", &int4_amx_mm);
  m.impl("attention_decode", &attention);
  m.impl("dequantize4", &dequantize4);
}
