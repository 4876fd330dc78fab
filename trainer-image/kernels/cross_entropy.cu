// Cross-entropy over the vocabulary, forward and backward, for `taper` built with CUDA
// (compiled to PTX by build.rs, loaded by `model::causal::cuda`).
//
// Logits `[rows, v]` (f32 or bf16), targets `[rows]` (u32), per-row weights `[rows]` (f32:
// 1/rows, or the loss mask over its sum). Forward: lse = log Σ_j exp(x[j]) and
// loss[row] = w · (lse − x[target]), both f32 per row (the caller sums the losses and keeps
// lse for the backward). Backward: dx[j] = c · (exp(x[j] − lse) − [j = target]), with
// c = w · (the loss's gradient). One block per row; arithmetic in f32.

#include "common.cuh"

template <typename T>
__device__ void fwd(const T* x, const unsigned int* target, const float* w, float* loss, float* lse,
                    int v) {
  __shared__ float shared[32];
  long row = blockIdx.x;
  const T* xr = x + row * v;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, load(xr, j));
  m = block_max(m, shared);
  float s = 0.0f;
  for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(load(xr, j) - m);
  s = block_sum(s, shared);
  if (threadIdx.x == 0) {
    float l = m + logf(s);
    lse[row] = l;
    unsigned int t = target[row];
    loss[row] = t < (unsigned int)v ? w[row] * (l - load(xr, t)) : NAN;
  }
}

template <typename T>
__device__ void bwd(const T* x, const float* lse, const unsigned int* target, const float* c, T* dx,
                    int v) {
  long row = blockIdx.x;
  const T* xr = x + row * v;
  T* dr = dx + row * v;
  float l = lse[row], cr = c[row];
  unsigned int t = target[row];
  for (int j = threadIdx.x; j < v; j += blockDim.x)
    store(dr, j, cr * (expf(load(xr, j) - l) - (j == (int)t ? 1.0f : 0.0f)));
}

extern "C" __global__ void cross_entropy_fwd_f32(const float* x, const unsigned int* target,
                                                 const float* w, float* loss, float* lse, int v) {
  fwd(x, target, w, loss, lse, v);
}
extern "C" __global__ void cross_entropy_fwd_bf16(const unsigned short* x, const unsigned int* target,
                                                  const float* w, float* loss, float* lse, int v) {
  fwd(x, target, w, loss, lse, v);
}
extern "C" __global__ void cross_entropy_bwd_f32(const float* x, const float* lse,
                                                 const unsigned int* target, const float* c,
                                                 float* dx, int v) {
  bwd(x, lse, target, c, dx, v);
}
extern "C" __global__ void cross_entropy_bwd_bf16(const unsigned short* x, const float* lse,
                                                  const unsigned int* target, const float* c,
                                                  unsigned short* dx, int v) {
  bwd(x, lse, target, c, dx, v);
}
