// Bottleneck adapters at one residual site of a decode step on the CPU, every row by its slot:
// each row reads its own adapter's weights where they lie (BGMV), and its form (serial or parallel,
// norms, residuals: the adapter's flags) decides what it computes, so one call serves the site's
// rows of every adapter and form, and a row's result is the same whatever else is in the batch.
// Built with the other CPU kernels by server/kernels/__init__.py; called by
// server/adapters/bottleneck_layer.py, whose torch ops run the activation between the two calls.
//
// h, x: [N, H] (the sub-block's output and input, a token per row); slot_of_row: [N] int64, -1 for
// a base row; table: [S, 6] int64 per slot: the addresses of down.weight ([b, H], row-major), of
// down.bias ([b]), of up.weight ([H, b], column-major, i.e. b columns of H), of up.bias ([H]), b,
// and the form's flags (kParallel ...); every tensor of h's dtype and kept alive by the caller.
// norm_before, norm_after: [N, 2, H] (each row's LayerNorm weight and bias; empty where no slot
// has that norm); scale: [N, C] float32, C = 1 or H (each row's scaling; empty where every row's is 1).
//
//   bottleneck_in:  d[t, :b] = down(LN_before(v)) + down.bias,  v = x (parallel), h + x
//                   (original_ln_before) or h; d[t, b:] and base rows left as they are
//   bottleneck_out: u = s · (up(a[t, :b]) + up.bias), then what bottleneck.combine makes of u, h and
//                   x for the form; base rows get x + h
//
// The form logic mirrors server/adapters/bottleneck.py `combine` op for op, each op rounded to the
// dtype where torch rounds it (a LayerNorm once, after its affine; the scaling in float32, as torch
// multiplies by a Python float or a tensor of the dtype), so only the norms' reductions differ from
// the torch path.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kRowsPerTask = 4;  // grain of the thread split
constexpr double kLnEps = 1e-5;      // torch.nn.LayerNorm's default, which AdapterHub's norms use
enum Flag : int64_t {
  kParallel = 1,
  kOriginalLnBefore = 2,
  kOriginalLnAfter = 4,
  kResidualBeforeLn = 8,
  kAdapterResidualBeforeLn = 16,
  kLnBefore = 32,
  kLnAfter = 64,
};

struct Slot {
  const void* down;
  const void* down_bias;
  const void* up;
  const void* up_bias;
  int64_t b;
  int64_t flags;
  bool has(Flag f) const { return (flags & f) != 0; }
};

template <typename T>
float rounded(float v) {  // as torch stores an op's result in T
  return static_cast<float>(static_cast<T>(v));
}

// v = weight · (v − mean) / sqrt(var + eps) + bias over one row, in place. norm: [2, H]
template <typename T>
void layer_norm(std::vector<float>& v, const T* norm, int64_t hidden) {
  double sum = 0.0, squares = 0.0;
  for (int64_t i = 0; i < hidden; ++i) sum += v[i];
  const double mean = sum / hidden;
  for (int64_t i = 0; i < hidden; ++i) squares += (v[i] - mean) * (v[i] - mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(squares / hidden + kLnEps));
  const T* weight = norm;
  const T* bias = norm + hidden;
  for (int64_t i = 0; i < hidden; ++i)
    v[i] = rounded<T>(static_cast<float>(bias[i]) + (v[i] - static_cast<float>(mean)) * rstd * static_cast<float>(weight[i]));
}

template <typename T>
struct Row {
  const T* h;
  const T* x;
  int64_t hidden;

  // The adapter's input: x (parallel), h + x (original_ln_before), else h.
  void input(const Slot& slot, std::vector<float>& v) const {
    for (int64_t i = 0; i < hidden; ++i) {
      const float hi = static_cast<float>(h[i]), xi = static_cast<float>(x[i]);
      v[i] = slot.has(kParallel) ? xi : slot.has(kOriginalLnBefore) ? rounded<T>(hi + xi) : hi;
    }
  }

  // o = combine(u, h, x) for the slot's form, into out; r: [H] scratch for the serial residual.
  void combine(const Slot& slot, std::vector<float>& u, std::vector<float>& r, const T* norm_after, T* out) const {
    std::vector<float>& o = u;
    if (slot.has(kParallel)) {
      if (slot.has(kLnAfter)) layer_norm(u, norm_after, hidden);
      for (int64_t i = 0; i < hidden; ++i) o[i] = rounded<T>(u[i] + static_cast<float>(h[i]));
    } else {
      for (int64_t i = 0; i < hidden; ++i) {
        const float hi = static_cast<float>(h[i]), xi = static_cast<float>(x[i]);
        const float v = slot.has(kOriginalLnBefore) ? rounded<T>(hi + xi) : hi;
        r[i] = slot.has(kResidualBeforeLn) ? hi : v;
      }
      const bool ln_after = slot.has(kLnAfter);
      if (ln_after && slot.has(kAdapterResidualBeforeLn)) {
        for (int64_t i = 0; i < hidden; ++i) o[i] = rounded<T>(u[i] + r[i]);
        layer_norm(o, norm_after, hidden);
      } else {
        if (ln_after) layer_norm(u, norm_after, hidden);
        for (int64_t i = 0; i < hidden; ++i) o[i] = rounded<T>(u[i] + r[i]);
      }
    }
    for (int64_t i = 0; i < hidden; ++i)
      out[i] = static_cast<T>(slot.has(kOriginalLnAfter) ? o[i] + static_cast<float>(x[i]) : o[i]);
  }
};

// d[:b] = down · v + down.bias for one row. down: [b, H] row-major
template <typename T>
void down_row(const Slot& slot, const std::vector<float>& v, int64_t hidden, T* d) {
  const T* down = static_cast<const T*>(slot.down);
  const T* bias = static_cast<const T*>(slot.down_bias);
  for (int64_t j = 0; j < slot.b; ++j) {
    const T* row = down + j * hidden;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < hidden; ++i) s += static_cast<float>(row[i]) * v[i];
    d[j] = static_cast<T>(s + static_cast<float>(bias[j]));
  }
}

// u = s · (up · a[:b] + up.bias) for one row. up: [H, b] column-major (column j at up + j · H);
// scale: [C] float32 (C = 1 or H) or null
template <typename T>
void up_row(const Slot& slot, const T* a, const float* scale, int64_t scale_width, int64_t hidden, std::vector<float>& u) {
  const T* up = static_cast<const T*>(slot.up);
  const T* bias = static_cast<const T*>(slot.up_bias);
  for (int64_t i = 0; i < hidden; ++i) u[i] = 0.f;
  for (int64_t j = 0; j < slot.b; ++j) {
    const T* column = up + j * hidden;
    const float aj = static_cast<float>(a[j]);
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) u[i] += aj * static_cast<float>(column[i]);
  }
  for (int64_t i = 0; i < hidden; ++i) {
    const float biased = rounded<T>(u[i] + static_cast<float>(bias[i]));
    u[i] = scale == nullptr ? biased : rounded<T>(biased * scale[scale_width > 1 ? i : 0]);
  }
}

// The slots, checked against the rows: each row's slot in the table, its b within d, its norm given.
std::vector<Slot> read_table(const torch::Tensor& table, const torch::Tensor& slot_of_row, int64_t width, Flag norm,
                             const torch::Tensor& norms) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 6 && table.is_contiguous() && table.scalar_type() == torch::kLong,
              "bottleneck: table [S, 6] int64, contiguous");
  TORCH_CHECK(slot_of_row.is_contiguous() && slot_of_row.scalar_type() == torch::kLong,
              "bottleneck: slot_of_row int64, contiguous");
  const int64_t* tp = table.data_ptr<int64_t>();
  std::vector<Slot> slots(table.size(0));
  for (size_t k = 0; k < slots.size(); ++k) {
    const int64_t* e = tp + 6 * k;
    slots[k] = {reinterpret_cast<const void*>(e[0]), reinterpret_cast<const void*>(e[1]),
                reinterpret_cast<const void*>(e[2]), reinterpret_cast<const void*>(e[3]), e[4], e[5]};
    TORCH_CHECK(e[4] <= width, "bottleneck: a slot's b is wider than d");
  }
  const int64_t* slot_of = slot_of_row.data_ptr<int64_t>();
  for (int64_t t = 0; t < slot_of_row.size(0); ++t) {
    TORCH_CHECK(slot_of[t] < static_cast<int64_t>(slots.size()), "bottleneck: slot index past the table");
    TORCH_CHECK(slot_of[t] < 0 || !slots[slot_of[t]].has(norm) || norms.numel() > 0,
                "bottleneck: a row's form has a norm that norms do not give");
  }
  return slots;
}

void check_rows(const torch::Tensor& h, const torch::Tensor& x, const torch::Tensor& slot_of_row,
                const torch::Tensor& norm) {
  TORCH_CHECK(h.dim() == 2 && h.sizes() == x.sizes() && h.is_contiguous() && x.is_contiguous() &&
                  x.scalar_type() == h.scalar_type(), "bottleneck: h, x [N, H], contiguous, one dtype");
  TORCH_CHECK(slot_of_row.size(0) == h.size(0), "bottleneck: slot_of_row [N]");
  TORCH_CHECK(norm.numel() == 0 || (norm.is_contiguous() && norm.size(0) == h.size(0) && norm.size(1) == 2 &&
                                    norm.size(2) == h.size(1)), "bottleneck: norm [N, 2, H]");
}

}  // namespace

void bottleneck_in(torch::Tensor h, torch::Tensor x, torch::Tensor d, torch::Tensor slot_of_row, torch::Tensor table,
                   torch::Tensor norm_before) {
  check_rows(h, x, slot_of_row, norm_before);
  TORCH_CHECK(d.dim() == 2 && d.size(0) == h.size(0) && d.is_contiguous() && d.scalar_type() == h.scalar_type(),
              "bottleneck_in: d [N, b]");
  const int64_t n = h.size(0), hidden = h.size(1), width = d.size(1);
  const std::vector<Slot> slots = read_table(table, slot_of_row, width, kLnBefore, norm_before);
  const int64_t* slot_of = slot_of_row.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "bottleneck_in", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* nb = norm_before.numel() > 0 ? norm_before.data_ptr<scalar_t>() : nullptr;
    scalar_t* dp = d.data_ptr<scalar_t>();
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<float> v(hidden);
      for (int64_t t = begin; t < end; ++t) {
        if (slot_of[t] < 0) continue;
        const Slot& slot = slots[slot_of[t]];
        Row<scalar_t>{hp + t * hidden, xp + t * hidden, hidden}.input(slot, v);
        if (slot.has(kLnBefore)) layer_norm(v, nb + t * 2 * hidden, hidden);
        down_row(slot, v, hidden, dp + t * width);
      }
    });
  });
}

void bottleneck_out(torch::Tensor h, torch::Tensor x, torch::Tensor a, torch::Tensor out, torch::Tensor slot_of_row,
                    torch::Tensor table, torch::Tensor scale, torch::Tensor norm_after) {
  check_rows(h, x, slot_of_row, norm_after);
  TORCH_CHECK(out.sizes() == h.sizes() && out.is_contiguous() && out.scalar_type() == h.scalar_type(),
              "bottleneck_out: out like h");
  TORCH_CHECK(a.dim() == 2 && a.size(0) == h.size(0) && a.is_contiguous() && a.scalar_type() == h.scalar_type(),
              "bottleneck_out: a [N, b]");
  TORCH_CHECK(scale.numel() == 0 || (scale.is_contiguous() && scale.scalar_type() == torch::kFloat &&
                                     scale.size(0) == h.size(0) && (scale.size(1) == 1 || scale.size(1) == h.size(1))),
              "bottleneck_out: scale [N, 1 or H] float32");
  const int64_t n = h.size(0), hidden = h.size(1), width = a.size(1);
  const int64_t scale_width = scale.numel() > 0 ? scale.size(1) : 0;
  const std::vector<Slot> slots = read_table(table, slot_of_row, width, kLnAfter, norm_after);
  const int64_t* slot_of = slot_of_row.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "bottleneck_out", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const float* sp = scale_width > 0 ? scale.data_ptr<float>() : nullptr;
    const scalar_t* na = norm_after.numel() > 0 ? norm_after.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<float> u(hidden), r(hidden);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* ht = hp + t * hidden;
        const scalar_t* xt = xp + t * hidden;
        scalar_t* ot = op + t * hidden;
        if (slot_of[t] < 0) {
          for (int64_t i = 0; i < hidden; ++i) ot[i] = static_cast<scalar_t>(static_cast<float>(xt[i]) + static_cast<float>(ht[i]));
          continue;
        }
        const Slot& slot = slots[slot_of[t]];
        up_row(slot, ap + t * width, sp == nullptr ? nullptr : sp + t * scale_width, scale_width, hidden, u);
        Row<scalar_t>{ht, xt, hidden}.combine(slot, u, r, na == nullptr ? nullptr : na + t * 2 * hidden, ot);
      }
    });
  });
}
