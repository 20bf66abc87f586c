// Linear maps of a batch on the CPU, each token by its slot (BGMV): every token reads its own
// adapter's weight and bias where they lie, so rows of many adapters stack or pad nothing, and a
// token's result is the same whatever else is in the batch. Built with the other CPU kernels by
// server/kernels/__init__.py; called by server/adapters/bottleneck_layer.py (a bottleneck adapter's
// down and up projections).
//
// x: [T, X] and out: [T, Y] (a token per row); slot_of_token: [T] int64, -1 where the token has no
// slot (its row of `out` is left as it is); table: [S, 6] int64 per slot: the address of W
// ([n_out, n_in]), of its bias ([n_out], 0: none), n_out <= Y, n_in <= X, and W's strides (one of
// them 1: row-major W is read as dots of its rows, column-major W as a sum of its columns, each
// streamed contiguously), every tensor of x's dtype and kept alive by the caller.
//
// Per token t of slot k: out[t, :n_out] = W x[t, :n_in] + bias, in float32; out[t, n_out:] untouched.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

namespace {

constexpr int64_t kTokensPerTask = 4;  // grain of the thread split: fewer tokens than 2 grains run on one thread

struct Slot {
  const void* w;
  const void* bias;
  int64_t n_out;
  int64_t n_in;
  int64_t stride_out;
  int64_t stride_in;
};

template <typename T>
void by_rows(const T* w, const float* xf, int64_t n_out, int64_t n_in, int64_t stride, float* acc) {
  for (int64_t o = 0; o < n_out; ++o) {
    const T* row = w + o * stride;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n_in; ++i) s += static_cast<float>(row[i]) * xf[i];
    acc[o] = s;
  }
}

template <typename T>
void by_columns(const T* w, const float* xf, int64_t n_out, int64_t n_in, int64_t stride, float* acc) {
  for (int64_t o = 0; o < n_out; ++o) acc[o] = 0.f;
  for (int64_t i = 0; i < n_in; ++i) {
    const T* column = w + i * stride;
    const float xi = xf[i];
#pragma omp simd
    for (int64_t o = 0; o < n_out; ++o) acc[o] += xi * static_cast<float>(column[o]);
  }
}

template <typename T>
void one_token(const T* x, T* out, const Slot& slot, std::vector<float>& xf, std::vector<float>& acc) {
  const T* w = static_cast<const T*>(slot.w);
  const T* bias = static_cast<const T*>(slot.bias);
  xf.resize(slot.n_in);
  acc.resize(slot.n_out);
  for (int64_t i = 0; i < slot.n_in; ++i) xf[i] = static_cast<float>(x[i]);
  if (slot.stride_in == 1)
    by_rows(w, xf.data(), slot.n_out, slot.n_in, slot.stride_out, acc.data());
  else
    by_columns(w, xf.data(), slot.n_out, slot.n_in, slot.stride_in, acc.data());
  for (int64_t o = 0; o < slot.n_out; ++o)
    out[o] = static_cast<T>(bias != nullptr ? acc[o] + static_cast<float>(bias[o]) : acc[o]);
}

}  // namespace

void slot_linear(torch::Tensor x, torch::Tensor out, torch::Tensor slot_of_token, torch::Tensor table) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0), "slot_linear: x [T, X], out [T, Y]");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.scalar_type() == x.scalar_type(), "slot_linear: x, out");
  TORCH_CHECK(slot_of_token.size(0) == x.size(0) && table.dim() == 2 && table.size(1) == 6,
              "slot_linear: slot_of_token [T], table [S, 6]");
  const int64_t n_tokens = x.size(0), width_in = x.size(1), width_out = out.size(1);
  const int64_t* tp = table.data_ptr<int64_t>();
  std::vector<Slot> slots(table.size(0));
  for (size_t k = 0; k < slots.size(); ++k) {
    const int64_t* row = tp + 6 * k;
    slots[k] = {reinterpret_cast<const void*>(row[0]), reinterpret_cast<const void*>(row[1]), row[2], row[3], row[4],
                row[5]};
    TORCH_CHECK(row[2] <= width_out && row[3] <= width_in, "slot_linear: a slot's weight is wider than x or out");
    TORCH_CHECK(row[4] == 1 || row[5] == 1, "slot_linear: W row-major or column-major");
  }
  const int64_t* slot_of = slot_of_token.data_ptr<int64_t>();
  for (int64_t t = 0; t < n_tokens; ++t)
    TORCH_CHECK(slot_of[t] < static_cast<int64_t>(slots.size()), "slot_linear: slot index past the table");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "slot_linear", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n_tokens, kTokensPerTask, [&](int64_t begin, int64_t end) {
      std::vector<float> xf, acc;
      for (int64_t t = begin; t < end; ++t) {
        if (slot_of[t] < 0) continue;
        one_token(xp + t * width_in, op + t * width_out, slots[slot_of[t]], xf, acc);
      }
    });
  });
}
