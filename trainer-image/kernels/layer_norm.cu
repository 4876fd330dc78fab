// LayerNorm over the last dimension, forward and backward, in f32 (mixed precision keeps
// the residual stream and LayerNorm in f32), for `taper` built with CUDA (compiled to PTX
// by build.rs, launched by `model::cuda`). The same formulas as the CPU op in
// `model/fused.rs`: y = (x − mean) · rstd · w + b with the biased variance, and
// dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂)) with ĝ = g ⊙ w, x̂ = (x − mean) · rstd;
// dw = Σ_rows g ⊙ x̂, db = Σ_rows g, summed in a fixed order (deterministic).

#include "common.cuh"

// Mean and 1/sqrt(var + eps) of a row (two passes, as the CPU op), one block per row.
__device__ void moments(const float* xr, int c, float eps, float* shared, float* mean, float* rstd) {
  float s = 0.0f;
  for (int j = threadIdx.x; j < c; j += blockDim.x) s += xr[j];
  float m = block_sum(s, shared) / (float)c;
  float v = 0.0f;
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    float d = xr[j] - m;
    v += d * d;
  }
  float var = block_sum(v, shared) / (float)c;
  *mean = m;
  *rstd = rsqrtf(var + eps);
}

// y[row] from x[row]; one block per row.
extern "C" __global__ void layer_norm_fwd_f32(const float* x, const float* w, const float* b, float* y,
                                              int c, float eps) {
  __shared__ float shared[32];
  long row = blockIdx.x;
  const float* xr = x + row * c;
  float* yr = y + row * c;
  float mean, rstd;
  moments(xr, c, eps, shared, &mean, &rstd);
  for (int j = threadIdx.x; j < c; j += blockDim.x) yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
}

// dx[row], and the row's mean and rstd into stats[row] and stats[rows + row] for the
// parameter gradients; one block per row.
extern "C" __global__ void layer_norm_bwd_dx_f32(const float* x, const float* w, const float* g, float* dx,
                                                 float* stats, int rows, int c, float eps) {
  __shared__ float shared[32];
  long row = blockIdx.x;
  const float* xr = x + row * c;
  const float* gr = g + row * c;
  float* dr = dx + row * c;
  float mean, rstd;
  moments(xr, c, eps, shared, &mean, &rstd);
  float s1 = 0.0f, s2 = 0.0f;
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    float gh = gr[j] * w[j];
    s1 += gh;
    s2 += gh * (xr[j] - mean) * rstd;
  }
  float m1 = block_sum(s1, shared) / (float)c;
  float m2 = block_sum(s2, shared) / (float)c;
  for (int j = threadIdx.x; j < c; j += blockDim.x)
    dr[j] = rstd * (gr[j] * w[j] - m1 - (xr[j] - mean) * rstd * m2);
  if (threadIdx.x == 0) {
    stats[row] = mean;
    stats[rows + row] = rstd;
  }
}

// Rows summed by one block of the parameter gradients.
#define LN_CHUNK 256

// Partial sums of g ⊙ x̂ and g over the rows [chunk · LN_CHUNK, +LN_CHUNK): blocks of 32 × 8
// threads, 32 columns (coalesced) by 8 interleaved rows, reduced over the 8 in a fixed
// order; partial[chunk][col] for dw, partial[chunk][c + col] for db.
extern "C" __global__ void layer_norm_bwd_partial_f32(const float* x, const float* g, const float* stats,
                                                      float* partial, int rows, int c) {
  __shared__ float sw[8][33];
  __shared__ float sb[8][33];
  int col = blockIdx.x * 32 + threadIdx.x;
  int chunk = blockIdx.y;
  float aw = 0.0f, ab = 0.0f;
  if (col < c) {
    int end = min(rows, (chunk + 1) * LN_CHUNK);
    for (int r = chunk * LN_CHUNK + threadIdx.y; r < end; r += 8) {
      float gv = g[(long)r * c + col];
      aw += gv * (x[(long)r * c + col] - stats[r]) * stats[rows + r];
      ab += gv;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < c) {
    float tw = 0.0f, tb = 0.0f;
    for (int i = 0; i < 8; i++) {
      tw += sw[i][threadIdx.x];
      tb += sb[i][threadIdx.x];
    }
    partial[(long)chunk * 2 * c + col] = tw;
    partial[(long)chunk * 2 * c + c + col] = tb;
  }
}

// out[k] = Σ_chunk partial[chunk][k] for k < 2c, chunks in order: dw then db.
extern "C" __global__ void layer_norm_bwd_sum_f32(const float* partial, float* out, int chunks, int c2) {
  int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= c2) return;
  float s = 0.0f;
  for (int i = 0; i < chunks; i++) s += partial[(long)i * c2 + k];
  out[k] = s;
}
