// torch side of the decode kernel in prefix_attention.cu: checks, contiguity, workspace, stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

#include "bindings.h"
#include "prefix_attention.h"

namespace {

torch::Tensor prefix_attention_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                      std::optional<torch::Tensor> prefix_k, std::optional<torch::Tensor> prefix_v,
                                      std::optional<torch::Tensor> key_padding_mask,
                                      std::optional<torch::Tensor> cache_lens, bool causal, double scale,
                                      int64_t num_splits) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "prefix_attention_decode: q, k, v must be CUDA tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prefix_attention_decode: q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "prefix_attention_decode: dtype must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "prefix_attention_decode: k and v must have q's dtype");
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && v.sizes() == k.sizes(), "prefix_attention_decode: k, v must be (B, Hkv, S, D)");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "prefix_attention_decode: q heads must be a multiple of kv heads");
  TORCH_CHECK(L >= 1 && L <= pet_fast::kDecodeMaxQueries, "prefix_attention_decode: q_len must be 1..",
              pet_fast::kDecodeMaxQueries, ", got ", L);
  TORCH_CHECK(D >= 1 && D <= pet_fast::kDecodeMaxHeadDim, "prefix_attention_decode: head_dim must be 1..",
              pet_fast::kDecodeMaxHeadDim, ", got ", D);
  TORCH_CHECK(B <= 65535 && Hq <= 65535, "prefix_attention_decode: batch and heads must be <= 65535");
  c10::cuda::CUDAGuard guard(q.device());
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();

  torch::Tensor pk, pv;
  int64_t P = 0, pk_bstride = 0;
  if (prefix_k.has_value() && prefix_k->defined() && prefix_k->size(-2) > 0) {
    TORCH_CHECK(prefix_v.has_value() && prefix_v->defined() && prefix_v->sizes() == prefix_k->sizes(),
                "prefix_attention_decode: prefix_v must match prefix_k");
    pk = prefix_k->contiguous();
    pv = prefix_v->contiguous();
    TORCH_CHECK(pk.scalar_type() == q.scalar_type() && pv.scalar_type() == q.scalar_type() && pk.is_cuda() && pv.is_cuda(),
                "prefix_attention_decode: prefix must be CUDA tensors of q's dtype");
    if (pk.dim() == 3) {
      TORCH_CHECK(pk.size(0) == Hkv && pk.size(2) == D, "prefix_attention_decode: prefix must be (Hkv, P, D)");
      P = pk.size(1);
    } else {
      TORCH_CHECK(pk.dim() == 4 && pk.size(0) == B && pk.size(1) == Hkv && pk.size(3) == D,
                  "prefix_attention_decode: prefix must be (Hkv, P, D) or (B, Hkv, P, D)");
      P = pk.size(2);
      pk_bstride = Hkv * P * D;
    }
  }
  torch::Tensor mask;
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    TORCH_CHECK(key_padding_mask->dim() == 2 && key_padding_mask->size(0) == B && key_padding_mask->size(1) == S,
                "prefix_attention_decode: key_padding_mask must be (B, S)");
    mask = key_padding_mask->to(q.device(), at::kByte).contiguous();
  }
  torch::Tensor lens;
  if (cache_lens.has_value() && cache_lens->defined()) {
    TORCH_CHECK(cache_lens->numel() == B, "prefix_attention_decode: cache_lens must have B entries");
    lens = cache_lens->to(q.device(), at::kInt).contiguous();
  }

  TORCH_CHECK(P + S <= pet_fast::kDecodeMaxKeys, "prefix_attention_decode: prefix plus cache length must be <= ",
              pet_fast::kDecodeMaxKeys, ", got ", P + S);
  TORCH_CHECK(num_splits <= pet_fast::kDecodeMaxSplits, "prefix_attention_decode: num_splits must be <= ",
              pet_fast::kDecodeMaxSplits, ", got ", num_splits);

  auto out = torch::empty_like(q);
  if (B == 0 || Hq == 0) return out;
  int splits = static_cast<int>(num_splits);
  if (splits <= 0) {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    splits = pet_fast::prefix_attention_decode_splits(static_cast<int>(B), static_cast<int>(Hq), static_cast<int>(Hkv),
                                                      static_cast<int>(L), static_cast<int>(P + S), sms);
  }
  auto fopts = q.options().dtype(at::kFloat);
  auto part_o = torch::empty({B * Hq * L * splits * D}, fopts);
  auto part_ml = torch::empty({B * Hq * L * splits * 2}, fopts);
  const auto dtype = q.scalar_type() == at::kHalf ? pet_fast::DecodeDtype::kFloat16 : pet_fast::DecodeDtype::kBFloat16;
  cudaError_t err = pet_fast::prefix_attention_decode(
      dtype, q.data_ptr(), k.data_ptr(), v.data_ptr(), P > 0 ? pk.data_ptr() : nullptr,
      P > 0 ? pv.data_ptr() : nullptr, pk_bstride, mask.defined() ? mask.data_ptr<uint8_t>() : nullptr,
      lens.defined() ? lens.data_ptr<int32_t>() : nullptr, out.data_ptr(), part_o.data_ptr<float>(),
      part_ml.data_ptr<float>(), static_cast<int>(B), static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(L),
      static_cast<int>(S), static_cast<int>(P), static_cast<int>(D), causal, static_cast<float>(scale), splits,
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "prefix_attention_decode: launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

void register_prefix_attention(pybind11::module_& m) {
  m.def("prefix_attention_decode", &prefix_attention_decode,
        "Attention of 1..8 new tokens per sequence over [prefix; KV cache] (split-K, forward only)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("prefix_k") = pybind11::none(),
        pybind11::arg("prefix_v") = pybind11::none(), pybind11::arg("key_padding_mask") = pybind11::none(),
        pybind11::arg("cache_lens") = pybind11::none(), pybind11::arg("causal") = false,
        pybind11::arg("scale") = 1.0, pybind11::arg("num_splits") = 0);
}
