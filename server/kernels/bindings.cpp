// The Python module of the CPU kernels (server/kernels/__init__.py builds it from this folder's sources).
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor pool_k, torch::Tensor pool_v, torch::Tensor table,
                           torch::Tensor lengths, double scale, int64_t window, double softcap);
void lora_delta(torch::Tensor x, torch::Tensor out, torch::Tensor slot_of_token, torch::Tensor table,
                torch::Tensor scales, torch::Tensor bias);
void bottleneck_in(torch::Tensor h, torch::Tensor x, torch::Tensor d, torch::Tensor slot_of_row, torch::Tensor table,
                   torch::Tensor norm_before);
void bottleneck_out(torch::Tensor h, torch::Tensor x, torch::Tensor a, torch::Tensor out, torch::Tensor slot_of_row,
                    torch::Tensor table, torch::Tensor scale, torch::Tensor norm_after);
torch::Tensor small_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (one query per row)");
  m.def("lora_delta", &lora_delta, "each token's unmerged LoRA delta by its slot, added to out in place");
  m.def("bottleneck_in", &bottleneck_in, "each row's bottleneck down projection at a site, by its slot and form");
  m.def("bottleneck_out", &bottleneck_out, "each row's bottleneck up projection and residuals at a site, into out");
  m.def("small_linear", &small_linear, "a float32 linear layer over 1-4 rows, x weightᵀ + bias");
}
