// Unmerged LoRA deltas of a batch on the CPU, each row by its slot (BGMV): every row reads its own
// adapter's A and B where they lie, so a batch of rows of many adapters stacks or pads nothing, and
// a row's delta is computed the same way whatever else is in the batch. Built with the other CPU
// kernels by server/kernels/__init__.py; called by server/adapters/lora_delta.py.
//
// x: [T, in] and out: [T, out] (a token per row, T = rows · tokens), out = base_layer(x) on entry;
// slot_of_token: [T] int64, -1 where the token gets no delta (a base row, an aLoRA row before its
// invocation); table: [S, 5] int64 per slot: A's address ([r, in], row-major), B's ([out, r], stored
// column-major, i.e. as Bᵀ [r, out] row-major, so the expansion streams it), r, the address of
// `shift` ([out], 0: none) and of DoRA's g ([out], 0: none), every tensor of x's dtype and kept
// alive by the caller; scales: [S] float32, s = alpha / r; bias: [out] or empty (DoRA's
// x Wᵀ is out − bias).
//
// Per token t of slot k: h = s · A x  ([r], float32), d = B h  ([out], float32, as Σ_k h_k · Bᵀ_k), then
//   plain:  out += d + shift            DoRA: out += (g − 1) · (out − bias) + g · d + shift
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

namespace {

constexpr int64_t kTokensPerTask = 4;  // grain of the thread split: fewer tokens than 2 grains run on one thread

template <typename T>
float dot(const T* a, const float* x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<float>(a[i]) * x[i];
  return s;
}

struct Slot {
  const void* a;
  const void* b;
  int64_t rank;
  const void* shift;
  const void* dora;
  float scale;
};

template <typename T>
void one_token(const T* x, T* out, const T* bias, const Slot& slot, int64_t in, int64_t n_out,
               std::vector<float>& xf, std::vector<float>& d) {
  const T* a = static_cast<const T*>(slot.a);
  const T* bt = static_cast<const T*>(slot.b);  // Bᵀ: [r, out]
  const int64_t r = slot.rank;
  xf.resize(in);
  d.assign(n_out, 0.f);
  for (int64_t i = 0; i < in; ++i) xf[i] = static_cast<float>(x[i]);
  for (int64_t k = 0; k < r; ++k) {
    const float h = slot.scale * dot(a + k * in, xf.data(), in);
    const T* row = bt + k * n_out;
#pragma omp simd
    for (int64_t o = 0; o < n_out; ++o) d[o] += h * static_cast<float>(row[o]);
  }
  const T* shift = static_cast<const T*>(slot.shift);
  const T* g = static_cast<const T*>(slot.dora);
  for (int64_t o = 0; o < n_out; ++o) {
    float delta = d[o];
    const float base = static_cast<float>(out[o]);
    if (g != nullptr) {
      const float go = static_cast<float>(g[o]);
      delta = (go - 1.f) * (base - (bias != nullptr ? static_cast<float>(bias[o]) : 0.f)) + go * delta;
    }
    if (shift != nullptr) delta += static_cast<float>(shift[o]);
    out[o] = static_cast<T>(base + delta);
  }
}

}  // namespace

void lora_delta(torch::Tensor x, torch::Tensor out, torch::Tensor slot_of_token, torch::Tensor table,
                torch::Tensor scales, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0), "lora_delta: x [T, in], out [T, out]");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.scalar_type() == x.scalar_type(), "lora_delta: x, out");
  TORCH_CHECK(slot_of_token.size(0) == x.size(0) && table.size(1) == 5 && scales.size(0) == table.size(0),
              "lora_delta: slot_of_token [T], table [S, 5], scales [S]");
  const int64_t n_tokens = x.size(0), in = x.size(1), n_out = out.size(1);
  const int64_t* tp = table.data_ptr<int64_t>();
  const float* sp = scales.data_ptr<float>();
  std::vector<Slot> slots(table.size(0));
  for (size_t k = 0; k < slots.size(); ++k) {
    const int64_t* row = tp + 5 * k;
    slots[k] = {reinterpret_cast<const void*>(row[0]), reinterpret_cast<const void*>(row[1]), row[2],
                reinterpret_cast<const void*>(row[3]), reinterpret_cast<const void*>(row[4]), sp[k]};
  }
  const int64_t* slot_of = slot_of_token.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_delta", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* bp = bias.numel() > 0 ? bias.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n_tokens, kTokensPerTask, [&](int64_t begin, int64_t end) {
      std::vector<float> xf, d;
      for (int64_t t = begin; t < end; ++t) {
        if (slot_of[t] < 0) continue;
        one_token(xp + t * in, op + t * n_out, bp, slots[slot_of[t]], in, n_out, xf, d);
      }
    });
  });
}
