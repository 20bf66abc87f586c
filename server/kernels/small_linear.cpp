// A linear layer over a few rows on the CPU (decode at 1-4 rows), float32: over the bench model's
// linears oneDNN's matmul streams the weights at 15-20 GB/s for M = 4..1 on the 2-core dev VM, this
// kernel at 19-26 GB/s (BENCHMARKS.md, "Small linears"; `python -m load_tests.small_linear`); from 8
// rows on oneDNN is as fast or faster and serves (server/linear.py).
// Built with the other CPU kernels by server/kernels/__init__.py.
//
// x: [M, K], weight: [N, K] (nn.Linear's, row-major), bias: [N] or empty, all float32 and contiguous,
// M <= kMaxRows -> out [M, N] = x weightᵀ + bias. The threads split the N outputs; each takes
// kOutputs weight rows at a time, streams them once from memory and keeps them in L1 while every
// x row is dotted with them (float32 sums, vectorised over K).
#include <torch/extension.h>

#include <ATen/Parallel.h>

namespace {

constexpr int64_t kMaxRows = 4;
constexpr int64_t kOutputs = 4;  // weight rows a pass dots together
constexpr int64_t kOutputsPerTask = 64;  // grain of the thread split

template <int64_t M>
void some_outputs(const float* x, const float* w, const float* bias, float* out, int64_t n0, int64_t n1, int64_t K,
                  int64_t N) {
  int64_t n = n0;
  for (; n + kOutputs <= n1; n += kOutputs) {
    const float* w0 = w + n * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < K; ++k) {
        s0 += w0[k] * xm[k];
        s1 += w1[k] * xm[k];
        s2 += w2[k] * xm[k];
        s3 += w3[k] * xm[k];
      }
      float* o = out + m * N + n;
      o[0] = bias != nullptr ? s0 + bias[n] : s0;
      o[1] = bias != nullptr ? s1 + bias[n + 1] : s1;
      o[2] = bias != nullptr ? s2 + bias[n + 2] : s2;
      o[3] = bias != nullptr ? s3 + bias[n + 3] : s3;
    }
  }
  for (; n < n1; ++n) {  // the last outputs of the range, one at a time
    const float* wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += wn[k] * xm[k];
      out[m * N + n] = bias != nullptr ? s + bias[n] : s;
    }
  }
}

}  // namespace

torch::Tensor small_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "small_linear: x [M, K], weight [N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "small_linear: 1 to ", kMaxRows, " rows, got ", x.size(0));
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "small_linear: float32");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "small_linear: contiguous x and weight");
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == weight.size(0) && bias.is_contiguous() &&
                                    bias.scalar_type() == torch::kFloat), "small_linear: bias [N] float32 or empty");
  const int64_t rows = x.size(0), K = x.size(1), N = weight.size(0);
  auto out = torch::empty({rows, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, kOutputsPerTask, [&](int64_t n0, int64_t n1) {
    switch (rows) {
      case 1: some_outputs<1>(xp, wp, bp, op, n0, n1, K, N); break;
      case 2: some_outputs<2>(xp, wp, bp, op, n0, n1, K, N); break;
      case 3: some_outputs<3>(xp, wp, bp, op, n0, n1, K, N); break;
      default: some_outputs<4>(xp, wp, bp, op, n0, n1, K, N); break;
    }
  });
  return out;
}
