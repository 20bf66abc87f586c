// The Python module of the CPU kernels (server/kernels/__init__.py builds it from this folder's sources).
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor pool_k, torch::Tensor pool_v, torch::Tensor table,
                           torch::Tensor lengths, double scale, int64_t window, double softcap);
void lora_delta(torch::Tensor x, torch::Tensor out, torch::Tensor slot_of_token, torch::Tensor table,
                torch::Tensor scales, torch::Tensor bias);
void slot_linear(torch::Tensor x, torch::Tensor out, torch::Tensor slot_of_token, torch::Tensor table);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (one query per row)");
  m.def("lora_delta", &lora_delta, "each token's unmerged LoRA delta by its slot, added to out in place");
  m.def("slot_linear", &slot_linear, "each token's linear map (weight, bias) by its slot, written to out");
}
