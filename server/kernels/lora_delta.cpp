// Unmerged LoRA deltas of a batch on the CPU, each row by its slot (BGMV): every row reads its own
// adapter's A and B where they lie, so a batch of rows of many adapters stacks or pads nothing, and
// a row's delta is computed the same way whatever else is in the batch. Built with the other CPU
// kernels by server/kernels/__init__.py; called by server/adapters/lora_delta.py.
//
// x: [T, in] and out: [T, out] (a token per row, T = rows · tokens), out = base_layer(x) on entry;
// slot_of_token: [T] int64, -1 where the token gets no delta (a base row, an aLoRA row before its
// invocation); table: [S, 6] int64 per slot: A's address ([r, in], row-major), B's ([out, r], stored
// column-major, i.e. as Bᵀ [r, out] row-major, so the expansion streams it), r (0: the slot's adapter
// has no LoRA at this module, its tokens get no delta), the address of
// `shift` ([out], 0: none) and of DoRA's g ([out], 0: none), and A's and B's dtype (0: x's, 1:
// bfloat16: values that bfloat16 holds exactly, half the bytes to read); every other tensor of x's
// dtype, all kept alive by the caller; scales: [S] float32, s = alpha / r; bias: [out] or empty
// (DoRA's x Wᵀ is out − bias).
//
// Per token t of slot k: h = s · A x  ([r], float32), d = B h  ([out], float32, as Σ_k h_k · Bᵀ_k), then
//   plain:  out += d + shift            DoRA: out += (g − 1) · (out − bias) + g · d + shift
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTokensPerTask = 4;  // grain of the thread split: fewer tokens than 2 grains run on one thread

// a[i] as float32. bfloat16 is the top half of a float32: widened by a 16-bit shift, which the
// compiler vectorises with the loops around it.
template <typename T>
inline float widen(const T* a, int64_t i) {
  return static_cast<float>(a[i]);
}

template <>
inline float widen(const at::BFloat16* a, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(a)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
float dot(const T* a, const float* x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += widen(a, i) * x[i];
  return s;
}

constexpr int64_t kColumns = 6;  // of the table

struct Slot {
  const void* a;
  const void* b;
  int64_t rank;
  const void* shift;
  const void* dora;
  bool bf16;  // A and B in bfloat16, whatever x's dtype
  float scale;
};

template <typename T>
const float* as_float(const T* x, int64_t n, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    buffer.resize(n);
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(x[i]);
    return buffer.data();
  }
}

// h[k] = s · A[k] · x for k < r, four of A's rows at a time (four independent sums keep more of A's
// bytes in flight than one), float32.
template <typename T>
void shrink(const T* a, const float* x, int64_t r, int64_t in, float scale, float* h) {
  int64_t k = 0;
  for (; k + 4 <= r; k += 4) {
    const T* a0 = a + k * in;
    const T* a1 = a0 + in;
    const T* a2 = a1 + in;
    const T* a3 = a2 + in;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < in; ++i) {
      s0 += widen(a0, i) * x[i];
      s1 += widen(a1, i) * x[i];
      s2 += widen(a2, i) * x[i];
      s3 += widen(a3, i) * x[i];
    }
    h[k] = scale * s0;
    h[k + 1] = scale * s1;
    h[k + 2] = scale * s2;
    h[k + 3] = scale * s3;
  }
  for (; k < r; ++k) h[k] = scale * dot(a + k * in, x, in);
}

// d[o] = Σ_k h[k] · Bᵀ[k, o], k ascending: four rows of Bᵀ at a time stream side by side into d
// (one pass over d per four ranks, not per rank), vectorised over o.
template <typename T>
void expand(const T* bt, const float* h, int64_t r, int64_t n_out, float* d) {
  std::fill(d, d + n_out, 0.f);
  int64_t k = 0;
  for (; k + 4 <= r; k += 4) {
    const T* b0 = bt + k * n_out;
    const T* b1 = b0 + n_out;
    const T* b2 = b1 + n_out;
    const T* b3 = b2 + n_out;
    const float h0 = h[k], h1 = h[k + 1], h2 = h[k + 2], h3 = h[k + 3];
#pragma omp simd
    for (int64_t o = 0; o < n_out; ++o) {
      d[o] = (((d[o] + h0 * widen(b0, o)) + h1 * widen(b1, o)) + h2 * widen(b2, o)) + h3 * widen(b3, o);
    }
  }
  for (; k < r; ++k) {
    const T* row = bt + k * n_out;
#pragma omp simd
    for (int64_t o = 0; o < n_out; ++o) d[o] += h[k] * widen(row, o);
  }
}

// W: the type of A and B (x's, or bfloat16); the sums are float32 either way, over the ranks in the
// same order (the compiler's vector blocking of each sum may differ with W: float32 rounding apart).
template <typename T, typename W>
void one_token(const T* x, T* out, const T* bias, const Slot& slot, int64_t in, int64_t n_out,
               std::vector<float>& xf, std::vector<float>& h, std::vector<float>& d) {
  h.resize(slot.rank);
  d.resize(n_out);
  shrink(static_cast<const W*>(slot.a), as_float(x, in, xf), slot.rank, in, slot.scale, h.data());
  expand(static_cast<const W*>(slot.b), h.data(), slot.rank, n_out, d.data());  // slot.b: Bᵀ [r, out]
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
  TORCH_CHECK(slot_of_token.size(0) == x.size(0) && table.size(1) == kColumns && scales.size(0) == table.size(0),
              "lora_delta: slot_of_token [T], table [S, 6], scales [S]");
  const int64_t n_tokens = x.size(0), in = x.size(1), n_out = out.size(1);
  const int64_t* tp = table.data_ptr<int64_t>();
  const float* sp = scales.data_ptr<float>();
  std::vector<Slot> slots(table.size(0));
  for (size_t k = 0; k < slots.size(); ++k) {
    const int64_t* row = tp + kColumns * k;
    slots[k] = {reinterpret_cast<const void*>(row[0]), reinterpret_cast<const void*>(row[1]), row[2],
                reinterpret_cast<const void*>(row[3]), reinterpret_cast<const void*>(row[4]), row[5] == 1, sp[k]};
  }
  const int64_t* slot_of = slot_of_token.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_delta", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* bp = bias.numel() > 0 ? bias.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n_tokens, kTokensPerTask, [&](int64_t begin, int64_t end) {
      std::vector<float> xf, h, d;
      for (int64_t t = begin; t < end; ++t) {
        if (slot_of[t] < 0 || slots[slot_of[t]].rank == 0) continue;  // no adapter, or none of its LoRA here
        const Slot& slot = slots[slot_of[t]];
        if (slot.bf16) {
          one_token<scalar_t, at::BFloat16>(xp + t * in, op + t * n_out, bp, slot, in, n_out, xf, h, d);
        } else {
          one_token<scalar_t, scalar_t>(xp + t * in, op + t * n_out, bp, slot, in, n_out, xf, h, d);
        }
      }
    });
  });
}
