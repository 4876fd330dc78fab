// Causal softmax of attention scores, forward and backward, for `taper` built with CUDA
// (compiled to PTX by build.rs, loaded by `model::causal::CausalSoftmax`).
//
// The scores are `[rows, t]`, rows = batch × heads × t, row r being query position
// i = r mod t. Forward: y[j] = softmax_j(scale · x[j]) over j ≤ i, and 0 for j > i (the
// causal mask). Backward: dx[j] = scale · y[j] · (g[j] − Σ_k g[k] y[k]). One block per
// row; arithmetic in f32 whatever the storage (f32 or bf16).

#include "common.cuh"

template <typename T>
__device__ void fwd(const T* x, T* y, int t, float scale) {
  __shared__ float shared[32];
  long row = blockIdx.x;
  int i = (int)(row % t);
  const T* xr = x + row * t;
  T* yr = y + row * t;
  float m = -INFINITY;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, load(xr, j) * scale);
  m = block_max(m, shared);
  float s = 0.0f;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) s += expf(load(xr, j) * scale - m);
  s = block_sum(s, shared);
  float inv = 1.0f / s;
  for (int j = threadIdx.x; j < t; j += blockDim.x)
    store(yr, j, j <= i ? expf(load(xr, j) * scale - m) * inv : 0.0f);
}

template <typename T>
__device__ void bwd(const T* y, const T* g, T* dx, int t, float scale) {
  __shared__ float shared[32];
  long row = blockIdx.x;
  int i = (int)(row % t);
  const T* yr = y + row * t;
  const T* gr = g + row * t;
  T* dr = dx + row * t;
  float d = 0.0f;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) d += load(yr, j) * load(gr, j);
  d = block_sum(d, shared);
  for (int j = threadIdx.x; j < t; j += blockDim.x)
    store(dr, j, j <= i ? scale * load(yr, j) * (load(gr, j) - d) : 0.0f);
}

extern "C" __global__ void causal_softmax_fwd_f32(const float* x, float* y, int t, float scale) {
  fwd(x, y, t, scale);
}
extern "C" __global__ void causal_softmax_fwd_bf16(const unsigned short* x, unsigned short* y, int t,
                                                   float scale) {
  fwd(x, y, t, scale);
}
extern "C" __global__ void causal_softmax_bwd_f32(const float* y, const float* g, float* dx, int t,
                                                  float scale) {
  bwd(y, g, dx, t, scale);
}
extern "C" __global__ void causal_softmax_bwd_bf16(const unsigned short* y, const unsigned short* g,
                                                   unsigned short* dx, int t, float scale) {
  bwd(y, g, dx, t, scale);
}
