// Decode attention over a paged KV cache on the CPU: one query per row, each row over its own
// cached length, reading keys and values where they lie in the block pool (no gather, no padding
// to the longest row). Built with the other CPU kernels by server/kernels/__init__.py; called by
// server/engine/paged_attention.py.
//
// q: [N, Hq, D]; pool_k, pool_v: [blocks, Hkv, B, D] (a block holds each head's B positions
// contiguously, so a head's keys are read in runs of B * D); table: [N, W] int64 (row n's position p is in
// block table[n][p / B] at offset p % B); lengths: [N] int64 (row n sees keys 0 .. lengths[n]-1);
// window > 0: only the last `window` of them; softcap > 0: scores cap * tanh(s / cap).
// -> [N, Hq, D]. Softmax in float32 whatever the dtype, as SDPA's CPU kernels.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <int64_t D, typename T>
float dot(const T* a, const float* q, int64_t d) {
  if constexpr (D > 0) d = D;
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += static_cast<float>(a[i]) * q[i];
  return s;
}

template <int64_t D, typename T>
void one_group(const T* q, const T* pool_k, const T* pool_v, const int64_t* table, int64_t lo, int64_t len,
               int64_t block, int64_t hkv, int64_t g, int64_t group, int64_t d, float scale, float softcap,
               T* out, std::vector<float>& qf, std::vector<float>& scores, std::vector<float>& acc) {
  if constexpr (D > 0) d = D;
  const int64_t n_keys = len - lo;
  qf.resize(group * d);
  scores.resize(group * n_keys);
  acc.assign(group * d, 0.f);
  for (int64_t h = 0; h < group; ++h)
    for (int64_t i = 0; i < d; ++i) qf[h * d + i] = static_cast<float>(q[h * d + i]);
  for (int64_t j0 = lo - lo % block; j0 < len; j0 += block) {  // block by block: one table read each
    const int64_t first = std::max(j0, lo), last = std::min(j0 + block, len);
    const T* k = pool_k + ((table[j0 / block] * hkv + g) * block + (first - j0)) * d;
    for (int64_t j = first; j < last; ++j, k += d) {
      for (int64_t h = 0; h < group; ++h) {
        scores[h * n_keys + (j - lo)] = dot<D>(k, &qf[h * d], d) * scale;
      }
    }
  }
  if (softcap > 0.f)
    for (float& s : scores) s = softcap * std::tanh(s / softcap);
  for (int64_t h = 0; h < group; ++h) {
    float* sc = &scores[h * n_keys];
    const float top = *std::max_element(sc, sc + n_keys);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n_keys; ++j) {
      sc[j] = std::exp(sc[j] - top);
      total += sc[j];
    }
    const float inv = 1.f / total;
    for (int64_t j = 0; j < n_keys; ++j) sc[j] *= inv;
  }
  for (int64_t j0 = lo - lo % block; j0 < len; j0 += block) {
    const int64_t first = std::max(j0, lo), last = std::min(j0 + block, len);
    const T* v = pool_v + ((table[j0 / block] * hkv + g) * block + (first - j0)) * d;
    for (int64_t j = first; j < last; ++j, v += d) {
      for (int64_t h = 0; h < group; ++h) {
        const float p = scores[h * n_keys + (j - lo)];
        float* a = &acc[h * d];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) a[i] += p * static_cast<float>(v[i]);
      }
    }
  }
  for (int64_t h = 0; h < group; ++h)
    for (int64_t i = 0; i < d; ++i) out[h * d + i] = static_cast<T>(acc[h * d + i]);
}

}  // namespace

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor pool_k, torch::Tensor pool_v, torch::Tensor table,
                           torch::Tensor lengths, double scale, int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 3 && pool_k.dim() == 4 && table.dim() == 2, "paged_decode: bad ranks");
  TORCH_CHECK(pool_k.is_contiguous() && pool_v.is_contiguous() && table.is_contiguous(), "paged_decode: pools must be contiguous");
  q = q.contiguous();
  auto lens = lengths.contiguous();
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = pool_k.size(1), block = pool_k.size(2), width = table.size(1);
  TORCH_CHECK(hq % hkv == 0 && pool_k.size(3) == d, "paged_decode: head shapes");
  const int64_t group = hq / hkv;
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = pool_k.data_ptr<scalar_t>();
    const scalar_t* vp = pool_v.data_ptr<scalar_t>();
    const int64_t* tp = table.data_ptr<int64_t>();
    const int64_t* lp = lens.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n * hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf, scores, acc;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = i / hkv, g = i % hkv, len = lp[row];
        const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        const int64_t head = row * hq + g * group;
        auto run = d == 64 ? one_group<64, scalar_t> : d == 128 ? one_group<128, scalar_t> : one_group<0, scalar_t>;
        run(qp + head * d, kp, vp, tp + row * width, lo, len, block, hkv, g, group, d,
                            static_cast<float>(scale), static_cast<float>(softcap), op + head * d, qf, scores, acc);
      }
    });
  });
  return out;
}
